"""Sweep decode-attention launch settings on the GPU for the decode batches of the workloads.

Cases (bf16, block 16, KV blocks scattered at random): the 8B shape (32/8 heads, dim 128) with
512 requests at 384 tokens, the 1B shape (32/8, dim 64) with 512 at 672, the 0.6B shape (16/8,
dim 128) with 256 requests of 100..1900 tokens. For each: KV read bandwidth of the default
launch and of every (BLOCK_N, warps, stages, splits) tried, best first.

Usage: python benchmarks/tune_decode.py [--json OUT]
"""
from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_json  # noqa: E402

BS = 16


def decode_batch(heads: int, kv_heads: int, dim: int, ctx: list[int]):
    dev = torch.device("cuda")
    need = [(c + BS - 1) // BS for c in ctx]
    nb = sum(need)
    k_cache = torch.randn(nb, BS, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(nb, device=dev).to(torch.int32)
    tables = torch.zeros(len(ctx), max(need), dtype=torch.int32, device=dev)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(len(ctx), heads, dim, dtype=torch.bfloat16, device=dev)
    qsl = torch.arange(len(ctx) + 1, dtype=torch.int32, device=dev)
    seq = torch.tensor(ctx, dtype=torch.int32, device=dev)
    kv_bytes = sum(ctx) * 2 * kv_heads * dim * 2
    return (q, k_cache, v_cache, tables, seq, qsl, dim ** -0.5, 1), kv_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention, paged_attention_splits

    rng = random.Random(0)
    cases = {"8B_512x384": (32, 8, 128, [384] * 512),
             "1B_512x672": (32, 8, 64, [672] * 512),
             "0.6B_256xvar": (16, 8, 128, [rng.randint(100, 1900) for _ in range(256)])}
    out: dict = {}
    for name, (h, hkv, d, ctx) in cases.items():
        b, kv_bytes = decode_batch(h, hkv, d, ctx)
        ms = do_bench(lambda: paged_attention(*b, max(ctx)))
        rows = []
        for bn, w, st, sp in itertools.product((32, 64, 128), (4, 8), (2, 3), (1, 2)):
            try:
                t = do_bench(lambda: paged_attention_splits(*b, num_splits=sp, tiles=(16, bn, w, st)))
            except Exception as exc:  # out of shared memory etc.
                print(name, bn, w, st, sp, type(exc).__name__)
                continue
            rows.append(dict(ms=round(t, 4), GBps=round(kv_bytes / t / 1e6, 1), block_n=bn, warps=w,
                             stages=st, splits=sp))
        rows.sort(key=lambda r: r["ms"])
        out[name] = dict(default_ms=round(ms, 4), default_GBps=round(kv_bytes / ms / 1e6, 1), best=rows[:8])
        print(name, out[name], flush=True)
    write_json(args.json, dict(bench="tune_decode", **machine_info(), figures=out))


if __name__ == "__main__":
    main()
