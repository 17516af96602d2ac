"""W-hf's decode attention launch (1B shape, 512 requests, contexts 64..1280, longest first,
block 32) for a profiler such as Nsight Compute: warms the kernel up, then launches it --launches
more times, with a float8 or a bf16 cache. Without a profiler it prints the time and bandwidth.

Usage: ncu --kernel-name regex:_paged_attention --launch-skip 1 --launch-count 1 \
           python benchmarks/ncu_decode.py --dtype fp8
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import fp8_caches  # noqa: E402
from benchmarks.tune_decode import decode_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--launches", type=int, default=1)
    ap.add_argument("--tiles", action="append", default=[],
                    help="BLOCK_M,BLOCK_N,warps,stages instead of the defaults (repeat: time each)")
    args = ap.parse_args()
    from triton.testing import do_bench

    import batchllm.kernels.triton_attention as ta

    rng = random.Random(0)
    ctx = sorted((rng.randint(64, 1024) + rng.randint(0, 256) for _ in range(512)), reverse=True)
    b, kv_bytes = decode_batch(32, 8, 64, ctx, 32)
    if args.dtype == "fp8":
        b, kv_bytes = fp8_caches(b), kv_bytes // 2
    for t in args.tiles or [None]:
        tiles = tuple(int(x) for x in t.split(",")) if t else None

        def run():
            return ta.paged_attention_splits(*b, num_splits=1, tiles=tiles)

        run()
        torch.cuda.synchronize()
        for _ in range(args.launches):
            run()
        torch.cuda.synchronize()
        ms = do_bench(run)
        print(f"{args.dtype} tiles={tiles}: {ms:.4f} ms, {kv_bytes / ms / 1e6:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
