"""batchllm.layers.fused_moe: stacked experts equal the routed formula at size 1; rank r of N loads
exactly its slice of every expert, and the ranks' partial outputs sum to the whole."""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import get_kernels, reference
from batchllm.layers.fused_moe import GATE, UP, FusedMoE

E, H, INTER, T, K = 4, 12, 8, 6, 2
gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def checkpoint() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate [I, H], up [I, H], down [H, I]) per expert, as a checkpoint stores them."""
    return [(rand(INTER, H), rand(INTER, H), rand(H, INTER)) for _ in range(E)]


def build(experts, tp_rank: int | None = None, tp_size: int | None = None) -> FusedMoE:
    """A FusedMoE holding `experts`; rank and size from the process's parallel state unless given."""
    layer = FusedMoE(E, H, INTER, get_kernels("torch"), tp_rank=tp_rank, tp_size=tp_size)
    for e, (gate, up, down) in enumerate(experts):
        assert layer.weight_loader(layer.gate_up_proj, gate, (e, GATE)) == (e, e + 1)
        layer.weight_loader(layer.gate_up_proj, up, (e, UP))
        assert layer.weight_loader(layer.down_proj, down, (e, None)) == (e, e + 1)
    return layer


def routing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights, ids = torch.topk(rand(T, E).softmax(-1), K, dim=-1)
    return rand(T, H), weights, ids


def test_single_rank_is_the_routed_mlp():
    experts = checkpoint()
    layer = build(experts)
    x, weights, ids = routing()
    expected = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            gate, up, down = experts[int(ids[t, k])]
            expected[t] += weights[t, k] * (down @ (torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])))
    torch.testing.assert_close(layer(x, weights, ids), expected, atol=1e-5, rtol=1e-5)
    w13 = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
    assert torch.equal(layer.gate_up_proj, w13)  # the kernels' [E, 2I, H] layout, gate rows first


@pytest.mark.parametrize("tp_size", [2, 4])
def test_rank_holds_its_features_of_every_expert_and_partials_sum(tp_size):
    experts = checkpoint()
    x, weights, ids = routing()
    whole = build(experts)(x, weights, ids)
    part = INTER // tp_size
    partials = []
    for r in range(tp_size):
        layer = build(experts, r, tp_size)
        cols = slice(r * part, (r + 1) * part)
        for e, (gate, up, down) in enumerate(experts):
            assert torch.equal(layer.gate_up_proj[e], torch.cat([gate[cols], up[cols]]))
            assert torch.equal(layer.down_proj[e], down[:, cols])
        partials.append(layer(x, weights, ids))  # the all-reduce is an identity in this process
    torch.testing.assert_close(sum(partials), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp_rank, tp_size", [(0, 1), (1, 2)])
def test_stacked_checkpoint_tensors_load_like_per_expert_ones(tp_rank, tp_size):
    experts = checkpoint()
    per_expert = build(experts, tp_rank, tp_size)
    stacked = FusedMoE(E, H, INTER, get_kernels("torch"), tp_rank=tp_rank, tp_size=tp_size)
    w13 = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
    w2 = torch.stack([d for _, _, d in experts])
    assert stacked.weight_loader(stacked.gate_up_proj, w13) is None
    assert stacked.weight_loader(stacked.down_proj, w2) is None
    assert torch.equal(stacked.gate_up_proj, per_expert.gate_up_proj)
    assert torch.equal(stacked.down_proj, per_expert.down_proj)


def test_bad_checkpoint_tensors_are_named():
    layer = FusedMoE(E, H, INTER, get_kernels("torch"))
    gate, _, down = checkpoint()[0]
    with pytest.raises(ValueError, match="expert 9, but this layer has experts 0..3"):
        layer.weight_loader(layer.gate_up_proj, gate, (9, GATE))
    with pytest.raises(ValueError, match=r"has shape \(12, 8\), expected \(8, 12\)"):
        layer.weight_loader(layer.gate_up_proj, down, (0, UP))
    with pytest.raises(ValueError, match="not divisible by the tensor parallel size 3"):
        FusedMoE(E, H, INTER, get_kernels("torch"), tp_rank=0, tp_size=3)
    assert get_kernels("torch").fused_moe is reference.fused_moe


def _run_rank(rank: int, size: int, init_file: str) -> None:
    """One gloo rank: a FusedMoE built from the process's parallel state sums to the unsplit MLP."""
    import torch.distributed as dist

    from batchllm.distributed import parallel_state as ps

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        ps.init_tensor_parallel(rank, size)
        torch.manual_seed(0)  # every rank draws the same checkpoint and routing
        experts = [(torch.randn(INTER, H), torch.randn(INTER, H), torch.randn(H, INTER)) for _ in range(E)]
        weights, ids = torch.topk(torch.randn(T, E).softmax(-1), K, dim=-1)
        x = torch.randn(T, H)
        layer = build(experts)
        assert layer.tp_size == size and layer.down_proj.shape == (E, H, INTER // size)
        w13 = torch.stack([torch.cat([g, u]) for g, u, _ in experts])
        w2 = torch.stack([d for _, _, d in experts])
        torch.testing.assert_close(layer(x, weights, ids), reference.fused_moe(x, w13, w2, weights, ids),
                                   atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_compute_the_unsplit_result(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_run_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
