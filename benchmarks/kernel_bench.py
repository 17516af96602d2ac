"""Triton paged-attention speed on the GPU: decode bandwidth, split-KV gain, prefill vs SDPA.

Usage: python benchmarks/kernel_bench.py [--json OUT]
Shapes are Llama-3.1-8B's attention (32 query heads, 8 KV heads, head dim 128), bf16, block 16.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_json  # noqa: E402

H, HKV, D, BS = 32, 8, 128, 16


def hnd(cache: torch.Tensor) -> torch.Tensor:
    """The same values stored as the engine stores them (each block's KV heads outermost in
    memory, runner/kv_cache.py), viewed in the usual [blocks, block_size, kv_heads, head_dim]."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def fp8_caches(args: tuple) -> tuple:
    """Paged-attention arguments with the K and V caches cast to float8 e4m3 (memory order kept)."""
    return (args[0], args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn), *args[3:])


def _batch(ctx: list[int], q_lens: list[int], heads: int = H, kv_heads: int = HKV, dim: int = D,
           block_size: int = BS, head_major: bool = True):
    """Paged-attention arguments for requests of these context and query lengths (bf16, block 16
    unless given, KV blocks scattered at random). The caches are stored as the engine stores
    them (hnd) unless head_major is False (the plain [blocks, block_size, kv_heads, head_dim])."""
    dev = torch.device("cuda")
    need = [(c + block_size - 1) // block_size for c in ctx]
    nb = sum(need)
    k_cache = torch.randn(nb, block_size, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    v_cache = torch.randn_like(k_cache)
    if head_major:
        k_cache, v_cache = hnd(k_cache), hnd(v_cache)
    perm = torch.randperm(nb, device=dev).to(torch.int32)
    tables = torch.zeros(len(ctx), max(need), dtype=torch.int32, device=dev)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), heads, dim, dtype=torch.bfloat16, device=dev)
    qsl = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
    seq = torch.tensor(ctx, dtype=torch.int32, device=dev)
    return q, k_cache, v_cache, tables, seq, qsl, dim ** -0.5, max(q_lens), max(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention, paged_attention_splits

    res: dict = {}
    kv_bytes_per_tok = 2 * HKV * D * 2
    # decode: 256 requests x 1024 context; memory bound, so report KV read bandwidth
    b = _batch([1024] * 256, [1] * 256)
    ms = do_bench(lambda: paged_attention(*b))
    res["decode_256x1024_ms"] = round(ms, 4)
    res["decode_256x1024_kv_GBps"] = round(256 * 1024 * kv_bytes_per_tok / ms / 1e6, 1)
    # few long decodes: split-KV vs one pass
    b = _batch([16384] * 4, [1] * 4)
    one = do_bench(lambda: paged_attention_splits(*b[:8], num_splits=1))
    auto = do_bench(lambda: paged_attention(*b))
    res["decode_4x16k_single_pass_ms"] = round(one, 4)
    res["decode_4x16k_auto_split_ms"] = round(auto, 4)
    res["decode_4x16k_split_speedup"] = round(one / auto, 2)
    res["decode_4x16k_auto_kv_GBps"] = round(4 * 16384 * kv_bytes_per_tok / auto / 1e6, 1)
    # prefill: 4 x 2048-token prompts vs SDPA (flash) on contiguous tensors, causal
    b = _batch([2048] * 4, [2048] * 4)
    ms = do_bench(lambda: paged_attention(*b))
    q = torch.randn(4, H, 2048, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(4, HKV, 2048, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    flops = 4 * 4 * H * D * 2048 * 2048 / 2  # causal: half of QK^T and PV
    res["prefill_4x2048_ms"] = round(ms, 4)
    res["prefill_4x2048_TFLOPs"] = round(flops / ms / 1e9, 1)
    res["prefill_sdpa_ms"] = round(sdpa, 4)
    res["prefill_triton_over_sdpa_time"] = round(ms / sdpa, 2)
    write_json(args.json, dict(bench="kernels", **machine_info(), figures=res))


if __name__ == "__main__":
    main()
