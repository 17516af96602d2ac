"""Triton fused mixture-of-experts MLP (same contract as reference.fused_moe).

A step's T tokens each pick K experts: P = T * K token-expert pairs, pair p = t * K + k. The
pairs are grouped by expert and each expert's group is padded to a multiple of BLOCK_M, so every
tile of BLOCK_M rows belongs to one expert and one grouped GEMM serves all experts:

    sorted_ids:  [ e0 pairs | pad ][ e2 pairs ......... | pad ][ e5 pairs | pad ] ... sentinel P
    expert_ids:  [ 0        ][ 2       ][ 2       ][ 5       ]   (one entry per BLOCK_M tile)

    kernel 1 (per tile, per BLOCK_N columns of I):  h[p] = silu(x[t] W_gate[e]^T) * (x[t] W_up[e]^T)
    kernel 2 (per tile, per BLOCK_N columns of H):  y[p] = topk_weights[p] * h[p] W_down[e]^T
    out[t] = sum over k of y[t * K + k]

Nothing here reads a device value on the host: the grouping is a handful of torch ops on the
device, and the grid is sized for the worst case (P + min(E, P) * (BLOCK_M - 1) padded rows);
tiles past the actual padded length return at once. So a decode step with this kernel can be
captured in a CUDA graph. Block sizes are a first guess by pairs per expert (not yet tuned on a
GPU; benchmarks/kernel_tune.py is where a sweep would go).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from batchllm.kernels import interpreting


@dataclass(frozen=True, slots=True)
class MoeTiles:
    """Tile sizes of one launch (BLOCK_M is also the padding of each expert's group)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def moe_tiles(num_pairs: int, num_experts: int, device: torch.device) -> MoeTiles:
    """Tiles by the mean number of pairs per expert: decode batches give each expert a few rows,
    prefill steps hundreds."""
    if device.type != "cuda" or interpreting():
        return MoeTiles(16, 32, 32, 1, 4, 1)
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:
        return MoeTiles(16, 64, 64, 1, 4, 4)
    if per_expert <= 64:
        return MoeTiles(32, 64, 64, 4, 4, 4)
    return MoeTiles(64, 128, 64, 8, 8, 3)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the token-expert pairs by expert, each group padded to a multiple of block_m.

    Returns (sorted_ids [max_padded] int32: pair ids grouped by expert, P in padding slots;
    expert_ids [max_padded / block_m] int32: each tile's expert, num_experts past the end;
    num_padded [1] int64: how many leading slots are in use, a multiple of block_m). Sizes depend
    only on the shapes; values stay on the device."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank_in_group = torch.arange(num_pairs, device=device) - count_start[expert_of]
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    max_padded = triton.cdiv(max_padded, block_m) * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, padded_start[expert_of] + rank_in_group, order.to(torch.int32))
    tile_starts = torch.arange(0, max_padded, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, tile_starts, right=True).to(torch.int32)
    return sorted_ids, expert_ids, padded_end[-1:]


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, GROUP_M row tiles side by side so that programs
    running together share weight columns in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size, (pid % width) // size


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: no TF32 rounding, so float32 runs match the reference closely
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    num_pairs, top_k, num_m, N, K,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm, stride_hn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE: tl.constexpr,
):
    """h[p, n] = silu(x[t] . W[e, n]) * (x[t] . W[e, N + n]) for the pairs of one tile."""
    pid_m, pid_n = _tile(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pair < num_pairs
    token = pair // top_k
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        acc_g = _dot(a, tl.load(g_ptrs, mask=w_ok, other=0.0), acc_g, IEEE)
        acc_u = _dot(a, tl.load(u_ptrs, mask=w_ok, other=0.0), acc_u, IEEE)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + pair[:, None] * stride_hm + offs_n[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    num_pairs, num_m, N, K,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE: tl.constexpr,
):
    """y[p, n] = weight[p] * (h[p] . W[e, n]) for the pairs of one tile."""
    pid_m, pid_n = _tile(tl.program_id(0), num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pair < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + pair[:, None] * stride_hm + offs_k[None, :] * stride_hk
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, IEEE)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    tl.store(y_ptr + pair[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts MLP of routed tokens: sum over k of topk_weights[t, k] *
    down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k]; x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], topk_weights / topk_ids [T, K]. Returns [T, H] in x's dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if x.shape != (num_tokens, hidden) or w2.shape != (num_experts, hidden, inter) or two_i % 2:
        raise ValueError(f"fused_moe: shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk_ids {tuple(topk_ids.shape)} (expected x [T, H], "
                         f"w13 [E, 2I, H], w2 [E, H, I], topk_ids [T, K])")
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    tiles = moe_tiles(num_pairs, num_experts, x.device)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, num_experts, tiles.block_m)
    num_m = expert_ids.numel()
    weights = topk_weights.reshape(-1).float()
    ieee = x.dtype == torch.float32
    common = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                  GROUP_M=tiles.group_m, IEEE=ieee, num_warps=tiles.num_warps,
                  num_stages=tiles.num_stages)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(num_m * triton.cdiv(inter, tiles.block_n),)](
        x, w13, h, sorted_ids, expert_ids, num_padded, num_pairs, top_k, num_m, inter, hidden,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        h.stride(0), h.stride(1), **common)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_m * triton.cdiv(hidden, tiles.block_n),)](
        h, w2, y, weights, sorted_ids, expert_ids, num_padded, num_pairs, num_m, hidden, inter,
        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0), y.stride(1), **common)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
