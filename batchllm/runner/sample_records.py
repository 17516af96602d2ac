"""What the sampler hands back: one step's samples on the device, and their host layout per request."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NONFINITE_ERROR = ("NaN or infinite logits: the model produced non-finite values for this request, "
                   "so no token could be sampled")


@dataclass(slots=True)
class SamplerResult:
    token_ids: list[int]
    logprobs: list[float]  # log p of each sampled token under the raw logits (temperature 1)
    top_logprobs: list[dict[int, float]] | None  # None unless some row asked for logprobs > 0
    errors: dict[str, str] = field(default_factory=dict)
    ranks: list[int] | None = None  # each sampled token's rank (1: most likely); when asked


@dataclass(slots=True)
class DeviceSample:
    """One step's samples, still on the device (no host sync yet)."""

    tokens: torch.Tensor  # [B] int64
    token_logprobs: torch.Tensor  # [B] float32
    bad_rows: torch.Tensor  # [B] bool: non-finite logits
    top: object | None  # torch.return_types.topk of log-probs, when some row asked
    num_top: list[int]  # how many top log-probs each row asked for
    ranks: torch.Tensor | None = None  # [B] int64: the sampled token's rank, when some row asked

    @property
    def top_k(self) -> int:
        return self.top.values.shape[1] if self.top is not None else 0

    def columns(self) -> torch.Tensor:
        """[B, 3 (+ 1) + 2 * top_k] float64 on the device: token, log p, non-finite flag, (rank,)
        top values, top ids — the layout `result_from_host` reads on the host."""
        parts = [self.tokens.double()[:, None], self.token_logprobs.double()[:, None],
                 self.bad_rows.double()[:, None]]
        if self.ranks is not None:
            parts.append(self.ranks.double()[:, None])
        if self.top is not None:
            parts += [self.top.values.double(), self.top.indices.double()]
        return torch.cat(parts, dim=1)


def result_from_host(host: torch.Tensor, k: int, num_top: list[int], req_ids: list[str],
                     ranked: bool = False) -> SamplerResult:
    """One step's columns (DeviceSample.columns, on the host) shaped per request."""
    token_ids = host[:, 0].long().tolist()
    logprobs = host[:, 1].tolist()
    errors = {req_ids[i]: NONFINITE_ERROR for i in torch.nonzero(host[:, 2]).flatten().tolist()}
    ranks = host[:, 3].long().tolist() if ranked else None
    top = None
    if k > 0:
        at = 3 + ranked
        vals, ids = host[:, at:at + k].tolist(), host[:, at + k:].long().tolist()
        top = [dict(zip(ids[i][:n], vals[i][:n])) for i, n in enumerate(num_top)]
    return SamplerResult(token_ids, logprobs, top, errors, ranks)
