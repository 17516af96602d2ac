"""Sweep decode-attention launch settings on the GPU for the decode batches of the workloads.

Cases (bf16 or --fp8, block 32 unless --block-size, KV blocks scattered at random, head-major as
the engine stores them): the 8B shape (32/8 heads, dim 128) with
512 requests at 384 tokens, the 1B shape (32/8, dim 64) with 512 at 672, the 0.6B shape (16/8,
dim 128) with 256 requests of 100..1900 tokens. For each: KV read bandwidth of the default
launch and of every (BLOCK_N, warps, stages, splits) tried, best first.

Usage: python benchmarks/tune_decode.py [--fp8] [--block-size N] [--json OUT]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sweep, write_json  # noqa: E402
from benchmarks.kernel_bench import _batch, fp8_caches  # noqa: E402


def decode_batch(heads: int, kv_heads: int, dim: int, ctx: list[int], block_size: int = 16,
                 head_major: bool = True):
    """(paged_attention arguments without max_seq_len, K+V bytes read) of a decode-only batch
    (caches in the engine's memory order unless head_major is False; see kernel_bench._batch)."""
    args = _batch(ctx, [1] * len(ctx), heads, kv_heads, dim, block_size, head_major)[:8]
    return args, sum(ctx) * 2 * kv_heads * dim * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fp8", action="store_true", help="float8 e4m3 KV cache (kv_cache_dtype=fp8)")
    ap.add_argument("--block-size", type=int, default=32, help="KV cache block size (tokens)")
    args = ap.parse_args()
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention, paged_attention_splits

    rng = random.Random(0)
    cases = {"8B_512x384": (32, 8, 128, [384] * 512),
             "1B_512x672": (32, 8, 64, [672] * 512),
             "0.6B_256xvar": (16, 8, 128, [rng.randint(100, 1900) for _ in range(256)])}
    out: dict = {}
    for name, (h, hkv, d, ctx) in cases.items():
        b, kv_bytes = decode_batch(h, hkv, d, ctx, args.block_size)
        if args.fp8:
            b = fp8_caches(b)
            kv_bytes //= 2
        ms = do_bench(lambda: paged_attention(*b, max(ctx)))
        rows = sweep(name, ("block_n", "warps", "stages"), dict(block_n=(16, 32, 64), warps=(1, 2), stages=(2, 3)),
                     lambda block_n, warps, stages: do_bench(lambda: paged_attention_splits(
                         *b, num_splits=1, tiles=(16, block_n, warps, stages))))
        for r in rows:
            r["GBps"] = round(kv_bytes / r["ms"] / 1e6, 1)
        out[name] = dict(default_ms=round(ms, 4), default_GBps=round(kv_bytes / ms / 1e6, 1), best=rows[:8])
        print(name, out[name], flush=True)
    write_json(args.json, dict(bench="tune_decode", kv_cache_dtype="fp8" if args.fp8 else "auto",
                               **machine_info(), figures=out))


if __name__ == "__main__":
    main()
