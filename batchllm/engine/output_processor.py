"""Output processing: sampled tokens → text, stop strings, logprobs; n samples → one RequestOutput.

Log-probs are kept as numbers while a request runs and become vLLM's shape (token id ->
Logprob(logprob, rank, decoded_token)) once, when it finishes: every id is decoded alone, as vLLM
does, in one batch per request.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from batchllm.core.outputs import CompletionOutput, Logprob, PromptLogprobsChunk, RequestMetrics, \
    RequestOutput, RunnerOutput
from batchllm.core.request import Request
from batchllm.core.stop import find_stop_string


@dataclass(slots=True)
class _Sample:
    """Engine-side state of one sample: detokenizer, logprobs, whether it is done."""

    request: Request
    detok: object | None
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    stop_reason: int | str | None = None
    done: bool = False
    num_seen: int = 0  # output tokens processed here
    keep: int | None = None  # a stop string ended the text after this many tokens


@dataclass(slots=True)
class _Group:
    """One user request: its n samples, reported together when all are done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    arrival_time: float
    samples: list[_Sample] = field(default_factory=list)
    error: str | None = None
    # prompt_logprobs: per prompt index, (log p, rank, top ids -> log p) once computed
    prompt_logprobs: list[tuple[float, int, dict[int, float]] | None] | None = None


class OutputProcessor:
    """Turns each step's accepted tokens into text and finished RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.structured = None  # structured.StructuredOutputs: validity of constrained samples
        self.groups: dict[str, _Group] = {}
        self._samples: dict[str, _Sample] = {}
        self.num_generated_tokens = 0

    def add_group(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                  arrival: float, requests: list[Request], error: str | None = None) -> RequestOutput | None:
        """Track a user request's samples; one that failed before scheduling is returned at once."""
        group = _Group(request_id, prompt, prompt_ids, arrival, error=error)
        if error:
            return self._group_output(group)
        self.groups[request_id] = group
        if requests and requests[0].sampling_params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(prompt_ids)
        for req in requests:
            detok = None
            # Incremental detokenization is only needed to watch for stop strings; otherwise the
            # text is decoded once when the sample finishes (same text, far less per-step work).
            if self.tokenizer is not None and req.sampling_params.stop:
                from batchllm.tokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                               skip_special_tokens=req.sampling_params.skip_special_tokens)
            sample = _Sample(req, detok)
            group.samples.append(sample)
            self._samples[req.request_id] = sample
        return None

    def unfinished_sample_ids(self, request_id: str) -> list[str]:
        group = self.groups.get(request_id)
        return [s.request.request_id for s in group.samples if not s.done] if group else []

    def process(self, out: RunnerOutput) -> list[Request]:
        """Take the tokens the scheduler accepted from `out`; returns the requests a stop string
        ends now (the caller finishes them in the scheduler)."""
        stopped: list[Request] = []
        if out.prompt_logprobs:
            self._take_prompt_logprobs(out.prompt_logprobs)
        for i, req_id in enumerate(out.req_ids):
            sample = self._samples.get(req_id)
            if sample is None or sample.keep is not None:
                continue
            req = sample.request
            tokens = req.output_token_ids[sample.num_seen:]  # a round's tokens up to its stop
            lps = out.logprobs[i] if out.logprobs is not None else None
            tops = out.top_logprobs[i] if out.top_logprobs is not None else None
            if out.ranks is not None:
                sample.ranks.extend(out.ranks[i][:len(tokens)])
            if sample.detok is None:  # no stop strings to watch: take them at once
                n = len(tokens)
                self.num_generated_tokens += n
                sample.num_seen += n
                if lps is not None:
                    sample.logprobs.extend(lps[:n])
                if tops is not None:
                    sample.top_logprobs.extend(tops[:n])
                continue
            for j, token in enumerate(tokens):
                self.num_generated_tokens += 1
                sample.num_seen += 1
                if lps is not None:
                    sample.logprobs.append(lps[j])
                if tops is not None:
                    sample.top_logprobs.append(tops[j])
                sample.text += sample.detok.append([token])
                if self._stop_string(sample):
                    sample.keep = sample.num_seen
                    if not req.is_finished:
                        stopped.append(req)
                    break
        return stopped

    def _take_prompt_logprobs(self, chunks: dict[str, PromptLogprobsChunk]) -> None:
        """Keep the prompt positions a plan scored (a position scored again, by a recomputed or
        a sibling sample, keeps its first value)."""
        for req_id, chunk in chunks.items():
            sample = self._samples.get(req_id)
            group = None if sample is None else self.groups.get(sample.request.group_id or req_id)
            if group is None or group.prompt_logprobs is None:
                continue
            kept = group.prompt_logprobs
            for j, (lp, rank, top) in enumerate(zip(chunk.logprobs, chunk.ranks, chunk.top)):
                if chunk.start + j < len(kept) and kept[chunk.start + j] is None:
                    kept[chunk.start + j] = (lp, rank, top)

    def _decoder(self, ids: set[int]):
        """id -> the token decoded alone (None without a tokenizer)."""
        if self.tokenizer is None:
            return lambda t: None
        order = sorted(ids)
        text = dict(zip(order, self.tokenizer.decode_tokens(order)))
        return text.get

    def _sample_logprobs(self, s: _Sample, keep: int) -> list[dict[int, Logprob]]:
        """vLLM's shape: per output token the sampled token first, then the top ones by rank."""
        tokens = s.request.output_token_ids[:keep]
        tops = s.top_logprobs[:keep] or [{}] * len(tokens)
        ranks = s.ranks[:keep] or [None] * len(tokens)
        text = self._decoder({t for t in tokens} | {t for top in tops for t in top})
        steps = []
        for token, lp, rank, top in zip(tokens, s.logprobs, ranks, tops):
            step = {token: Logprob(lp, rank, text(token))}
            for r, (t, v) in enumerate(top.items(), start=1):
                step[t] = Logprob(v, r, text(t))
            steps.append(step)
        return steps

    def _prompt_logprobs(self, group: _Group) -> list[dict[int, Logprob] | None]:
        """vLLM's shape: None for the first prompt token, then each token and the top ones."""
        entries, prompt = group.prompt_logprobs, group.prompt_token_ids
        text = self._decoder(set(prompt) | {t for e in entries if e for t in e[2]})
        out: list[dict[int, Logprob] | None] = [None] * len(prompt)
        for j in range(1, len(prompt)):
            if entries[j] is None:
                continue
            lp, rank, top = entries[j]
            step = {prompt[j]: Logprob(lp, rank, text(prompt[j]))}
            for r, (t, v) in enumerate(top.items(), start=1):
                step[t] = Logprob(v, r, text(t))
            out[j] = step
        return out

    def finish(self, requests: list[Request]) -> list[RequestOutput]:
        """Mark samples done; the groups whose samples are all done are returned."""
        ready = []
        for req in requests:
            sample = self._samples.get(req.request_id)
            if sample is None or sample.done:
                continue
            sample.done = True
            group = self.groups[req.group_id or req.request_id]
            if all(s.done for s in group.samples):
                ready.append(self._group_output(group))
                del self.groups[group.request_id]
                for s in group.samples:
                    self._samples.pop(s.request.request_id, None)
        return ready

    def _stop_string(self, sample: _Sample) -> bool:
        params = sample.request.sampling_params
        if len(sample.request.output_token_ids) < params.min_tokens:
            return False
        text, matched = find_stop_string(sample.text, params.stop,
                                         include_stop_str_in_output=params.include_stop_str_in_output)
        if matched is None:
            return False
        sample.text, sample.stop_reason = text, matched
        return True

    def _group_output(self, group: _Group) -> RequestOutput:
        outputs, error = [], group.error
        metrics = RequestMetrics(arrival_time=group.arrival_time)
        for s in group.samples:
            req = s.request
            if req.error and not error:
                error = req.error
            reason = "stop" if s.keep is not None else req.finish_reason
            stop_reason = s.stop_reason if s.stop_reason is not None else req.stop_reason
            params = req.sampling_params
            if s.detok is None and self.tokenizer is not None:
                s.text = self.tokenizer.decode(req.output_token_ids,
                                               skip_special_tokens=params.skip_special_tokens)
            keep = s.keep if s.keep is not None else len(req.output_token_ids)
            valid = None
            if self.structured is not None:
                valid = self.structured.valid(req.request_id, keep)
                self.structured.release(req.request_id)
            logprobs = s.logprobs[:keep]
            outputs.append(CompletionOutput(
                index=req.sample_index, text=s.text, token_ids=list(req.output_token_ids[:keep]),
                cumulative_logprob=sum(logprobs) if logprobs else None,
                logprobs=self._sample_logprobs(s, keep) if params.logprobs is not None else None,
                finish_reason=reason, stop_reason=stop_reason, structured_output_valid=valid))
            m = req.metrics
            for name in ("first_scheduled_time", "first_token_time"):
                v = getattr(m, name)
                if v is not None and (getattr(metrics, name) is None or v < getattr(metrics, name)):
                    setattr(metrics, name, v)
        if error and not outputs:
            outputs.append(CompletionOutput(index=0, text="", token_ids=[], finish_reason="error"))
        metrics.finished_time = time.time()
        cached = group.samples[0].request.num_cached_tokens if group.samples else 0
        prompt_logprobs = None
        if group.prompt_logprobs is not None and not error:
            prompt_logprobs = self._prompt_logprobs(group)
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outputs,
                             num_cached_tokens=cached, finished=True, error=error, metrics=metrics,
                             prompt_logprobs=prompt_logprobs)
