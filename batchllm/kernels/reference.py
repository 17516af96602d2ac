"""Plain-torch references of every kernel: the CPU path, and the truth the Triton kernels are tested against.

Layouts shared by all backends:
  q: [T, H, D]; k, v: [T, Hkv, D] for the step's T flattened tokens.
  k_cache, v_cache: [num_blocks, block_size, Hkv, D] (one pair per layer; any strides: the
  engine stores each block head-major, see runner/kv_cache.py).
  slot_mapping: [T] int64, block_id * block_size + offset; a negative slot is skipped (padding).
  block_tables: [B, max_blocks] int32 (unused entries are arbitrary); seq_lens: [B] int32, the
  context length of each request *including* this step's tokens; query_start_loc: [B + 1] int32,
  cumulative query lengths. Request b's queries sit at positions seq_len - q_len .. seq_len - 1 and
  attend causally to every key at a position <= their own; with a sliding window W (a layer's
  constant), only to the W keys at positions q_pos - W + 1 .. q_pos.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's K and V at its slot of the paged cache (in place)."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    block, offset = slot_mapping // block_size, slot_mapping % block_size
    for x, cache in ((k, k_cache), (v, v_cache)):
        x = to_cache_dtype(x, cache.dtype)
        if cache.dtype == torch.float8_e4m3fn:  # indexed writes have no float8 kernel: copy the bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache[block, offset] = x  # the cache may be a strided view (runner/kv_cache.py)


FP8_MAX = 448.0  # largest finite float8 e4m3 (fn) value


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; float8 saturates at +-448 (a plain cast would give NaN)."""
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one request's K (or V), [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    n = (seq_len + block_size - 1) // block_size
    return cache[block_table[:n].long()].reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int,
                    shared_prefix_len: torch.Tensor | None = None,
                    seq_order: torch.Tensor | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of a mixed batch (prefill chunks and decode tokens) over the paged cache.

    The step's own K/V must already be written to the cache. Returns [T, H, D] in q's dtype.
    shared_prefix_len (the number of leading keys every request finds in the same blocks) only
    lets a backend read those keys once, and seq_order (a permutation of the requests) only the
    order a backend starts them in; the result is the same, so this reference ignores both.
    sliding_window: W, or None for full causal attention; keys at positions < q_pos - W + 1 are
    masked (each query sees W keys, itself included, as HF's sliding-window mask).
    """
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return _decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len,
                                 sliding_window)
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, ctx in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        qb = q[s:e].transpose(0, 1)  # [H, q, D]
        kb = gather_kv(k_cache, block_tables[b], ctx).to(q.dtype).transpose(0, 1)  # [Hkv, ctx, D]
        vb = gather_kv(v_cache, block_tables[b], ctx).to(q.dtype).transpose(0, 1)
        if group > 1:
            kb = kb.repeat_interleave(group, dim=0)
            vb = vb.repeat_interleave(group, dim=0)
        q_len = e - s
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos[:, None]  # [q, ctx]
        if sliding_window is not None:
            mask &= k_pos > q_pos[:, None] - sliding_window
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[s:e] = ob.transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      max_seq_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Decode-only batches (one query per request) in one batched call: every request's blocks
    are gathered to a padded [B, L] context and keys past its length (or before its window) are
    masked."""
    block_size = k_cache.shape[1]
    num_blocks = min(block_tables.shape[1], (max_seq_len + block_size - 1) // block_size)
    # entries past a request's last block are arbitrary: clamp them to a valid id, then mask
    table = block_tables[:, :num_blocks].long().clamp(0, k_cache.shape[0] - 1)
    b = q.shape[0]
    k = k_cache[table].reshape(b, num_blocks * block_size, *k_cache.shape[2:]).to(q.dtype)
    v = v_cache[table].reshape(b, num_blocks * block_size, *v_cache.shape[2:]).to(q.dtype)
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    mask = k_pos < seq_lens.long()[:, None]  # [B, L]
    if sliding_window is not None:  # the query sits at seq_len - 1
        mask &= k_pos >= seq_lens.long()[:, None] - sliding_window
    # unwritten slots may hold anything (NaN included): zero them so 0-weight never meets NaN
    pad = ~mask[:, :, None, None]
    k.masked_fill_(pad, 0.0)  # k and v are fresh gathered copies: clean them in place
    v.masked_fill_(pad, 0.0)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :],
        scale=scale, enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm computed in float32, returned in x's dtype. The scale is weight + weight_offset
    (in float32): Gemma's norms store weight - 1 and pass weight_offset=1.0."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = weight.float() + weight_offset if weight_offset else weight.float()
    return (y * scale).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block's add-then-normalize."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps, weight_offset), new_residual


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX / HF Llama) rotary embedding. cos_sin_cache: [max_pos, D] = cat(cos, sin)
    over D/2 frequencies each, float32. Returns new q, k in their dtypes."""
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = cat(gate, up) along the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for x = cat(gate, up) along the last dim (GeGLU with the tanh
    approximation of GELU, HF's `gelu_pytorch_tanh`)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy pick of each row of logits [B, V] (any float dtype), computed in float32.

    Returns (tokens int64 [B], token_logprobs float32 [B], bad_rows bool [B]): tokens = argmax
    (first index among ties), token_logprob = logit[token] - logsumexp, bad_rows = the logsumexp
    is not finite (a NaN or +inf anywhere, or every logit -inf). Bad rows get token 0.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    bad_rows = ~torch.isfinite(lse)
    token_logprobs = logits.gather(1, tokens[:, None])[:, 0] - lse
    return torch.where(bad_rows, torch.zeros_like(tokens), tokens), token_logprobs, bad_rows


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts MLP of routed tokens: sum over k of topk_weights[t, k] *
    down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k].

    x: [T, H]; w13: [E, 2I, H], each expert's [gate; up] rows; w2: [E, H, I]; topk_weights:
    [T, K] (float32); topk_ids: [T, K] (any integer dtype, values in [0, E)). Returns [T, H] in
    x's dtype. Token-expert pairs are grouped by expert, one product per expert hit (a host sync
    for the group sizes: fine for this reference, not for a captured graph)."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.zeros_like(x)
    out = torch.empty(num_tokens * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # pair ids t * K + k, grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        h = silu_and_mul(F.linear(x[pairs // top_k], w13[expert]))
        out[pairs] = F.linear(h, w2[expert]).float()
        start += count
    weighted = out.view(num_tokens, top_k, -1) * topk_weights.float()[:, :, None]
    return weighted.sum(dim=1).to(x.dtype)
