"""FP8 linear layers: the quantization arithmetic, the GEMM paths, and the tensor-parallel slice each rank loads (scales sliced with their rows)."""
from __future__ import annotations

import pytest
import torch

from batchllm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                    QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
from batchllm.layers.quantization.fp8 import (FP8, Fp8LinearMethod, dequantize_weight,
                                              quantize_rows, quantize_weight, reference_linear,
                                              scaled_mm_linear)

IN, OUT = 32, 48
gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def fp8_layer(cls, *args, **kwargs):
    layer = cls(*args, **kwargs)
    layer.set_quant_method(Fp8LinearMethod())
    return layer


def w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T with both sides quantized per row, written out by hand."""
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    return (xq.float() @ wq.float().T) * xs * ws.T


def test_rows_quantize_to_448_and_back_within_float8_precision():
    x = rand(6, IN) * torch.tensor([1e-3, 1.0, 30.0, 500.0, 1.0, 1.0]).unsqueeze(1)
    x[4] = 0.0  # a zero row: zeros, not NaN
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[4].float(), torch.zeros(IN))
    peak = q.float().abs().amax(dim=1)
    assert torch.equal(peak[[0, 1, 2, 3, 5]], torch.full((5,), 448.0))  # each row's max maps to 448
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormals
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2.0 ** -9).all()


def test_activation_cap_saturates_the_largest_values():
    x = torch.tensor([[1.0, -2.0, 3000.0]])
    q, scale = quantize_rows(x, amax_cap=1200.0)
    assert scale.item() == pytest.approx(1200.0 / 448)
    assert q.float().tolist() == [[0.375, -0.75, 448.0]]  # 1/scale rounded to e4m3; 3000 -> 1200


def test_weight_quantization_matches_rows_across_chunks(monkeypatch):
    import batchllm.layers.quantization.fp8 as fp8

    monkeypatch.setattr(fp8, "_CHUNK_ROWS", 5)
    w = rand(OUT, IN)
    q, scale = quantize_weight(w)
    q_ref, s_ref = quantize_rows(w)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(scale, s_ref.squeeze(1))
    torch.testing.assert_close(dequantize_weight(q, scale), q_ref.float() * s_ref)


def test_reference_linear_is_the_w8a8_product():
    x, w, b = rand(7, IN), rand(OUT, IN), rand(OUT)
    wq, ws = quantize_weight(w)
    y = reference_linear(x, wq, ws, b)
    torch.testing.assert_close(y, w8a8(x, w) + b, rtol=1e-5, atol=1e-5)
    # and close to the unquantized product: ~2^-4 relative per factor
    exact = x @ w.T + b
    assert (y - exact).abs().mean() < 0.05 * exact.abs().mean()
    assert reference_linear(x.bfloat16(), wq, ws, b.bfloat16()).dtype == torch.bfloat16


def _scaled_mm_runs_here() -> bool:
    try:
        q = torch.zeros(16, 16, dtype=FP8)
        torch._scaled_mm(q, q.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _scaled_mm_runs_here(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("dtype, bias_dtype", [(torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32), (torch.bfloat16, None)])
def test_scaled_mm_call_equals_the_reference(dtype, bias_dtype):
    """The torch._scaled_mm call the GPU makes (row-wise scales [M,1] / [1,N], the weight
    transposed, bf16 out): the same layout and scale conventions as the reference."""
    x, w = rand(5, IN).to(dtype), rand(OUT, IN)
    b = rand(OUT).to(bias_dtype) if bias_dtype else None
    wq, ws = quantize_weight(w)
    got = scaled_mm_linear(x, wq, ws, b)
    assert got.dtype == dtype and got.shape == (5, OUT)
    want = reference_linear(x.float(), wq, ws, None if b is None else b.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear])
def test_fp8_layer_quantizes_a_float_checkpoint_as_it_loads(cls):
    w, b, x = rand(OUT, IN), rand(OUT), rand(3, 4, IN)
    layer = fp8_layer(cls, IN, OUT, bias=True)
    assert layer.weight.dtype == FP8 and torch.isnan(layer.weight_scale).all()  # until loaded
    layer.weight_loader(layer.weight, w)
    layer.weight_loader(layer.bias, b)
    q, s = quantize_weight(w)
    assert torch.equal(layer.weight.float(), q.float()) and torch.equal(layer.weight_scale, s)
    y = layer(x)
    assert y.shape == (3, 4, OUT)
    torch.testing.assert_close(y.reshape(12, OUT), w8a8(x.reshape(12, IN), w) + b, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_parts_load_as_they_are_with_per_tensor_scales_spread_over_their_rows():
    """q, k, v stored in float8 with one scale each (per tensor): the fused layer holds their
    values unchanged and each part's scale on its own rows."""
    x = rand(5, IN)
    parts = {"q": rand(4 * 4, IN), "k": rand(2 * 4, IN), "v": rand(2 * 4, IN)}
    qkv = fp8_layer(QKVParallelLinear, IN, head_dim=4, num_heads=4, num_kv_heads=2)
    expected = []
    for sid, w in parts.items():
        scale = w.abs().max() / 448
        stored = (w / scale).to(FP8)
        qkv.weight_loader(qkv.weight, stored, sid)
        tensor_scale = qkv.checkpoint_tensor("weight_scale", scale.reshape(1), sid)
        qkv.weight_loader(qkv.weight_scale, tensor_scale, sid)
        expected.append(stored.float() * scale)
    full = torch.cat(expected)
    assert torch.equal(qkv.weight.float(), torch.cat([qkv_part.float() for qkv_part in
                                                      [(w / (w.abs().max() / 448)).to(FP8)
                                                       for w in parts.values()]]))
    torch.testing.assert_close(dequantize_weight(qkv.weight, qkv.weight_scale), full)
    xq, xs = quantize_rows(x)
    torch.testing.assert_close(qkv(x), (xq.float() * xs) @ full.T, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_scale_of_shape_rows_by_one_is_taken_per_row():
    merged = fp8_layer(MergedColumnParallelLinear, IN, [OUT, OUT])
    for part in (0, 1):
        wq, ws = quantize_weight(rand(OUT, IN))
        merged.weight_loader(merged.weight, wq, part)
        merged.weight_loader(merged.weight_scale,
                             merged.checkpoint_tensor("weight_scale", ws.reshape(OUT, 1), part), part)
        rows = slice(part * OUT, (part + 1) * OUT)
        assert torch.equal(merged.weight[rows].float(), wq.float())
        assert torch.equal(merged.weight_scale[rows], ws)


def test_wrong_dtypes_are_refused_by_name():
    layer = fp8_layer(ColumnParallelLinear, IN, OUT)
    with pytest.raises(ValueError, match="int8"):
        layer.weight_loader(layer.weight, torch.zeros(OUT, IN, dtype=torch.int8))
    plain = ColumnParallelLinear(IN, OUT)
    with pytest.raises(ValueError, match="not quantized"):
        plain.weight_loader(plain.weight, torch.zeros(OUT, IN, dtype=FP8))


@pytest.mark.parametrize("size", [2, 4])
def test_column_parallel_ranks_hold_their_rows_and_scales(size):
    """Each rank quantizes exactly its rows: the ranks' outputs side by side equal one rank's."""
    x, gate, up = rand(5, IN), rand(OUT, IN), rand(OUT, IN)
    whole = fp8_layer(MergedColumnParallelLinear, IN, [OUT, OUT])
    whole.weight_loader(whole.weight, gate, 0)
    whole.weight_loader(whole.weight, up, 1)
    outs = []
    for r in range(size):
        shard = fp8_layer(MergedColumnParallelLinear, IN, [OUT, OUT], tp_rank=r, tp_size=size)
        shard.weight_loader(shard.weight, gate, 0)
        shard.weight_loader(shard.weight, up, 1)
        rows = OUT // size
        assert torch.equal(shard.weight_scale[:rows], whole.weight_scale[r * rows:(r + 1) * rows])
        outs.append(shard(x).split(rows, dim=-1))
    y = whole(x)
    torch.testing.assert_close(torch.cat([o[0] for o in outs] + [o[1] for o in outs], -1), y)


def test_qkv_ranks_with_replicated_kv_heads_take_the_scales_of_their_heads():
    parts = {"q": rand(4 * 4, IN), "k": rand(1 * 4, IN), "v": rand(1 * 4, IN)}
    scaled = {sid: quantize_weight(w) for sid, w in parts.items()}
    for r in range(4):
        qkv = fp8_layer(QKVParallelLinear, IN, head_dim=4, num_heads=4, num_kv_heads=1,
                        tp_rank=r, tp_size=4)
        for sid, (wq, ws) in scaled.items():
            qkv.weight_loader(qkv.weight, wq, sid)
            qkv.weight_loader(qkv.weight_scale, ws, sid)
        assert torch.equal(qkv.weight_scale, torch.cat([scaled["q"][1][r * 4:(r + 1) * 4],
                                                        scaled["k"][1], scaled["v"][1]]))


def test_row_parallel_ranks_sum_to_the_whole_product():
    x, w = rand(5, IN), rand(OUT, IN)
    wq, ws = quantize_weight(w)
    total = 0
    for r in range(2):
        shard = fp8_layer(RowParallelLinear, IN, OUT, tp_rank=r, tp_size=2, reduce_results=False)
        shard.weight_loader(shard.weight, wq)  # an FP8 checkpoint: every rank its columns,
        shard.weight_loader(shard.weight_scale, ws)  # and the whole per-row scale
        assert torch.equal(shard.weight.float(), wq[:, r * IN // 2:(r + 1) * IN // 2].float())
        total = total + reference_linear(x[:, r * IN // 2:(r + 1) * IN // 2], shard.weight, ws, None)
    # each rank quantizes its half of x on its own: close to, not equal to, one rank's product
    full = reference_linear(x, wq, ws, None)
    assert (total - full).abs().max() < 0.05 * full.abs().max()


def test_quantizing_existing_weights_keeps_the_layer_working():
    w, x = rand(OUT, IN), rand(3, IN)
    layer = ColumnParallelLinear(IN, OUT)
    layer.weight.data.copy_(w)
    layer.set_quant_method(Fp8LinearMethod(), from_existing=True)
    torch.testing.assert_close(layer(x), w8a8(x, w), rtol=1e-5, atol=1e-5)
