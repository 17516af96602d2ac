"""Sweep paged-attention tile sizes on the GPU (prefill and decode shapes of kernel_bench.py).

Usage: python benchmarks/tune_attention.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import _batch  # noqa: E402


def main() -> None:
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention_splits

    cases = {"prefill_4x2048": _batch([2048] * 4, [2048] * 4),
             "mixed_2x2048+200dec": _batch([2048] * 2 + [1500] * 200, [2048] * 2 + [1] * 200),
             "decode_256x1024": _batch([1024] * 256, [1] * 256)}
    for name, b in cases.items():
        results = []
        block_ms = (16, 32) if name.startswith("decode") else (64, 128)
        for bm, bn, w, st in itertools.product(block_ms, (32, 64, 128), (4, 8), (2, 3)):
            try:
                ms = do_bench(lambda: paged_attention_splits(*b[:8], num_splits=1, tiles=(bm, bn, w, st)))
            except Exception as exc:  # out of shared memory etc.
                ms = float("inf")
                print(name, bm, bn, w, st, type(exc).__name__)
            results.append((ms, bm, bn, w, st))
        results.sort()
        print(name, "best (ms, BLOCK_M, BLOCK_N, warps, stages):", results[:5])


if __name__ == "__main__":
    main()
