"""batchllm.distributed.parallel_state: rank 0 of 1 by default; with real gloo ranks the parallel layers compute the unsplit result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchllm.distributed import parallel_state as ps


def test_a_process_is_rank_0_of_1_and_the_collectives_are_identities():
    state = ps.get_tensor_parallel_group()
    assert (state.rank, state.size, state.group) == (0, 1, None)
    x = torch.randn(3, 4)
    assert ps.tensor_model_parallel_all_reduce(x) is x
    assert ps.tensor_model_parallel_all_gather(x) is x


def test_a_size_above_1_needs_torch_distributed_and_a_rank_inside_it():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ps.init_tensor_parallel(0, 2)
    assert ps.get_tp_size() == 1  # a refused init leaves the state as it was
    with pytest.raises(ValueError, match="rank 2 is not in a group of size 2"):
        ps.TensorParallelGroup(rank=2, size=2)


def _full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (11, 8), "gate": (6, 8), "up": (6, 8), "down": (8, 6), "down_bias": (8,),
              "head": (11, 8)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def _run_rank(rank: int, size: int, init_file: str) -> None:
    """One gloo rank: build the layers from the process's parallel state, load its slices, compare."""
    import torch.distributed as dist

    from batchllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from batchllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        ps.init_tensor_parallel(rank, size)
        t = _full_tensors()
        emb, head = VocabParallelEmbedding(11, 8), ParallelLMHead(11, 8)
        gate_up, down = MergedColumnParallelLinear(8, [6, 6]), RowParallelLinear(6, 8, bias=True)
        emb.weight_loader(emb.weight, t["embed"])
        head.weight_loader(head.weight, t["head"])
        gate_up.weight_loader(gate_up.weight, t["gate"], 0)
        gate_up.weight_loader(gate_up.weight, t["up"], 1)
        down.weight_loader(down.weight, t["down"])
        down.weight_loader(down.bias, t["down_bias"])
        ids = torch.tensor([0, 5, 10, 3, 6])
        with torch.inference_mode():
            x = emb(ids)
            g, u = gate_up(x).chunk(2, dim=-1)
            logits = head(down(F.silu(g) * u))
        fx = F.embedding(ids, t["embed"])
        fh = F.linear(F.silu(fx @ t["gate"].T) * (fx @ t["up"].T), t["down"], t["down_bias"])
        torch.testing.assert_close(logits, fh @ t["head"].T)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 3])
def test_gloo_ranks_compute_the_unsplit_result(tmp_path, size):
    import torch.multiprocessing as mp

    mp.spawn(_run_rank, args=(size, str(tmp_path / "rendezvous")), nprocs=size, join=True)
