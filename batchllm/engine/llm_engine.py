"""LLMEngine: one model on one device, fed request by request (add_request / step / has_unfinished_requests)."""
from __future__ import annotations

import time
from collections.abc import Sequence

from batchllm.config import EngineConfig
from batchllm.core.outputs import RequestOutput
from batchllm.core.request import Request, RequestStatus
from batchllm.engine.build import PhaseCallback, build_engine_parts
from batchllm.engine.output_processor import OutputProcessor
from batchllm.sampling_params import SamplingParams


class LLMEngine:
    """One model on one device: requests in, finished RequestOutputs out, one step at a time."""

    def __init__(self, config: EngineConfig, skip_tokenizer_init: bool = False,
                 on_phase: PhaseCallback | None = None):
        """`on_phase(text)`: told of each loading phase (weights, KV cache, CUDA graphs)."""
        parts = build_engine_parts(config, skip_tokenizer_init, on_phase)
        self.config, self.device, self.backend = parts.config, parts.device, parts.backend
        self.tokenizer, self.model, self.hf_config = parts.tokenizer, parts.model, parts.hf_config
        self.kv_cache, self.runner, self.scheduler = parts.kv_cache, parts.runner, parts.scheduler
        self.tp_group = parts.tp_group  # tensor parallelism: the other ranks' processes
        self.max_model_len = parts.max_model_len
        self.vocab_size = parts.hf_config.vocab_size
        self.eos_token_id = parts.eos_token_ids[0] if parts.eos_token_ids else None
        self.extra_eos_ids = parts.eos_token_ids[1:]
        self.num_blocks, self.num_cpu_blocks = self.kv_cache.num_blocks, self.kv_cache.num_cpu_blocks
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured = None  # structured.StructuredOutputs, made for the first constrained request
        self._async = bool(self.config.scheduler.async_scheduling)
        self._inflight = None  # (plan, handle) launched, its results not yet applied
        self._ready: list[RequestOutput] = []
        self._num_prompt_tokens = 0
        self._num_unshared = 0  # requests kept off the prefix cache (prompt_logprobs)

    # ------------------------------------------------------------------ requests in
    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue one request. Row-level problems come back from step() as an output with `error`."""
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        params = sampling_params or SamplingParams()
        arrival = arrival_time if arrival_time is not None else time.time()
        text = prompt if isinstance(prompt, str) else None
        ids, error = self._prompt_ids(prompt)
        if not error and (params.truncate_prompt_tokens is not None or params.prompt_logprobs
                          is not None or params.needs_logits_processing):
            ids, params, error = self._vllm_settings(ids, params)
        if self.extra_eos_ids and not params.ignore_eos:
            params = params.with_overrides(
                stop_token_ids=list(params.stop_token_ids) + self.extra_eos_ids)
        requests = [] if error else [
            Request(request_id if params.n == 1 else f"{request_id}#{i}", ids, params, arrival,
                    eos_token_id=self.eos_token_id, group_id=request_id, sample_index=i,
                    seed=None if params.seed is None else params.seed + i)
            for i in range(params.n)]
        if requests and params.structured_outputs is not None:
            error = self._constrain(requests, params)
            requests = [] if error else requests
        failed = self.outputs.add_group(request_id, text, ids, arrival, requests, error)
        if failed is not None:
            self._ready.append(failed)
            return
        for req in requests:
            self.scheduler.add_request(req)
        self._num_prompt_tokens += len(ids)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt.strip():
                return [], "prompt is empty"
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine was built with "
                                 "skip_tokenizer_init=True, so pass token ids")
            return self.tokenizer.encode(prompt), None
        if prompt is None:
            return [], "prompt is null"
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            return [], "prompt token ids must be integers"
        if not ids:
            return [], "prompt is empty"
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            return ids, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        return ids, None

    def _vllm_settings(self, ids: list[int], params: SamplingParams
                       ) -> tuple[list[int], SamplingParams, str | None]:
        """truncate_prompt_tokens, prompt_logprobs, bad_words, logit_bias / allowed_token_ids:
        (prompt ids, params for the scheduler and sampler, why the request cannot run)."""
        keep = params.truncate_prompt_tokens
        if keep is not None:
            ids = ids[-(self.max_model_len if keep == -1 else keep):]
        overrides: dict = {}
        if params.prompt_logprobs is not None:
            # every prompt position must be computed, so the request's blocks match no cached
            # ones (vLLM skips the prefix cache for it too); its own recompute still hits them
            self._num_unshared += 1
            overrides["extra_keys"] = tuple(params.extra_keys) + (("prompt_logprobs",
                                                                   self._num_unshared),)
        for name, given in (("logit_bias", list(params.logit_bias or {})),
                            ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = [t for t in given if not 0 <= t < self.vocab_size]
            if bad:
                return ids, params, (f"{name}: token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")
        if params.bad_words:
            if self.tokenizer is None:
                return ids, params, ("bad_words needs the tokenizer; this engine was built with "
                                     "skip_tokenizer_init=True")
            from batchllm.tokenizer import TokenizerError

            try:
                overrides["_bad_words_token_ids"] = self.tokenizer.bad_words_token_ids(params.bad_words)
            except TokenizerError as e:
                return ids, params, str(e)
        return ids, params.with_overrides(**overrides) if overrides else params, None

    def _constrain(self, requests: list[Request], params: SamplingParams) -> str | None:
        """Give each sample its grammar matcher; why it cannot be constrained, or None."""
        from batchllm.structured import StructuredOutputError

        if self.tokenizer is None:
            return ("structured output needs the tokenizer; this engine was built with "
                    "skip_tokenizer_init=True")
        try:
            if self.structured is None:
                from batchllm.structured import StructuredOutputs

                eos = [self.eos_token_id] + self.extra_eos_ids if self.eos_token_id is not None else []
                self.structured = StructuredOutputs(self.tokenizer.hf, self.vocab_size, eos)
                self.outputs.structured = self.structured
            self.structured.add(requests, params.structured_outputs)
        except StructuredOutputError as e:
            return str(e)
        return None

    def abort_request(self, request_id: str) -> None:
        self.scheduler.finish_requests(self.outputs.unfinished_sample_ids(request_id),
                                       RequestStatus.FINISHED_ABORTED)

    # ------------------------------------------------------------------ the loop
    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.groups) or bool(self._ready) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.outputs.groups)

    def step(self) -> list[RequestOutput]:
        """Schedule, run, update; returns the requests whose samples all finished this step.

        With async scheduling the next plan is scheduled and queued on the device before this
        one's results are applied, so the device never waits for the host's bookkeeping."""
        if self._inflight is None:
            plan = self.scheduler.schedule()
            handle = self._launch(plan)
        else:
            (plan, handle), self._inflight = self._inflight, None
        if self._async and plan.chunks:
            nxt = self.scheduler.schedule()
            self._inflight = (nxt, self._launch(nxt, handle))
        out = self.runner.collect(handle)
        finished = self.scheduler.update(plan, out)
        ended = self._advance_grammars(out)
        stopped = self.outputs.process(out)
        if stopped:
            self.scheduler.finish_requests([r.request_id for r in stopped], RequestStatus.FINISHED_STOPPED)
        ready, self._ready = self._ready + self.outputs.finish(finished + ended + stopped), []
        return ready

    def _launch(self, plan, prev=None):
        """Queue a plan on the device, with its constrained rows' grammar mask (built here, on the
        CPU, while the device runs the plan before)."""
        if self.structured is not None and self.structured.active:
            plan.grammar = self.structured.bitmask(plan)
        return self.runner.launch(plan, prev)

    def _advance_grammars(self, out) -> list[Request]:
        """Feed the kept tokens to the constrained requests' matchers; a complete grammar ends its
        request ("stop"), a token it refuses is an error. Returns the requests ended here."""
        if self.structured is None or not self.structured.active:
            return []
        complete, refused = self.structured.advance(out.req_ids)
        if complete:
            self.scheduler.finish_requests([r.request_id for r in complete], RequestStatus.FINISHED_STOPPED)
        live = [r.request_id for r in refused if not r.is_finished]
        if live:
            self.scheduler.finish_requests(live, RequestStatus.FINISHED_ERROR)
        return complete + refused

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do for one rank)."""
        if self.tp_group is not None:
            self.tp_group.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    def stats(self) -> dict:
        s = dict(self.scheduler.stats)
        s.update(num_prompt_tokens=self._num_prompt_tokens,
                 num_generated_tokens=self.outputs.num_generated_tokens,
                 num_gpu_blocks=self.num_blocks, num_cpu_blocks=self.num_cpu_blocks,
                 num_oom_splits=self.runner.num_oom_splits,
                 num_shared_prefix_steps=self.runner.num_shared_prefix_steps)
        return s
