"""Decode attention over a prefix every request shares: plain paged attention vs the shared-prefix
(cascade) path, and a sweep of the shared-key kernel's launch settings.

Cases (bf16, block 16): W-prefix's decode batch on the Llama-3.2-1B shape (512 requests, a
2048-token shared prefix, 64..192 tokens of their own), the Llama-3.1-8B shape (256 requests,
1024 shared, 256 own), and a small batch with long contexts of its own (8B shape, 8 requests,
2048 shared, 8192 own: there the own keys are split as the plain kernel splits whole contexts). Usage: python benchmarks/shared_prefix_bench.py [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sweep, write_json  # noqa: E402
from benchmarks.kernel_bench import BS, _batch  # noqa: E402


def shared_batch(heads: int, kv_heads: int, dim: int, num_reqs: int, prefix: int, own: list[int]):
    ctx = [prefix + o for o in own[:num_reqs]]
    args = list(_batch(ctx, [1] * num_reqs, heads, kv_heads, dim))
    args[3][:, :prefix // BS] = args[3][0, :prefix // BS]
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    from batchllm.kernels.triton_attention import paged_attention, shared_prefix_attention

    cases = {"1B_512_prefix2048": (32, 8, 64, 512, 2048, [64 + (i * 37) % 129 for i in range(512)]),
             "8B_256_prefix1024": (32, 8, 128, 256, 1024, [256] * 256),
             "8B_8_prefix2048_own8192": (32, 8, 128, 8, 2048, [8192] * 8)}
    out: dict = {}
    for name, (h, hkv, d, n, prefix, own) in cases.items():
        b = shared_batch(h, hkv, d, n, prefix, own)
        plen = torch.tensor([prefix], dtype=torch.int32, device="cuda")
        want = paged_attention(*b)
        got = paged_attention(*b, shared_prefix_len=plen)
        err = (got.float() - want.float()).abs().max().item()
        plain = do_bench(lambda: paged_attention(*b))
        shared = do_bench(lambda: paged_attention(*b, shared_prefix_len=plen))
        rows = sweep(name, ("block_m", "block_n", "warps", "stages", "splits"),
                     dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3),
                          splits=(None, 1, 4, 8)),
                     lambda block_m, block_n, warps, stages, splits: do_bench(lambda: shared_prefix_attention(
                         *b[:7], plen, b[8], prefix_splits=splits, tiles=(block_m, block_n, warps, stages))))
        out[name] = dict(plain_ms=round(plain, 4), shared_ms=round(shared, 4), speedup=round(plain / shared, 2),
                         max_abs_err=err, best=rows[:8])
        print(name, out[name], flush=True)
    write_json(args.json, dict(bench="shared_prefix", **machine_info(), figures=out))


if __name__ == "__main__":
    main()
