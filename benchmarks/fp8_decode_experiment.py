"""Experiment: decode attention over a float8 KV cache on CUDA cores (no matrix units).

The library kernel pads each decode program to 16 query rows for tl.dot (4 of them real with GQA
group 4) and converts every float8 tile to float16 for the matrix units. This variant computes
q.k and p.v as broadcast products summed on CUDA cores over exactly the group's rows. Compared
here with the library kernel on the decode batches of tune_decode.py; correctness checked against
the torch reference. Usage: python benchmarks/fp8_decode_experiment.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_decode import decode_batch  # noqa: E402


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_cc_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_ptr, scale,
                      stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                      stride_ot, stride_oh, stride_bt,
                      GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      CB: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(seq_ptr + b)
    g = tl.arange(0, GROUP_P)
    g_ok = g < GROUP
    d = tl.arange(0, D)
    head = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qt + head[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32) * (scale * 1.4426950408889634)
    m = tl.full([GROUP_P], -1.0e30, tl.float32)
    l = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    kb = k_ptr + kvh * stride_kh
    vb = v_ptr + kvh * stride_vh
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < ctx
        blk = tl.load(bt_ptr + b * stride_bt + n // CB, mask=n_ok, other=0).to(tl.int64)
        off = blk * stride_kb + (n % CB) * stride_ks
        k = tl.load(kb + off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BLOCK_N]
        s = tl.where(n_ok[None, :], s, -1.0e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        voff = blk * stride_vb + (n % CB) * stride_vs
        v = tl.load(vb + voff[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None])


def decode_cc(q, k_cache, v_cache, tables, seq_lens, scale, block_n, warps, stages):
    t, h, d = q.shape
    hkv = k_cache.shape[2]
    group = h // hkv
    out = torch.empty_like(q)
    _decode_cc_kernel[(t, hkv)](q, k_cache, v_cache, out, tables, seq_lens, float(scale),
                                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                                out.stride(0), out.stride(1), tables.stride(0),
                                GROUP=group, GROUP_P=triton.next_power_of_2(group), D=d, BLOCK_N=block_n,
                                CB=k_cache.shape[1], num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    from triton.testing import do_bench

    from batchllm.kernels import reference, triton_attention

    for name, (h, hkv, d, ctx) in {"8B_512x384": (32, 8, 128, [384] * 512),
                                   "1B_512x672": (32, 8, 64, [672] * 512)}.items():
        args, kv_bytes = decode_batch(h, hkv, d, ctx)
        f8 = list(args)
        f8[1], f8[2] = args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn)
        q, kc, vc, tables, seq, qsl, scale, _ = f8
        lib = do_bench(lambda: triton_attention.paged_attention(*f8, max(ctx)))
        want = reference.paged_attention(*f8, max(ctx)).float()
        print(name, f"library fp8 {lib:.4f} ms ({kv_bytes / 2 / lib / 1e6:.0f} GB/s)", flush=True)
        rows = []
        for bn, w, st in itertools.product((16, 32, 64), (2, 4, 8), (1, 2, 3)):
            try:
                got = decode_cc(q, kc, vc, tables, seq, scale, bn, w, st).float()
                err = (got - want).abs().max().item()
                ms = do_bench(lambda: decode_cc(q, kc, vc, tables, seq, scale, bn, w, st))
            except Exception as exc:
                print("  ", bn, w, st, type(exc).__name__, str(exc)[:100])
                continue
            rows.append((ms, bn, w, st, err))
        rows.sort()
        for ms, bn, w, st, err in rows[:6]:
            print(f"   cuda-core BLOCK_N {bn} warps {w} stages {st}: {ms:.4f} ms "
                  f"({kv_bytes / 2 / ms / 1e6:.0f} GB/s), max err {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
