"""Decode attention when the requests' contexts differ (W-hf's decode batch), on the GPU.

W-hf decodes 512 requests whose contexts spread from ~64 to ~1280 tokens. With two-warp
programs the whole grid is resident at once, so a kernel lasts as long as its busiest SMs; the
order in which programs start then matters. This times, on a head-major float8 and bf16 cache
(block 32, the 1B shape): the same total context spread evenly, the W-hf spread in arrival
order, and the W-hf spread with the longest requests first; for a few tile settings.

Usage: python benchmarks/decode_balance.py [--json OUT]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.kernel_bench import fp8_caches  # noqa: E402
from benchmarks.tune_decode import decode_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    import batchllm.kernels.triton_attention as ta

    rng = random.Random(0)
    spread = [rng.randint(64, 1024) + rng.randint(0, 256) for _ in range(512)]
    even = [sum(spread) // len(spread)] * len(spread)
    orders = {"even": even, "spread_arrival": spread, "spread_longest_first": sorted(spread, reverse=True),
              "spread_shortest_first": sorted(spread)}
    out: dict = {}
    for dtype in ("fp8", "bf16"):
        for name, ctx in orders.items():
            b, kv_bytes = decode_batch(32, 8, 64, ctx, 32)
            if dtype == "fp8":
                b = fp8_caches(b)
                kv_bytes //= 2
            row = {}
            for block_n, warps, stages in ((32, 2, 2), (32, 4, 2), (64, 4, 2), (64, 2, 2)):
                ms = do_bench(lambda: ta.paged_attention_splits(*b, num_splits=1, tiles=(16, block_n, warps, stages)))
                row[f"{block_n}/{warps}/{stages}"] = dict(ms=round(ms, 4), GBps=round(kv_bytes / ms / 1e6, 1))
            out[f"{dtype}/{name}"] = row
            print(dtype, name, row, flush=True)
    write_json(args.json, dict(bench="decode_balance", **machine_info(), figures=out))


if __name__ == "__main__":
    main()
