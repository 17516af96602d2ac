"""Diagnostics for the float8 KV cache on the GPU: Triton write vs torch cast, decode attention speed.

Usage: python benchmarks/fp8_diag.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import fp8_caches  # noqa: E402
from benchmarks.tune_decode import decode_batch  # noqa: E402


def main() -> None:
    from triton.testing import do_bench

    from batchllm.kernels import reference, triton_attention, triton_cache

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(4096, 8, 128, generator=g) * 50).bfloat16().to(dev)
    slots = torch.arange(4096, device=dev)
    caches = [torch.zeros(256, 16, 8, 128, dtype=torch.float8_e4m3fn, device=dev) for _ in range(4)]
    reference.write_kv(k, k, caches[0], caches[1], slots)
    triton_cache.write_kv(k, k, caches[2], caches[3], slots)
    a, b = caches[0].flatten(), caches[2].flatten()
    bad = (a.view(torch.uint8) != b.view(torch.uint8)).nonzero().flatten()
    kf = k.flatten().float()
    print("write mismatches", bad.numel(), "of", a.numel())
    for i in bad[:10].tolist():
        print("  x", kf[i].item(), "torch", a[i].float().item(), "triton", b[i].float().item())
    for name, (h, hkv, d, ctx) in {"8B_512x384": (32, 8, 128, [384] * 512),
                                   "1B_512x672": (32, 8, 64, [672] * 512)}.items():
        for block_size in (16, 32, 64):
            args, kv_bytes = decode_batch(h, hkv, d, ctx, block_size)
            ms = do_bench(lambda: triton_attention.paged_attention(*args, max(ctx)))
            f8 = fp8_caches(args)
            ms8 = do_bench(lambda: triton_attention.paged_attention(*f8, max(ctx)))
            print(name, f"block {block_size}: bf16 {ms:.4f} ms ({kv_bytes / ms / 1e6:.0f} GB/s)  fp8 {ms8:.4f} ms "
                  f"({kv_bytes / 2 / ms8 / 1e6:.0f} GB/s of fp8 bytes)", flush=True)

if __name__ == "__main__":
    main()
