"""The attention-kernel tuner: timings and launch-setting sweeps of the Triton paged-attention kernels
on the GPU, one case per question (caches head-major as the engine stores them, KV blocks
scattered at random; bf16, or float8 e4m3 with --fp8).

Cases (--case, several allowed):
  overview       Llama-3.1-8B attention (32/8 heads, dim 128, block 16): decode 256 x 1024 KV read
                 bandwidth; split-KV against one pass on 4 x 16k; prefill 4 x 2048 against SDPA.
  decode         decode batches of the workloads (block 32 unless --block-size): 8B 512 x 384,
                 1B 512 x 672, 0.6B 256 x 100..1900; default launch and every (BLOCK_N, warps,
                 stages) tried, as KV read bandwidth, best first.
  prefill        prefill and mixed batches (8B 64 x 256, 4 x 2048, 2 x 2048 + 200 decodes; 1B
                 16 x 1024): default and every (BLOCK_M, BLOCK_N, warps, stages), TFLOP/s.
  shared-prefix  decode over a prefix every request shares: plain paged attention against the
                 shared-prefix (cascade) path, and a sweep of the shared-key kernel's settings (1B
                 512 x (2048 shared + 64..192 own); 8B 256 x (1024 + 256); 8B 8 x (2048 + 8192)).
  layout         decode under both cache byte orders (nhd: [block, pos, head]; hnd: [block, head,
                 pos], the engine's), bf16 and float8, blocks of 16 and 32, best tile of each.
  balance        W-hf's spread of decode contexts (1B, block 32): even contexts, arrival order,
                 longest first, shortest first, for a few tiles.
  ncu            W-hf's decode launch (longest first, block 32) for a profiler: warm-up, then
                 --launches more, per --tiles; prints time and bandwidth. Under Nsight Compute:
                 ncu --kernel-name regex:_paged_attention --launch-skip 1 --launch-count 1 \\
                     python benchmarks/kernel_tune.py --case ncu --fp8

Usage: python benchmarks/kernel_tune.py --case decode [--fp8] [--block-size N] [--json OUT]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, sweep, write_json  # noqa: E402
from benchmarks.kernel_batches import (decode_batch, fp8_caches, hnd, paged_batch, shared_batch,  # noqa: E402
                                       whf_decode_contexts)


DEVICE = "cuda"


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn)


def _ta():
    import batchllm.kernels.triton_attention as ta

    return ta


def _cast(b, nbytes: int, fp8: bool) -> tuple:
    return (fp8_caches(b), nbytes // 2) if fp8 else (b, nbytes)


def case_overview(args) -> dict:
    ta, res = _ta(), {}
    kv_bytes_per_tok = 2 * 8 * 128 * 2
    b = paged_batch([1024] * 256, [1] * 256, device=DEVICE)  # memory bound: report KV read bandwidth
    ms = _bench(lambda: ta.paged_attention(*b))
    res["decode_256x1024_ms"] = round(ms, 4)
    res["decode_256x1024_kv_GBps"] = round(256 * 1024 * kv_bytes_per_tok / ms / 1e6, 1)
    b = paged_batch([16384] * 4, [1] * 4, device=DEVICE)  # few long decodes: split-KV vs one pass
    one = _bench(lambda: ta.paged_attention_splits(*b[:8], num_splits=1))
    auto = _bench(lambda: ta.paged_attention(*b))
    res["decode_4x16k_single_pass_ms"] = round(one, 4)
    res["decode_4x16k_auto_split_ms"] = round(auto, 4)
    res["decode_4x16k_split_speedup"] = round(one / auto, 2)
    res["decode_4x16k_auto_kv_GBps"] = round(4 * 16384 * kv_bytes_per_tok / auto / 1e6, 1)
    b = paged_batch([2048] * 4, [2048] * 4, device=DEVICE)  # prefill vs SDPA (flash) on contiguous tensors, causal
    ms = _bench(lambda: ta.paged_attention(*b))
    q = torch.randn(4, 32, 2048, 128, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(4, 8, 2048, 128, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn_like(k)
    sdpa = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           enable_gqa=True))
    flops = 4 * 4 * 32 * 128 * 2048 * 2048 / 2  # causal: half of QK^T and PV
    res["prefill_4x2048_ms"] = round(ms, 4)
    res["prefill_4x2048_TFLOPs"] = round(flops / ms / 1e9, 1)
    res["prefill_sdpa_ms"] = round(sdpa, 4)
    res["prefill_triton_over_sdpa_time"] = round(ms / sdpa, 2)
    return res


def case_decode(args) -> dict:
    ta, rng, out = _ta(), random.Random(0), {}
    cases = {"8B_512x384": (32, 8, 128, [384] * 512), "1B_512x672": (32, 8, 64, [672] * 512),
             "0.6B_256xvar": (16, 8, 128, [rng.randint(100, 1900) for _ in range(256)])}
    for name, (h, hkv, d, ctx) in cases.items():
        b, kv_bytes = _cast(*decode_batch(h, hkv, d, ctx, args.block_size or 32, device=DEVICE), args.fp8)
        ms = _bench(lambda: ta.paged_attention(*b, max(ctx)))
        rows = sweep(name, ("block_n", "warps", "stages"), dict(block_n=(16, 32, 64), warps=(1, 2), stages=(2, 3)),
                     lambda block_n, warps, stages: _bench(lambda: ta.paged_attention_splits(
                         *b, num_splits=1, tiles=(16, block_n, warps, stages))))
        for r in rows:
            r["GBps"] = round(kv_bytes / r["ms"] / 1e6, 1)
        out[name] = dict(default_ms=round(ms, 4), default_GBps=round(kv_bytes / ms / 1e6, 1), best=rows[:8])
        print(name, out[name], flush=True)
    return out


def case_prefill(args) -> dict:
    ta, out = _ta(), {}
    cases = {"8B_prefill_64x256": ((32, 8, 128), [256] * 64, [256] * 64),
             "8B_prefill_4x2048": ((32, 8, 128), [2048] * 4, [2048] * 4),
             "8B_mixed_2x2048+200dec": ((32, 8, 128), [2048] * 2 + [1500] * 200, [2048] * 2 + [1] * 200),
             "1B_prefill_16x1024": ((32, 8, 64), [1024] * 16, [1024] * 16)}
    for name, ((h, hkv, d), ctx, q_lens) in cases.items():
        b = paged_batch(ctx, q_lens, h, hkv, d, args.block_size or 16, device=DEVICE)
        b = fp8_caches(b) if args.fp8 else b
        default = _bench(lambda: ta.paged_attention(*b))
        flops = sum(4 * q * (c - q / 2) * h * d for c, q in zip(ctx, q_lens))  # causal QK and PV
        rows = sweep(name, ("block_m", "block_n", "warps", "stages"),
                     dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3)),
                     lambda block_m, block_n, warps, stages: _bench(lambda: ta.paged_attention_splits(
                         *b[:8], num_splits=1, tiles=(block_m, block_n, warps, stages))))
        for r in rows:
            r["tflops"] = round(flops / r["ms"] / 1e9, 1)
        out[name] = dict(default_ms=round(default, 4), default_tflops=round(flops / default / 1e9, 1), best=rows[:5])
        print(name, out[name], flush=True)
    return out


def case_shared_prefix(args) -> dict:
    ta, out = _ta(), {}
    bs = args.block_size or 16
    cases = {"1B_512_prefix2048": (32, 8, 64, 2048, [64 + (i * 37) % 129 for i in range(512)]),
             "8B_256_prefix1024": (32, 8, 128, 1024, [256] * 256),
             "8B_8_prefix2048_own8192": (32, 8, 128, 2048, [8192] * 8)}
    for name, (h, hkv, d, prefix, own) in cases.items():
        b = shared_batch(h, hkv, d, prefix, own, bs, device=DEVICE)
        plen = torch.tensor([prefix], dtype=torch.int32, device=DEVICE)
        err = (ta.paged_attention(*b, shared_prefix_len=plen).float() - ta.paged_attention(*b).float()).abs().max().item()
        plain = _bench(lambda: ta.paged_attention(*b))
        shared = _bench(lambda: ta.paged_attention(*b, shared_prefix_len=plen))
        rows = sweep(name, ("block_m", "block_n", "warps", "stages", "splits"),
                     dict(block_m=(64, 128), block_n=(32, 64, 128), warps=(4, 8), stages=(2, 3),
                          splits=(None, 1, 4, 8)),
                     lambda block_m, block_n, warps, stages, splits: _bench(lambda: ta.shared_prefix_attention(
                         *b[:7], plen, b[8], prefix_splits=splits, tiles=(block_m, block_n, warps, stages))))
        out[name] = dict(plain_ms=round(plain, 4), shared_ms=round(shared, 4), speedup=round(plain / shared, 2),
                         max_abs_err=err, best=rows[:8])
        print(name, out[name], flush=True)
    return out


def case_layout(args) -> dict:
    ta, out = _ta(), {}
    for name, (h, hkv, d, ctx) in {"8B_512x384": (32, 8, 128, [384] * 512),
                                   "1B_512x672": (32, 8, 64, [672] * 512)}.items():
        for block_size in (16, 32):
            plain = decode_batch(h, hkv, d, ctx, block_size, head_major=False, device=DEVICE)
            for dtype in ("bf16", "fp8"):
                bb, nbytes = _cast(*plain, dtype == "fp8")
                ref = ta.paged_attention(*bb, max(ctx)).float()
                for layout in ("nhd", "hnd"):
                    lb = bb if layout == "nhd" else (bb[0], hnd(bb[1]), hnd(bb[2]), *bb[3:])
                    err = (ta.paged_attention(*lb, max(ctx)).float() - ref).abs().max().item()
                    rows = sweep(name, ("block_n", "warps", "stages"),
                                 dict(block_n=(32, 64, 128) if dtype == "bf16" or d == 128 else (32, 64, 128, 256),
                                      warps=(1, 2, 4), stages=(2, 3)),
                                 lambda block_n, warps, stages: _bench(lambda: ta.paged_attention_splits(
                                     *lb, num_splits=1, tiles=(16, block_n, warps, stages))))
                    best, key = rows[0], f"{name}/bs{block_size}/{dtype}/{layout}"
                    out[key] = dict(GBps=round(nbytes / best["ms"] / 1e6, 1), ms=best["ms"],
                                    block_n=best["block_n"], warps=best["warps"], stages=best["stages"],
                                    max_abs_diff=err,
                                    all={f"{r['block_n']}/{r['warps']}/{r['stages']}": r["ms"] for r in rows})
                    print(key, out[key], flush=True)
    return out


def case_balance(args) -> dict:
    ta, out = _ta(), {}
    spread = whf_decode_contexts()
    orders = {"even": [sum(spread) // len(spread)] * len(spread), "spread_arrival": spread,
              "spread_longest_first": sorted(spread, reverse=True), "spread_shortest_first": sorted(spread)}
    for dtype in ("fp8", "bf16"):
        for name, ctx in orders.items():
            b, kv_bytes = _cast(*decode_batch(32, 8, 64, ctx, args.block_size or 32, device=DEVICE), dtype == "fp8")
            row = {}
            for block_n, warps, stages in ((32, 1, 2), (32, 2, 2), (32, 4, 2), (64, 4, 2), (64, 2, 2)):
                ms = _bench(lambda: ta.paged_attention_splits(*b, num_splits=1, tiles=(16, block_n, warps, stages)))
                row[f"{block_n}/{warps}/{stages}"] = dict(ms=round(ms, 4), GBps=round(kv_bytes / ms / 1e6, 1))
            out[f"{dtype}/{name}"] = row
            print(dtype, name, row, flush=True)
    return out


def case_ncu(args) -> dict:
    ta, out = _ta(), {}
    ctx = sorted(whf_decode_contexts(), reverse=True)
    b, kv_bytes = _cast(*decode_batch(32, 8, 64, ctx, args.block_size or 32, device=DEVICE), args.fp8)
    for t in args.tiles or [None]:
        tiles = tuple(int(x) for x in t.split(",")) if t else None

        def run():
            return ta.paged_attention_splits(*b, num_splits=1, tiles=tiles)

        run()
        torch.cuda.synchronize()
        for _ in range(args.launches):
            run()
        torch.cuda.synchronize()
        ms = _bench(run)
        out[str(tiles or "default")] = dict(ms=round(ms, 4), GBps=round(kv_bytes / ms / 1e6, 1))
        print(f"{'fp8' if args.fp8 else 'bf16'} tiles={tiles}: {ms:.4f} ms, {kv_bytes / ms / 1e6:.1f} GB/s", flush=True)
    return out


CASES = {"overview": case_overview, "decode": case_decode, "prefill": case_prefill,
         "shared-prefix": case_shared_prefix, "layout": case_layout, "balance": case_balance, "ncu": case_ncu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", required=True, choices=list(CASES))
    ap.add_argument("--fp8", action="store_true", help="float8 e4m3 KV cache (decode, prefill, ncu)")
    ap.add_argument("--block-size", type=int, default=None, help="KV cache block size (default: the case's)")
    ap.add_argument("--launches", type=int, default=1, help="ncu: launches after the warm-up")
    ap.add_argument("--tiles", action="append", default=[], metavar="BLOCK_M,BLOCK_N,WARPS,STAGES",
                    help="ncu: launch settings instead of the defaults (repeat: time each)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_tune.py times Triton kernels: it needs a CUDA GPU")
    info = machine_info()
    figures = {case: CASES[case](args) for case in args.case}
    write_json(args.json, dict(bench="kernel_tune", cases=args.case, kv_cache_dtype="fp8" if args.fp8 else "auto",
                               block_size=args.block_size, **info, figures=figures))


if __name__ == "__main__":
    main()
