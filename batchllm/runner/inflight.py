"""A plan queued on the device: its samples on their way to the host, and their shape per request."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.core.outputs import RunnerOutput
from batchllm.runner.sampler import NONFINITE_ERROR, DeviceSample, Sampler


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

    @staticmethod
    def done(output: RunnerOutput, device: torch.device) -> "InflightRound":
        last = torch.tensor([t[-1] for t in output.token_ids], dtype=torch.long, device=device)
        return InflightRound(output.req_ids, np.ones((1, len(output.req_ids)), dtype=bool), [],
                             last, None, None, output)

    def host_tokens(self) -> list[int]:
        """Each row's last sampled token, on the host (waits for the plan)."""
        return self.last_tokens.tolist()


def queue_results(req_ids: list[str], active: np.ndarray, samples: list[DeviceSample],
                  last: torch.Tensor) -> InflightRound:
    """Start copying the samples to pinned host memory behind an event: collecting this plan
    then waits for it only, not for plans queued after it."""
    columns = torch.stack([d.columns() for d in samples])  # [steps, reqs, columns]
    event = None
    if columns.is_cuda:
        host = torch.empty(columns.shape, dtype=columns.dtype, pin_memory=True)
        host.copy_(columns, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = columns
    return InflightRound(req_ids, active, samples, last, host, event)


def collect_results(round_: InflightRound) -> RunnerOutput:
    """Wait for a launched plan (only for it) and shape its samples per request: each request's
    tokens of the sub-steps it was active in."""
    out = _collect(round_)
    if round_.failed:
        out.errors.update(round_.failed)
    return out


def _collect(round_: InflightRound) -> RunnerOutput:
    if round_.output is not None:
        return round_.output
    if round_.event is not None:
        round_.event.synchronize()
    req_ids, active, host = round_.req_ids, round_.active, round_.host
    counts = active.sum(axis=0).tolist()
    # per request, all sub-steps: transpose on the host tensor, then one tolist per column
    tokens = host[:, :, 0].t().long().tolist()
    logprobs = host[:, :, 1].t().tolist()
    bad = (host[:, :, 2] != 0).numpy() & active  # a non-finite row counts while active
    errors = {req_ids[i]: NONFINITE_ERROR for i in np.flatnonzero(bad.any(axis=0))}
    top = None
    if any(d.top is not None for d in round_.samples):
        results = [Sampler.result_from_host(host[i], d.top_k, d.num_top, req_ids)
                   for i, d in enumerate(round_.samples)]
        top = [[r.top_logprobs[i] for r in results][:counts[i]] for i in range(len(req_ids))]
    return RunnerOutput(req_ids=req_ids, token_ids=[t[:k] for t, k in zip(tokens, counts)],
                        logprobs=[lp[:k] for lp, k in zip(logprobs, counts)], top_logprobs=top,
                        errors=errors)


def merge_outputs(a: RunnerOutput, b: RunnerOutput) -> RunnerOutput:
    """Two halves of one split step, in order."""
    def cat(x, y, n_x, n_y):
        if x is None and y is None:
            return None
        return (x if x is not None else [None] * n_x) + (y if y is not None else [None] * n_y)

    na, nb = len(a.req_ids), len(b.req_ids)
    return RunnerOutput(req_ids=a.req_ids + b.req_ids, token_ids=a.token_ids + b.token_ids,
                        logprobs=cat(a.logprobs, b.logprobs, na, nb),
                        top_logprobs=cat(a.top_logprobs, b.top_logprobs, na, nb),
                        errors={**a.errors, **b.errors})
