"""Sweep paged-attention tile sizes on the GPU for prefill and mixed batches.

Cases: the Llama-3.1-8B attention shape (32/8 heads, dim 128) with the prefill of W-8B (64
prompts of 256) and of long prompts (4 x 2048), a mixed batch; the Llama-3.2-1B shape (32/8,
dim 64) with a W-hf-like prefill (16 prompts of 1024). bf16 cache, or float8 with --fp8.

Usage: python benchmarks/tune_attention.py [--fp8] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sweep, write_json  # noqa: E402
from benchmarks.kernel_bench import _batch, fp8_caches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fp8", action="store_true", help="float8 e4m3 KV cache (kv_cache_dtype=fp8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention, paged_attention_splits

    cases = {"8B_prefill_64x256": ((32, 8, 128), [256] * 64, [256] * 64),
             "8B_prefill_4x2048": ((32, 8, 128), [2048] * 4, [2048] * 4),
             "8B_mixed_2x2048+200dec": ((32, 8, 128), [2048] * 2 + [1500] * 200, [2048] * 2 + [1] * 200),
             "1B_prefill_16x1024": ((32, 8, 64), [1024] * 16, [1024] * 16)}
    out: dict = {}
    for name, ((h, hkv, d), ctx, q_lens) in cases.items():
        b = _batch(ctx, q_lens, h, hkv, d)
        if args.fp8:
            b = fp8_caches(b)
        default = do_bench(lambda: paged_attention(*b))
        flops = sum(4 * q * (c - q / 2) * h * d for c, q in zip(ctx, q_lens))  # causal QK and PV
        rows = sweep(name, ("block_m", "block_n", "warps", "stages"),
                     dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3)),
                     lambda block_m, block_n, warps, stages: do_bench(lambda: paged_attention_splits(
                         *b[:8], num_splits=1, tiles=(block_m, block_n, warps, stages))))
        for r in rows:
            r["tflops"] = round(flops / r["ms"] / 1e9, 1)
        out[name] = dict(default_ms=round(default, 4), default_tflops=round(flops / default / 1e9, 1), best=rows[:5])
        print(name, out[name], flush=True)
    write_json(args.json, dict(bench="tune_attention", kv_cache_dtype="fp8" if args.fp8 else "auto",
                               **machine_info(), figures=out))


if __name__ == "__main__":
    main()
