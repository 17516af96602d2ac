"""Paged-attention inputs for the kernel tuner: random batches of given contexts and query lengths,
stored in the engine's cache layout, in bf16 or float8."""
from __future__ import annotations

import random

import torch


def hnd(cache: torch.Tensor) -> torch.Tensor:
    """The same values stored as the engine stores them (each block's KV heads outermost in
    memory, runner/kv_cache.py), viewed in the usual [blocks, block_size, kv_heads, head_dim]."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def fp8_caches(args: tuple) -> tuple:
    """Paged-attention arguments with the K and V caches cast to float8 e4m3 (memory order kept)."""
    return (args[0], args[1].to(torch.float8_e4m3fn), args[2].to(torch.float8_e4m3fn), *args[3:])


def paged_batch(ctx: list[int], q_lens: list[int], heads: int = 32, kv_heads: int = 8, dim: int = 128,
                block_size: int = 16, head_major: bool = True, device: str = "cuda") -> tuple:
    """paged_attention arguments (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
    scale, max_query_len, max_seq_len) for requests of these context and query lengths: bf16,
    KV blocks scattered at random. The caches are stored as the engine stores them (hnd) unless
    head_major is False (the plain [blocks, block_size, kv_heads, head_dim]). Defaults: the
    Llama-3.1-8B attention shape, block 16."""
    need = [(c + block_size - 1) // block_size for c in ctx]
    nb = sum(need)
    k_cache = torch.randn(nb, block_size, kv_heads, dim, dtype=torch.bfloat16, device=device)
    v_cache = torch.randn_like(k_cache)
    if head_major:
        k_cache, v_cache = hnd(k_cache), hnd(v_cache)
    perm = torch.randperm(nb, device=device).to(torch.int32)
    tables = torch.zeros(len(ctx), max(need), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), heads, dim, dtype=torch.bfloat16, device=device)
    qsl = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    seq = torch.tensor(ctx, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, seq, qsl, dim ** -0.5, max(q_lens), max(ctx)


def decode_batch(heads: int, kv_heads: int, dim: int, ctx: list[int], block_size: int = 16,
                 head_major: bool = True, device: str = "cuda") -> tuple[tuple, int]:
    """(paged_attention arguments without max_seq_len, bf16 K+V bytes read) of a decode-only batch."""
    args = paged_batch(ctx, [1] * len(ctx), heads, kv_heads, dim, block_size, head_major, device)[:8]
    return args, sum(ctx) * 2 * kv_heads * dim * 2


def shared_batch(heads: int, kv_heads: int, dim: int, prefix: int, own: list[int], block_size: int = 16,
                 device: str = "cuda") -> list:
    """A decode batch whose requests all start with the same `prefix` tokens (the same blocks),
    followed by `own` tokens each."""
    args = list(paged_batch([prefix + o for o in own], [1] * len(own), heads, kv_heads, dim, block_size,
                            device=device))
    args[3][:, :prefix // block_size] = args[3][0, :prefix // block_size]
    return args


def whf_decode_contexts(n: int = 512, seed: int = 0) -> list[int]:
    """Contexts of W-hf's decode batch in arrival order: 64..1024 prompt tokens plus 0..256 generated."""
    rng = random.Random(seed)
    return [rng.randint(64, 1024) + rng.randint(0, 256) for _ in range(n)]
