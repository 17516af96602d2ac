"""RequestOutput (or a settled row) -> output row dicts, one per sample, in the output schema."""
from __future__ import annotations

from typing import Any

from batchllm.core.outputs import CompletionOutput, RequestOutput
from batchllm.io.openai_batch import token_logprobs
from batchllm.jobs.preprocess import Prepared


def output_rows(p: Prepared, out: RequestOutput | None, *, samples: bool,
                top_logprobs: bool) -> list[dict[str, Any]]:
    base: dict[str, Any] = {"id": p.row_id, "input_file": p.input_file, "input_row": p.row,
                            **p.kept}
    if out is None or out.error is not None or not out.outputs:
        row = dict(base, error=p.error if out is None else (out.error or "no output"),
                   finish_reason="skipped" if p.skipped else "error")
        if p.skipped:
            row["error"] = None
        row["sample_index"] = 0  # written where the schema has the column (n > 1, OpenAI input)
        if out is not None:
            row["num_prompt_tokens"] = len(out.prompt_token_ids)
        elif p.prompt_ids is not None:
            row["num_prompt_tokens"] = len(p.prompt_ids)
        return [row]
    timings = _timings(out)
    rows = []
    for c in out.outputs:
        row = dict(base, text=c.text, token_ids=list(c.token_ids),
                   token_logprobs=c.token_logprobs,
                   finish_reason=c.finish_reason,
                   stop_reason=None if c.stop_reason is None else str(c.stop_reason),
                   structured_output_valid=c.structured_output_valid,
                   num_prompt_tokens=len(out.prompt_token_ids), num_output_tokens=len(c.token_ids),
                   num_cached_tokens=out.num_cached_tokens, error=None, **timings)
        if c.finish_reason == "error":
            row["error"] = out.error or "the engine failed this request"
        row["sample_index"] = c.index
        if p.token_text is not None:
            row["openai_logprobs"] = _openai_logprobs(p, c)
        if top_logprobs:
            row["top_logprobs"] = _top_logprobs(c, None if p.params is None else p.params.logprobs)
        rows.append(row)
    return rows


def _openai_logprobs(p: Prepared, c: CompletionOutput) -> list[dict[str, Any]] | None:
    """An OpenAI batch row's logprobs (it asked for them): per token its text, log p and the
    p.top_logprobs most likely tokens. Reads vLLM's shape (per token, id -> Logprob with its
    decoded text) or a list of floats beside `top_logprobs` (id -> log p)."""
    if c.logprobs is None or p.token_text is None:
        return None
    old_top = getattr(c, "top_logprobs", None)
    steps = []
    for j, token in enumerate(c.token_ids[:len(c.logprobs)]):
        entry = c.logprobs[j]
        if isinstance(entry, dict):
            alts = [(t, x.logprob, x.decoded_token) for t, x in entry.items()]
            sampled = entry[token].logprob if token in entry else float("nan")
        else:
            alts = [(t, v, None) for t, v in (old_top[j] if old_top else {}).items()]
            sampled = entry
        steps.append((token, sampled, alts))
    return token_logprobs(steps, p.top_logprobs, p.token_text)


def _top_logprobs(c: CompletionOutput, k: int | None) -> list[list[dict[str, Any]]] | None:
    """Per output token its k most likely tokens (id, the token decoded alone, log p), most
    likely first: the entries of vLLM's per-token dict whose rank is at most k."""
    if c.logprobs is None or not k:
        return None
    return [[{"token_id": t, "token": x.decoded_token, "logprob": x.logprob}
             for t, x in sorted(step.items(), key=lambda kv: kv[1].rank or 0)
             if x.rank is not None and x.rank <= k] for step in c.logprobs]


def _timings(out: RequestOutput) -> dict[str, float | None]:
    m = out.metrics
    if m is None:
        return {}

    def since(t: float | None) -> float | None:
        return None if t is None else max(0.0, t - m.arrival_time)

    return {"time_queued_s": since(m.first_scheduled_time),
            "time_to_first_token_s": since(m.first_token_time),
            "time_total_s": since(m.finished_time)}
