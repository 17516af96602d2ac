"""LLMEngine: one model on one device, fed request by request (add_request / step / has_unfinished_requests)."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from batchllm.config import ConfigError, EngineConfig
from batchllm.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from batchllm.core.request import Request, RequestStatus
from batchllm.core.scheduler import Scheduler
from batchllm.runner.kv_cache import KVCache, bytes_per_block, num_device_blocks
from batchllm.runner.model_runner import ModelRunner, activation_bytes_estimate
from batchllm.sampling_params import SamplingParams

# Decode batches up to this size replay CUDA graphs (larger ones run eagerly); one graph per
# captured size (runner/cuda_graphs.capture_sizes), two where shared-prefix attention is on.
MAX_GRAPH_BATCH = 1024


@dataclass(slots=True)
class _Sample:
    """Engine-side state of one sample: detokenizer, logprobs, whether it is done."""

    request: Request
    detok: object | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    stop_reason: int | str | None = None
    done: bool = False
    num_seen: int = 0  # output tokens the engine has processed
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is visible; use device: cpu")
    return torch.device(name)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for the kv_cache_dtype setting."""
    return torch.float8_e4m3fn if name in ("fp8", "fp8_e4m3") else model_dtype


def resolve_backend(name: str, device: torch.device) -> str:
    from batchllm.kernels import triton_available

    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise ConfigError("attention_backend='triton' needs triton and a CUDA device "
                          "(or TRITON_INTERPRET=1); use attention_backend: torch")
    return name


class LLMEngine:
    """One model on one device: requests in, finished RequestOutputs out, one step at a time."""

    def __init__(self, config: EngineConfig, skip_tokenizer_init: bool = False):
        from batchllm.kernels import get_kernels
        from batchllm.layers.sampler import Sampler
        from batchllm.loader import load_model

        self.config = config
        self.device = resolve_device(config.device)
        self.tokenizer = None
        if not skip_tokenizer_init:
            from batchllm.tokenizer import Tokenizer
            from batchllm.hub import resolve_model

            self.tokenizer = Tokenizer.load(str(resolve_model(config.model.tokenizer or config.model.model)),
                                            trust_remote_code=config.model.trust_remote_code)
        model, hf_config = load_model(config.model, self.device)
        self.backend = resolve_backend(config.attention_backend, self.device)
        model.use_kernels(get_kernels(self.backend))
        self.model, self.hf_config = model, hf_config
        self.max_model_len = self._max_model_len(config, hf_config)
        self.vocab_size = hf_config.vocab_size
        eos = self.tokenizer.eos_token_id if self.tokenizer else getattr(hf_config, "eos_token_id", None)
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        self.eos_token_id = eos_ids[0] if eos_ids else None
        self.extra_eos_ids = eos_ids[1:]

        f = model.family
        dtype = kv_cache_dtype(config.cache.kv_cache_dtype, next(model.parameters()).dtype)
        block_size = config.cache.block_size
        block_bytes = bytes_per_block(hf_config.num_hidden_layers, block_size, f.num_kv_heads,
                                      f.head_dim, dtype)
        sched = config.scheduler
        self.sampler = Sampler(self.device, hf_config.vocab_size)
        activation = activation_bytes_estimate(model, sched.max_num_batched_tokens, sched.max_num_seqs)
        num_blocks = config.cache.num_gpu_blocks_override or num_device_blocks(
            self.device, block_bytes, config.cache.gpu_memory_utilization,
            config.cache.cpu_kv_cache_bytes, activation)
        if num_blocks < 2:
            raise ConfigError(f"no room for a KV cache on {self.device} ({num_blocks} blocks of "
                              f"{block_bytes} bytes); raise gpu_memory_utilization or use a smaller model")
        num_cpu_blocks = int(config.cache.swap_space * (1 << 30)) // block_bytes
        self.kv_cache = KVCache(hf_config.num_hidden_layers, num_blocks, num_cpu_blocks, block_size,
                                f.num_kv_heads, f.head_dim, dtype, self.device)
        self.runner = ModelRunner(model, self.kv_cache, self.sampler, block_size, self.device,
                                  self.eos_token_id,
                                  shared_prefix=config.cascade_attention and self.backend == "triton")
        if self.device.type == "cuda" and self.backend == "triton" and not config.enforce_eager:
            self.runner.capture_decode_graphs(min(sched.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len)
        if sched.num_decode_steps is None:
            sched = replace(sched, num_decode_steps=8 if self.device.type == "cuda" else 1)
        if sched.async_scheduling is None:
            sched = replace(sched, async_scheduling=self.device.type == "cuda")
        self._inflight = None  # (plan, InflightRound) queued on the device, not yet applied
        self.scheduler = Scheduler(sched, config.cache, num_blocks, num_cpu_blocks, self.max_model_len)
        self.num_blocks, self.num_cpu_blocks = num_blocks, num_cpu_blocks
        self._groups: dict[str, _Group] = {}
        self._samples: dict[str, _Sample] = {}
        self._ready: list[RequestOutput] = []
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0

    @staticmethod
    def _max_model_len(config: EngineConfig, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 4096
        asked = config.model.max_model_len
        if asked is not None and asked > limit:
            raise ConfigError(f"max_model_len={asked} exceeds the model's max_position_embeddings "
                              f"({limit}); use at most {limit}")
        return asked or limit

    # ------------------------------------------------------------------ requests in
    def add_request(self, request_id: str, prompt: str | Sequence[int],
                    sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue one request. Row-level problems come back from step() as an output with `error`."""
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        params = sampling_params or SamplingParams()
        arrival = arrival_time if arrival_time is not None else time.time()
        text = prompt if isinstance(prompt, str) else None
        ids, error = self._prompt_ids(prompt)
        group = _Group(request_id, text, ids, arrival)
        self._groups[request_id] = group
        if error:
            group.error = error
            self._ready.append(self._group_output(group))
            del self._groups[request_id]
            return
        if self.extra_eos_ids and not params.ignore_eos:
            params = params.with_overrides(
                stop_token_ids=list(params.stop_token_ids) + self.extra_eos_ids)
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            req_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(req_id, ids, params, arrival, eos_token_id=self.eos_token_id,
                          group_id=request_id, sample_index=i, seed=seed)
            detok = None
            # Incremental detokenization is only needed to watch for stop strings; otherwise the
            # text is decoded once when the sample finishes (same text, far less per-step work).
            if self.tokenizer is not None and params.stop:
                from batchllm.tokenizer import IncrementalDetokenizer

                detok = IncrementalDetokenizer(self.tokenizer, ids,
                                               skip_special_tokens=params.skip_special_tokens)
            sample = _Sample(req, detok)
            group.samples.append(sample)
            self._samples[req_id] = sample
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

    def abort_request(self, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is None:
            return
        ids = [s.request.request_id for s in group.samples if not s.done]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    # ------------------------------------------------------------------ the loop
    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or bool(self._ready) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def step(self) -> list[RequestOutput]:
        """Schedule, run, update; returns the requests whose samples all finished this step.

        With async scheduling, steps and multi-step decode rounds are pipelined: the plan after
        the one being applied is already queued on the device, so the device does not wait for
        the host's planning and bookkeeping. `self._inflight` holds the queued plan across calls."""
        handle = None
        if self._inflight is not None:
            (plan, handle), self._inflight = self._inflight, None
        else:
            plan = self.scheduler.schedule()
            if plan.chunks and self.scheduler.config.async_scheduling:
                handle = self.runner.launch(plan)
        if handle is not None:
            self._queue_next(plan, handle)
            out = self.runner.collect(handle)
        else:
            out = self.runner.execute(plan)
        finished = self.scheduler.update(plan, out)
        stopped: list[Request] = []
        multi = out.step_token_ids is not None
        for i, req_id in enumerate(out.req_ids):
            sample = self._samples.get(req_id)
            if sample is None or sample.keep is not None:
                continue
            req = sample.request
            # the tokens the scheduler accepted this step (a multi-step chunk may end early)
            tokens = req.output_token_ids[sample.num_seen:]
            lps = out.step_logprobs[i] if multi else ([out.logprobs[i]] if out.logprobs else None)
            tops = (out.step_top_logprobs[i] if multi else [out.top_logprobs[i]]) \
                if out.top_logprobs is not None else None
            if sample.detok is None:  # no stop strings to watch: take the round's tokens at once
                n = len(tokens)
                self._num_generated_tokens += n
                sample.num_seen += n
                if lps is not None:
                    sample.logprobs.extend(lps[:n])
                if tops is not None:
                    sample.top_logprobs.extend(tops[:n])
                continue
            for j in range(len(tokens)):
                self._num_generated_tokens += 1
                sample.num_seen += 1
                if lps is not None:
                    sample.logprobs.append(lps[j])
                if tops is not None:
                    sample.top_logprobs.append(tops[j])
                sample.text += sample.detok.append([tokens[j]])
                if req.sampling_params.stop and self._check_stop(sample):
                    sample.keep = sample.num_seen
                    if not req.is_finished:
                        stopped.append(req)
                    break
        if stopped:
            self.scheduler.finish_requests([r.request_id for r in stopped],
                                           RequestStatus.FINISHED_STOPPED)
        for req in list(finished) + stopped:
            sample = self._samples.get(req.request_id)
            if sample is None or sample.done:
                continue
            sample.done = True
            group = self._groups[req.group_id or req.request_id]
            if all(s.done for s in group.samples):
                self._ready.append(self._group_output(group))
                del self._groups[group.request_id]
                for s in group.samples:
                    self._samples.pop(s.request.request_id, None)
        ready, self._ready = self._ready, []
        return ready

    def _queue_next(self, plan, handle) -> None:
        """Queue the plan after `plan` (still running) on the device, if one can be planned now."""
        nxt = self.scheduler.schedule_after(plan)
        if nxt is not None:
            self._inflight = (nxt, self.runner.launch(nxt, handle))

    def _check_stop(self, sample: _Sample) -> bool:
        from batchllm.tokenizer import find_stop_string

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
            reason = req.finish_reason
            stop_reason = s.stop_reason if s.stop_reason is not None else req.stop_reason
            if s.detok is None and self.tokenizer is not None:
                s.text = self.tokenizer.decode(req.output_token_ids,
                                               skip_special_tokens=req.sampling_params.skip_special_tokens)
            keep = s.keep if s.keep is not None else len(req.output_token_ids)
            if s.keep is not None:
                reason = "stop"
            logprobs = s.logprobs[:keep]
            outputs.append(CompletionOutput(
                index=req.sample_index, text=s.text, token_ids=list(req.output_token_ids[:keep]),
                cumulative_logprob=sum(logprobs) if logprobs else None,
                logprobs=logprobs if req.sampling_params.logprobs is not None else None,
                top_logprobs=(s.top_logprobs[:keep] if req.sampling_params.logprobs else None),
                finish_reason=reason, stop_reason=stop_reason))
            m = req.metrics
            for name in ("first_scheduled_time", "first_token_time"):
                v = getattr(m, name)
                if v is not None and (getattr(metrics, name) is None or v < getattr(metrics, name)):
                    setattr(metrics, name, v)
        if error and not outputs:
            outputs.append(CompletionOutput(index=0, text="", token_ids=[], finish_reason="error"))
        metrics.finished_time = time.time()
        cached = group.samples[0].request.num_cached_tokens if group.samples else 0
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outputs,
                             num_cached_tokens=cached, finished=True, error=error, metrics=metrics)

    def stats(self) -> dict:
        s = dict(self.scheduler.stats)
        s.update(num_prompt_tokens=self._num_prompt_tokens,
                 num_generated_tokens=self._num_generated_tokens,
                 num_gpu_blocks=self.num_blocks, num_cpu_blocks=self.num_cpu_blocks,
                 num_oom_splits=self.runner.num_oom_splits,
                 num_shared_prefix_steps=self.runner.num_shared_prefix_steps)
        return s


def __getattr__(name: str):  # LLM lives in batchllm.llm; kept importable from here
    if name == "LLM":
        from batchllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'batchllm.engine' has no attribute {name!r}")
