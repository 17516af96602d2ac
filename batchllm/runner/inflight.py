"""A plan queued on the device: its samples on their way to the host, and their shape per request."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.core.outputs import RunnerOutput
from batchllm.runner.prompt_logprobs import chunks_from_host
from batchllm.runner.sample_records import NONFINITE_ERROR, DeviceSample, result_from_host


@dataclass(slots=True)
class InflightRound:
    """A launched plan (one step or a multi-step decode round): what `collect` and the plan
    after it need. Rows: the plan's sampled chunks, in order."""

    req_ids: list[str]
    active: np.ndarray  # [steps, rows] bool: sub-step s of row i counts
    samples: list[DeviceSample]  # per sub-step (top-k shapes for the host layout)
    last_tokens: torch.Tensor  # [rows] on the device: each row's last sampled token
    host: torch.Tensor | None  # [steps, rows, columns]: the samples, copied (or being copied) to the host
    event: object | None  # CUDA event after the copy; None on CPU
    output: RunnerOutput | None = None  # already on the host (a step that ran synchronously)
    failed: dict[str, str] | None = None  # requests the runner could not set up: req_id -> why
    prompt: tuple[list, int, torch.Tensor] | None = None  # prompt log-probs: (spans, k, columns)

    @staticmethod
    def done(output: RunnerOutput, device: torch.device) -> "InflightRound":
        last = torch.tensor([t[-1] for t in output.token_ids], dtype=torch.long, device=device)
        return InflightRound(output.req_ids, np.ones((1, len(output.req_ids)), dtype=bool), [],
                             last, None, None, output)

    def host_tokens(self) -> list[int]:
        """Each row's last sampled token, on the host (waits for the plan)."""
        return self.last_tokens.tolist()


def queue_results(req_ids: list[str], active: np.ndarray, samples: list[DeviceSample],
                  last: torch.Tensor, prompt: tuple[list, int, torch.Tensor] | None = None
                  ) -> InflightRound:
    """Start copying the samples (and any prompt log-probs: spans, top k, device columns) to
    pinned host memory behind an event: collecting this plan then waits for it only, not for
    plans queued after it."""
    columns = torch.stack([d.columns() for d in samples]) if samples else None  # [steps, reqs, cols]
    host = _to_host(columns)
    if prompt is not None:
        prompt = (prompt[0], prompt[1], _to_host(prompt[2]))
    event = None
    if last.is_cuda:
        event = torch.cuda.Event()
        event.record()
    return InflightRound(req_ids, active, samples, last, host, event, prompt=prompt)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def collect_results(round_: InflightRound) -> RunnerOutput:
    """Wait for a launched plan (only for it) and shape its samples per request: each request's
    tokens of the sub-steps it was active in."""
    out = _collect(round_)
    if round_.failed:
        out.errors.update(round_.failed)
    if round_.prompt is not None:
        spans, k, host = round_.prompt
        out.prompt_logprobs = chunks_from_host(host, spans, k)
    return out


def _collect(round_: InflightRound) -> RunnerOutput:
    if round_.output is not None:
        return round_.output
    if round_.event is not None:
        round_.event.synchronize()
    req_ids, active, host = round_.req_ids, round_.active, round_.host
    if host is None:  # a step that only scored prompt tokens
        return RunnerOutput()
    counts = active.sum(axis=0).tolist()
    # per request, all sub-steps: transpose on the host tensor, then one tolist per column
    tokens = host[:, :, 0].t().long().tolist()
    logprobs = host[:, :, 1].t().tolist()
    bad = (host[:, :, 2] != 0).numpy() & active  # a non-finite row counts while active
    errors = {req_ids[i]: NONFINITE_ERROR for i in np.flatnonzero(bad.any(axis=0))}
    top = ranks = None
    if round_.samples and round_.samples[0].ranks is not None:  # some request asked for logprobs
        ranks = [r[:k] for r, k in zip(host[:, :, 3].t().long().tolist(), counts)]
    if any(d.top is not None for d in round_.samples):
        results = [result_from_host(host[i], d.top_k, d.num_top, req_ids, d.ranks is not None)
                   for i, d in enumerate(round_.samples)]
        top = [[r.top_logprobs[i] for r in results][:counts[i]] for i in range(len(req_ids))]
    return RunnerOutput(req_ids=req_ids, token_ids=[t[:k] for t, k in zip(tokens, counts)],
                        logprobs=[lp[:k] for lp, k in zip(logprobs, counts)], top_logprobs=top,
                        errors=errors, ranks=ranks)


def merge_outputs(a: RunnerOutput, b: RunnerOutput) -> RunnerOutput:
    """Two halves of one split step, in order."""
    def cat(x, y, n_x, n_y):
        if x is None and y is None:
            return None
        return (x if x is not None else [None] * n_x) + (y if y is not None else [None] * n_y)

    na, nb = len(a.req_ids), len(b.req_ids)
    prompt = None
    if a.prompt_logprobs is not None or b.prompt_logprobs is not None:
        prompt = {**(a.prompt_logprobs or {}), **(b.prompt_logprobs or {})}
    return RunnerOutput(req_ids=a.req_ids + b.req_ids, token_ids=a.token_ids + b.token_ids,
                        logprobs=cat(a.logprobs, b.logprobs, na, nb),
                        top_logprobs=cat(a.top_logprobs, b.top_logprobs, na, nb),
                        errors={**a.errors, **b.errors}, ranks=cat(a.ranks, b.ranks, na, nb),
                        prompt_logprobs=prompt)
