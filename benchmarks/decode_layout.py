"""Decode attention under two cache layouts, on the GPU.

The cache is addressed as [blocks, block_size, kv_heads, head_dim] everywhere; its bytes can sit
in that order ("nhd": one key's heads side by side) or as [blocks, kv_heads, block_size,
head_dim] ("hnd": one head's keys of a block side by side, read as one run; the engine's
layout) — the kernels only see strides. For each workload decode batch, cache dtype (bf16, fp8)
and block size: KV read bandwidth of each layout with its best BLOCK_N, warp count and
stage count.
(At 7ce6cec this script also compared launch orders; RESULTS.md has those figures.)

Usage: python benchmarks/decode_layout.py [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sweep, write_json  # noqa: E402
from benchmarks.kernel_bench import fp8_caches, hnd  # noqa: E402
from benchmarks.tune_decode import decode_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    import batchllm.kernels.triton_attention as ta

    cases = {"8B_512x384": (32, 8, 128, [384] * 512), "1B_512x672": (32, 8, 64, [672] * 512)}
    out: dict = {}
    for name, (h, hkv, d, ctx) in cases.items():
        for block_size in (16, 32):
            b, kv_bytes = decode_batch(h, hkv, d, ctx, block_size, head_major=False)
            for dtype in ("bf16", "fp8"):
                bb, nbytes = b, kv_bytes
                if dtype == "fp8":
                    bb = fp8_caches(b)
                    nbytes //= 2
                ref = ta.paged_attention(*bb, max(ctx)).float()
                for layout in ("nhd", "hnd"):
                    lb = bb if layout == "nhd" else (bb[0], hnd(bb[1]), hnd(bb[2]), *bb[3:])
                    err = (ta.paged_attention(*lb, max(ctx)).float() - ref).abs().max().item()
                    rows = sweep(name, ("block_n", "warps", "stages"),
                                 dict(block_n=(32, 64, 128) if dtype == "bf16" or d == 128 else (32, 64, 128, 256),
                                      warps=(2, 4), stages=(2, 3)),
                                 lambda block_n, warps, stages: do_bench(lambda: ta.paged_attention_splits(
                                     *lb, num_splits=1, tiles=(16, block_n, warps, stages))))
                    best = rows[0]
                    key = f"{name}/bs{block_size}/{dtype}/{layout}"
                    out[key] = dict(GBps=round(nbytes / best["ms"] / 1e6, 1), ms=best["ms"],
                                    block_n=best["block_n"], warps=best["warps"], stages=best["stages"],
                                    max_abs_diff=err,
                                    all={f"{r['block_n']}/{r['warps']}/{r['stages']}": r["ms"] for r in rows})
                    print(key, out[key], flush=True)
    write_json(args.json, dict(bench="decode_layout", **machine_info(), figures=out))


if __name__ == "__main__":
    main()
