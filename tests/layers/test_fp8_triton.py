"""The Triton per-token FP8 quantizer against its torch reference (fp8.quantize_rows): on CUDA
exactly; on CPU through Triton's interpreter, whose float8 cast has one known flaw (below)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_fp8 (and so triton's jit) is imported

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not importable")

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.bfloat16, torch.float32] + ([torch.float16] if ON_GPU else [])


def _interpreter_cast_flaw(ref: torch.Tensor) -> torch.Tensor:
    """Where the interpreter's float8 cast is known to go wrong: a value that rounds up to a
    power of two (31.5 -> 32) comes out as the power below (16). It also rounds ties away from
    zero (5.25 -> 5.5, not 5): one float8 step. On CUDA the cast is the hardware's (ON_GPU)."""
    mag = ref.float().abs()
    return (mag > 0) & (torch.frexp(mag).mantissa == 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 300), (33, 4096 + 5)])
@pytest.mark.parametrize("cap", [None, 2.5])
def test_triton_quantizer_equals_the_reference(dtype, shape, cap):
    from batchllm.layers.quantization.fp8 import quantize_rows
    from batchllm.layers.quantization.triton_fp8 import per_token_quant

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    x[0, 0] = 40.0  # one outlier per first row; with the cap it saturates
    if shape[0] > 2:
        x[2] = 0.0  # a zero row quantizes to zeros with a positive scale
    x = x.to(DEVICE)
    q, scale = per_token_quant(x, cap)
    q_ref, scale_ref = quantize_rows(x, cap)
    assert q.dtype == q_ref.dtype and scale.shape == (shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    got, want = q.float().cpu(), q_ref.float().cpu()
    if ON_GPU:
        # x / scale is rounded to float32 differently in Triton (approximate division) and torch:
        # at most one float8 step apart, and nearly always equal
        assert ((got - want).abs() <= want.abs() / 8 + 2.0 ** -9).all()
        assert (got != want).float().mean() < 1e-3
    else:
        near = (got - want).abs() <= want.abs() / 8 + 2.0 ** -9  # one float8 e4m3 step
        halved = _interpreter_cast_flaw(want) & (got == want / 2)
        assert (near | halved).all()
        assert (got != want).float().mean() < 0.05


def test_the_quantizer_takes_a_row_slice_of_a_wider_tensor():
    from batchllm.layers.quantization.fp8 import quantize_rows
    from batchllm.layers.quantization.triton_fp8 import per_token_quant

    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    part = x[:, :64]  # row stride 96, last dim contiguous
    q, scale = per_token_quant(part)
    torch.testing.assert_close(scale, quantize_rows(part)[1], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="contiguous last dim"):
        per_token_quant(x.t())
    empty_q, empty_scale = per_token_quant(x[:0])
    assert empty_q.shape == (0, 96) and empty_scale.shape == (0, 1)
