"""Triton paged attention for mixed batches (prefill chunks + decode tokens), with a split-KV path.

Same signature and layouts as `reference.paged_attention`. One program owns one request, one KV
head and a tile of that request's query tokens; its rows are (query token, query head of the KV
head's group) pairs, so a GQA group shares each K/V tile it loads. Keys are visited in tiles of
BLOCK_N positions through the block table, with an online softmax accumulated in float32:

    keys of request b:  0 ............................ ctx-1
    queries of b:                      ctx-q_len ..... ctx-1   (query i sees keys <= its position)

Split-KV (flash-decoding): for decode-only batches with few requests and long contexts, each
(request, KV head) pair is also split along its keys into `num_splits` programs that write an
unnormalized partial result plus (max, sum) per row; a second kernel merges the partials.

Shared prefix (cascade): when every request of a decode-only batch starts with the same cache
blocks (a common system prompt, a few-shot preamble, the n samples of one prompt), those keys are
read once per KV head for the whole batch instead of once per request. One kernel attends every
(request, query head) row of a KV head to the shared keys, as one large tile of queries; the
main kernel attends each request to its own keys after the prefix; the merge kernel combines the
partials by their (max, sum), exactly as for split-KV:

    keys of request b:  [ shared prefix: block_tables[0, :P] ][ own keys ... ctx-1 ]
                          ^ all rows of the batch at once       ^ per request

Sliding window (a layer's constant W, compiled in only when given: the WINDOW flag): a query at
position p sees keys p - W + 1 .. p. A tile of queries starts at the key tile holding its first
query's first key; the tiles before the last query's first key are masked per row, as are the
causal diagonal's; those between need no mask. The shared-prefix path is not used with a window
(its keys are read whole for every row): such a layer runs the plain path.

    keys of request b:  0 .... [ masked | unmasked ......... | causal ] ctx-1
                               ^ first query's window start   ^ first query
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_MASKED = tl.constexpr(-1.0e30)  # finite, so a row whose tile is fully masked never produces inf - inf
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the merge than it saves
MAX_SPLITS = 64


def _grid(grid0: int, num_seqs: int, num_kv_heads: int) -> tuple[int, int, int]:
    """Launch order: the KV heads of one request side by side, then its query tiles or splits,
    then the requests (in seq_order where given). Programs running at the same time then read
    neighbouring bytes of the same cache blocks (benchmarks/decode_layout.py on an H100: decode
    1-9% faster than requests first, most with a float8 cache at head dim 64)."""
    return num_kv_heads, grid0, num_seqs


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, lo, end, hi, window, table_ptr, k_ptr, v_ptr,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            offs_d, d_ok, qk_scale, BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr,
            IEEE: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr):
    """Online-softmax update over key tiles [lo, end); MASK applies the causal and `hi` limits
    (and, with WINDOW, each row's window start)."""
    for start in range(lo, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if BLOCK_N <= CACHE_BLOCK:  # tiles start at multiples of BLOCK_N: one cache block each
            blk = tl.load(table_ptr + start // CACHE_BLOCK).to(tl.int64) + tl.zeros([BLOCK_N], dtype=tl.int64)
        elif MASK:
            blk = tl.load(table_ptr + offs_n // CACHE_BLOCK, mask=n_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(table_ptr + offs_n // CACHE_BLOCK).to(tl.int64)
        within = offs_n % CACHE_BLOCK
        k = tl.load(k_ptr + blk[None, :] * stride_kb + within[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale  # log2 domain: exp2 is the native instruction
        if MASK:
            if WINDOW:
                s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
                             & (offs_n[None, :] > q_pos[:, None] - window), s, _MASKED)
            else:
                s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, _MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + within[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_keys(q, q_pos, lo, win_end, full_end, hi, window, table_ptr, k_ptr, v_ptr,
                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                 offs_d, d_ok, scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 CACHE_BLOCK: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
                 WINDOW: tl.constexpr):
    """Unnormalized attention (acc, max, sum) of the rows of q to keys [lo, hi): the tiles before
    full_end unmasked, the rest with the causal (q_pos) and `hi` limits. WINDOW: the tiles
    [lo, win_end) are masked by each row's window start too (and so is the causal part)."""
    qk_scale = scale * 1.4426950408889634  # log2(e)
    if KV_FP8:
        # float8 K/V convert to float16 in one instruction per pair (bf16 takes several): compute
        # in float16, with q pre-scaled into the log2 domain (smaller, so it stays in range)
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0
    m_i = tl.full([BLOCK_M], _MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, lo, win_end, hi, window, table_ptr, k_ptr, v_ptr,
                                stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                offs_d, d_ok, qk_scale, BLOCK_N, CACHE_BLOCK, IEEE, True, True)
        lo = win_end
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, lo, full_end, hi, window, table_ptr, k_ptr, v_ptr,
                            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                            offs_d, d_ok, qk_scale, BLOCK_N, CACHE_BLOCK, IEEE, False, False)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, full_end, hi, hi, window, table_ptr, k_ptr, v_ptr,
                            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                            offs_d, d_ok, qk_scale, BLOCK_N, CACHE_BLOCK, IEEE, True, WINDOW)
    return acc, m_i, l_i


@triton.jit
def _store_partial(part_ptr, ml_ptr, tok, head, split, acc, m_i, l_i, row_ok, offs_d, d_ok,
                   stride_pt, stride_ph, stride_ps, stride_pd, stride_mlt, stride_mlh, stride_mls):
    """One split's unnormalized result and its (max, sum) per row, for _merge_splits_kernel."""
    tl.store(part_ptr + tok[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps
             + offs_d[None, :] * stride_pd, acc, mask=row_ok[:, None] & d_ok[None, :])
    ml_offs = tok * stride_mlt + head * stride_mlh + split * stride_mls
    tl.store(ml_ptr + ml_offs, m_i, mask=row_ok)
    tl.store(ml_ptr + ml_offs + 1, l_i, mask=row_ok)


# Arguments that change from step to step (block-table width, split count, the (max, sum)
# strides that follow from it) are not specialized on: Triton would otherwise compile another
# variant whenever one of them turns divisible by 16 — in the middle of a run.
_VARYING = ["num_splits", "stride_mlt", "stride_mlh", "stride_mls", "split_base"]


@triton.jit(do_not_specialize=["stride_bt", "window"] + _VARYING)
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, ml_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, prefix_len_ptr, seq_order_ptr, scale, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_os, stride_od,
    stride_mlt, stride_mlh, stride_mls,
    stride_bt,
    num_splits, split_base,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr, SHARED_PREFIX: tl.constexpr,
    ORDERED: tl.constexpr, WINDOW: tl.constexpr,
):
    kvh = tl.program_id(0)  # grid: see _grid
    pid0 = tl.program_id(1)
    b = tl.program_id(2)
    if ORDERED:  # the requests start in this order (longest context first: see paged_attention)
        b = tl.load(seq_order_ptr + b)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    ctx = tl.load(seq_lens_ptr + b)
    if SPLIT:
        tile = 0
        split = pid0
    else:
        tile = pid0
        split = 0
    if tile * BLOCK_Q >= q_len:
        return

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + offs_m // GROUP_P
    hg = offs_m % GROUP_P
    head = kvh * GROUP + hg
    row_ok = (qi < q_len) & (hg < GROUP)
    q_pos = ctx - q_len + qi
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)

    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile can see: up to the last valid query's position (causal), within the context.
    last_q = tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    hi = tl.minimum(ctx, ctx - q_len + last_q + 1)
    lo = 0
    if SHARED_PREFIX:  # the keys before prefix_len are another kernel's (_shared_prefix_kernel)
        lo = tl.load(prefix_len_ptr)
    if WINDOW:  # from the key tile holding the first query's first key (tiles start at multiples of BLOCK_N)
        lo = tl.maximum(ctx - q_len + tile * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)

    # Key tiles wholly at or before the tile's first query position need no mask; the rest
    # (the causal diagonal and the context's ragged end) do.
    diag = ctx - q_len + tile * BLOCK_Q + 1
    full_end = lo + tl.maximum(tl.minimum(hi, diag) - lo, 0) // BLOCK_N * BLOCK_N
    win_end = lo
    if WINDOW:  # keys from the last query's first key on are in every row's window
        w_all = ctx - q_len + last_q - window + 1
        win_end = tl.minimum(lo + tl.cdiv(tl.maximum(w_all - lo, 0), BLOCK_N) * BLOCK_N, full_end)
    acc, m_i, l_i = _attend_keys(q, q_pos, lo, win_end, full_end, hi, window, block_tables_ptr + b * stride_bt,
                                 k_cache_ptr + kvh * stride_kh, v_cache_ptr + kvh * stride_vh,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                 offs_d, d_ok, scale, BLOCK_M, BLOCK_D, BLOCK_N, CACHE_BLOCK, IEEE, KV_FP8,
                                 WINDOW)

    if SPLIT:
        _store_partial(out_ptr, ml_ptr, tok, head, split + split_base, acc, m_i, l_i, row_ok, offs_d, d_ok,
                       stride_ot, stride_oh, stride_os, stride_od, stride_mlt, stride_mlh, stride_mls)
    else:
        out = acc / l_i[:, None]
        out_offs = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=_VARYING)
def _merge_splits_kernel(
    part_ptr, ml_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_mlt, stride_mlh, stride_mls,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ml = ml_ptr + t * stride_mlt + h * stride_mlh + offs_s * stride_mls
    m = tl.load(ml, mask=s_ok, other=_MASKED)
    l = tl.load(ml + 1, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # partial maxima are in the log2 domain
    w = tl.where(s_ok, w, 0.0)
    part = tl.load(part_ptr + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd,
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["num_tokens"] + [a for a in _VARYING if a != "split_base"])
def _shared_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_ptr, ml_ptr, block_tables_ptr, prefix_len_ptr, num_tokens,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_mlt, stride_mlh, stride_mls,
    num_splits,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Partial attention of BLOCK_T decode tokens (x their KV head's query heads) to the keys
    [0, prefix_len) that every request shares, found through block_tables row 0; split `split`
    of `num_splits` along those keys. Writes unnormalized (acc, max, sum) like the split path."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_T * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    tok = (tile * BLOCK_T + offs_m // GROUP_P).to(tl.int64)
    hg = offs_m % GROUP_P
    head = kvh * GROUP + hg
    row_ok = (tok < num_tokens) & (hg < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    prefix = tl.load(prefix_len_ptr)
    per_split = tl.cdiv(tl.cdiv(prefix, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(prefix, lo + per_split)
    q_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + hi  # every query comes after every shared key
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_keys(q, q_pos, lo, lo, full_end, hi, 0, block_tables_ptr,
                                 k_cache_ptr + kvh * stride_kh, v_cache_ptr + kvh * stride_vh,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                 offs_d, d_ok, scale, BLOCK_M, BLOCK_D, BLOCK_N, CACHE_BLOCK, IEEE, KV_FP8,
                                 False)
    _store_partial(part_ptr, ml_ptr, tok, head, split, acc, m_i, l_i, row_ok, offs_d, d_ok,
                   stride_pt, stride_ph, stride_ps, stride_pd, stride_mlt, stride_mlh, stride_mls)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                      num_sms: int) -> int:
    """How many KV splits per (request, KV head): 1 unless the batch is decode-only, too small to
    fill the GPU, and long enough that each split still covers MIN_SPLIT_TOKENS keys."""
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs >= num_sms or max_seq_len < 2 * MIN_SPLIT_TOKENS:
        return 1
    want = triton.cdiv(2 * num_sms, programs)  # about two waves of programs
    return max(1, min(want, max_seq_len // MIN_SPLIT_TOKENS, MAX_SPLITS))


def _tile_sizes(q: torch.Tensor, k_dtype: torch.dtype, group_p: int,
                max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps, num_stages) for this launch."""
    if q.device.type != "cuda":  # interpreter: small tiles keep the numpy emulation quick
        block_m, block_n = max(16, group_p), 16
        return max(1, block_m // group_p), block_n, 4, 1
    # decode: benchmarks/decode_layout.py on an H100 over the engine's head-major cache (the
    # workloads' decode batches, block 16 and 32): two warps per 16-row tile beat four (bf16 8B
    # shape 2.80 -> 2.82 TB/s, 1B 2.79 -> 2.80). With a float8 cache one warp beats two
    # (tune_decode.py --fp8, block 32: 8B 2.31 -> 2.52 TB/s of float8 bytes, 0.6B 1.99 either
    # way; ncu_decode.py on W-hf's 1B batch 2.17 -> 2.41): Nsight Compute showed the
    # two-warp float8 program at 128 registers a thread, capping an SM at 16 warps, and issuing
    # 38% more instructions than bf16 (shared-memory loads, address math, conversions). bf16 at
    # head dim 64 runs the same with one warp or two. Prefill: tune_attention.py
    if max_query_len == 1:
        if q.shape[-1] >= 128 and k_dtype != torch.float8_e4m3fn:
            return max(1, 16 // group_p), 64, 2, 2
        return max(1, 16 // group_p), 32, 1, 2
    return max(1, 64 // group_p), 32, 4, 2


def paged_attention_splits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                           num_splits: int, tiles: tuple[int, int, int, int] | None = None,
                           seq_order: torch.Tensor | None = None,
                           sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention with an explicit number of KV splits (1 = single pass, no merge).

    tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) to override the defaults (for tuning).
    sliding_window: see reference.paged_attention (None: the window code is not compiled in)."""
    _check_window(sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, cache_block = k_cache.shape[2], k_cache.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    block_q, block_n, warps, stages = _tile_sizes(q, k_cache.dtype, group_p, max_query_len)
    if tiles is not None:
        block_q, block_n, warps, stages = max(1, tiles[0] // group_p), *tiles[1:]
    num_seqs = seq_lens.shape[0]
    if block_tables.stride(-1) != 1:  # the kernel steps along a table row with unit stride
        block_tables = block_tables.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    split = num_splits > 1
    if split:
        assert max_query_len == 1, "split-KV is for decode-only batches"
        part = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
        target, grid0 = part, num_splits
    else:
        target, ml = out, out  # ml unused
        grid0 = triton.cdiv(max_query_len, block_q)
    t_strides = (target.stride(0), target.stride(1), target.stride(2) if split else 0, target.stride(-1))
    ml_strides = (ml.stride(0), ml.stride(1), ml.stride(2)) if split else (0, 0, 0)
    _paged_attention_kernel[_grid(grid0, num_seqs, num_kv_heads)](
        q, k_cache, v_cache, target, ml, block_tables, seq_lens, query_start_loc, seq_lens,
        seq_lens if seq_order is None else seq_order, float(scale), sliding_window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *t_strides, *ml_strides,
        block_tables.stride(0), num_splits, 0,
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CACHE_BLOCK=cache_block, SPLIT=split,
        IEEE=q.dtype == torch.float32 and not kv_fp8, KV_FP8=kv_fp8, SHARED_PREFIX=False,
        ORDERED=seq_order is not None, WINDOW=sliding_window is not None, num_warps=warps,
        num_stages=stages)
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part, ml, out, num_splits, *part.stride(), *ml_strides, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS)  # one variant for every split count
    return out


_PREFIX_BLOCK_M = 128  # (token, query head) rows per program of _shared_prefix_kernel on the GPU


def choose_prefix_splits(num_tokens: int, num_kv_heads: int, group_p: int, num_sms: int) -> int:
    """Splits along the shared keys: enough programs for about two waves over the SMs. Fixed by
    the batch's shape alone (not the prefix length), so a CUDA graph can hold it."""
    tiles = triton.cdiv(num_tokens * group_p, _PREFIX_BLOCK_M) * num_kv_heads
    return max(1, min(triton.cdiv(2 * num_sms, tiles), MAX_SPLITS // 4))


def shared_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, scale: float, shared_prefix_len: torch.Tensor,
                            max_seq_len: int | None = None, prefix_splits: int | None = None,
                            own_splits: int | None = None,
                            tiles: tuple[int, int, int, int] | None = None,
                            seq_order: torch.Tensor | None = None) -> torch.Tensor:
    """Decode-only attention where the first shared_prefix_len keys ([1] int32 on the device, a
    multiple of the cache block size, below every request's context length) sit in the same
    blocks for every request: block_tables[b, :P] == block_tables[0, :P]. Same result as
    paged_attention; the shared keys are read once per KV head instead of once per request.
    Each request's own keys are split as paged_attention would split its whole context for a
    batch this small (max_seq_len steers that, as there); prefix_splits / own_splits override.
    tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the shared-key kernel (for tuning)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, cache_block = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    ieee = q.dtype == torch.float32 and not kv_fp8
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    on_gpu = q.device.type == "cuda"
    num_sms = _num_sms(q.device.index or 0) if on_gpu else 2
    if prefix_splits is None:
        prefix_splits = choose_prefix_splits(num_tokens, num_kv_heads, group_p, num_sms)
    if own_splits is None:
        own_splits = choose_num_splits(num_tokens, num_kv_heads, 1, max_seq_len or 0, num_sms)
    own_splits = min(own_splits, MAX_SPLITS - prefix_splits)
    splits = prefix_splits + own_splits  # partials: the shared keys', then each request's own
    part = torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    ml = torch.empty(num_tokens, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = (_PREFIX_BLOCK_M, 64, 8, 2) if on_gpu else (max(16, group_p), 16, 4, 1)
    if tiles is not None:
        block_m, block_n, warps, stages = tiles
    block_t = max(1, block_m // group_p)
    _shared_prefix_kernel[(triton.cdiv(num_tokens, block_t), num_kv_heads, prefix_splits)](
        q, k_cache, v_cache, part, ml, block_tables, shared_prefix_len, num_tokens, float(scale),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *part.stride(), *ml.stride()[:3],
        prefix_splits,
        GROUP=group, GROUP_P=group_p, BLOCK_T=block_t, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CACHE_BLOCK=cache_block, IEEE=ieee, KV_FP8=kv_fp8,
        num_warps=warps, num_stages=stages)
    block_q, block_n, warps, stages = _tile_sizes(q, k_cache.dtype, group_p, 1)
    _paged_attention_kernel[_grid(own_splits, num_tokens, num_kv_heads)](
        q, k_cache, v_cache, part, ml, block_tables, seq_lens, query_start_loc, shared_prefix_len,
        seq_lens if seq_order is None else seq_order, float(scale), 0, *q.stride(), *k_cache.stride(), *v_cache.stride(), *part.stride(),
        *ml.stride()[:3], block_tables.stride(0), own_splits, prefix_splits,
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, CACHE_BLOCK=cache_block, SPLIT=True, IEEE=ieee, KV_FP8=kv_fp8,
        SHARED_PREFIX=True, ORDERED=seq_order is not None, WINDOW=False, num_warps=warps,
        num_stages=stages)
    _merge_splits_kernel[(num_tokens, num_heads)](
        part, ml, out, splits, *part.stride(), *ml.stride()[:3], *out.stride(),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=MAX_SPLITS)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int,
                    shared_prefix_len: torch.Tensor | None = None,
                    seq_order: torch.Tensor | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of a mixed batch over the paged cache (see reference.paged_attention).

    max_query_len must bound every request's query length (it sizes the launch grid); max_seq_len
    only steers the split-KV heuristic. Neither is read back from the device. shared_prefix_len:
    for a decode-only batch whose requests share their first blocks, see shared_prefix_attention.
    seq_order: [B] int32, a permutation of the requests: the order their programs start in. The
    result is the same; the time is not. A decode kernel's programs are all resident at once, so
    it lasts as long as its busiest SMs: started longest context first, the short ones fill in
    behind the long ones (benchmarks/decode_balance.py, W-hf's spread of contexts on an H100:
    0.1861 ms in arrival order, 0.1634 ms longest first, 0.1685 ms for the same keys spread evenly).
    sliding_window: W keys per query (see reference.paged_attention); a windowed call ignores
    shared_prefix_len (same result: the plain path), and splits only the W keys it reads.
    """
    if shared_prefix_len is not None and max_query_len == 1 and sliding_window is None:
        return shared_prefix_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                       scale, shared_prefix_len, max_seq_len, seq_order=seq_order)
    num_splits = 1
    if q.device.type == "cuda":
        keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = choose_num_splits(seq_lens.shape[0], k_cache.shape[2], max_query_len, keys,
                                       _num_sms(q.device.index or 0))
    return paged_attention_splits(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                  scale, max_query_len, num_splits, seq_order=seq_order,
                                  sliding_window=sliding_window)


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
