"""Prompt log-probs (SamplingParams.prompt_logprobs): which rows of a step score prompt tokens,
their log-probs, ranks and top tokens on the device, and their shape per request on the host.

A chunk computes positions p0 .. p0 + q - 1 of its request; the hidden state at position p
scores prompt token p + 1, so a chunk of a request that asks contributes the rows of positions
p0 .. min(p0 + q, L - 1) - 1 (L: the prompt's length; position L - 1 is the sampled row). Chunked
prefill therefore spreads a prompt's log-probs over several steps. Their logits are computed
beside the sampled rows', 128 rows at a time (a long prompt's [tokens, vocab] logits
at once would be gigabytes); steps without such a request compute nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.core.outputs import PromptLogprobsChunk, ScheduledChunk

ROWS_PER_PASS = 128  # prompt rows whose logits exist at one time (within the sampler's budget)


@dataclass(slots=True)
class PromptRows:
    """The rows of one step that score prompt tokens."""

    rows: np.ndarray  # [R] int64: rows of the step's flattened batch
    targets: np.ndarray  # [R] int64: the prompt token each row scores
    spans: list[tuple[str, int, int, int]]  # (req_id, first prompt index scored, rows, top k)
    k: int  # the most top tokens a span asks for


def prompt_rows(chunks: list[ScheduledChunk], query_start: np.ndarray,
                wanted: dict[str, tuple[int, list[int]]]) -> PromptRows | None:
    """The rows of `chunks` that score prompt tokens of the requests in `wanted`
    (req_id -> (top k, prompt token ids)); None when there are none."""
    rows, targets, spans = [], [], []
    for i, c in enumerate(chunks):
        ask = wanted.get(c.req_id)
        if ask is None:
            continue
        k, prompt = ask
        start = c.num_computed_tokens
        end = min(start + len(c.token_ids), len(prompt) - 1)
        if end <= start:
            continue
        rows.append(np.arange(end - start, dtype=np.int64) + int(query_start[i]))
        targets.append(np.asarray(prompt[start + 1:end + 1], dtype=np.int64))
        spans.append((c.req_id, start + 1, end - start, k))
    if not spans:
        return None
    return PromptRows(np.concatenate(rows), np.concatenate(targets), spans,
                      max(s[3] for s in spans))


@torch.no_grad()
def prompt_columns(compute_logits, hidden: torch.Tensor, rows: torch.Tensor,
                   targets: torch.Tensor, k: int, score: bool) -> torch.Tensor | None:
    """[R, 2 + 2k] float64 on the device: log p of each target, its rank (how many tokens are at
    least as likely, itself included), the top k log-probs and their ids. `score` False (a
    tensor-parallel rank other than 0): the logits are still computed, as every rank must take
    part in the LM head, and nothing is returned."""
    parts = []
    for a in range(0, rows.shape[0], ROWS_PER_PASS):
        logits = compute_logits(hidden[rows[a:a + ROWS_PER_PASS]])
        if not score:
            continue
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = logp.gather(1, targets[a:a + ROWS_PER_PASS, None])
        cols = [target.double(), (logp >= target).sum(dim=-1, keepdim=True).double()]
        if k:
            top = logp.topk(k, dim=-1)
            cols += [top.values.double(), top.indices.double()]
        parts.append(torch.cat(cols, dim=1))
    return torch.cat(parts) if score else None


def chunks_from_host(host: torch.Tensor, spans: list[tuple[str, int, int, int]],
                     k: int) -> dict[str, PromptLogprobsChunk]:
    """The host copy of `prompt_columns` per request."""
    logprobs, ranks = host[:, 0].tolist(), host[:, 1].long().tolist()
    vals, ids = host[:, 2:2 + k].tolist(), host[:, 2 + k:].long().tolist()
    out, at = {}, 0
    for req_id, start, n, want in spans:
        top = [dict(zip(ids[r][:want], vals[r][:want])) for r in range(at, at + n)]
        out[req_id] = PromptLogprobsChunk(start, logprobs[at:at + n], ranks[at:at + n], top)
        at += n
    return out
