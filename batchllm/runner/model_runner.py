"""Runs plans on a device: plan → host batch → forward → sample, queued (`launch`) then awaited (`collect`).

`execute(plan)` is `collect(launch(plan))`. A plan made while the one before it still runs takes
its placeholder inputs from that plan's samples on the device (`SchedulerOutput.prev_rows`).
Under tensor parallelism every rank runs the same plans on its shard; rank 0 (the one with a
sampler) sends each plan to the others first, samples, and broadcasts the sampled tokens, which
the other ranks feed to their next sub-step or plan.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

import torch.distributed as dist

from batchllm.core.outputs import RunnerOutput, ScheduledChunk, SchedulerOutput
from batchllm.distributed.parallel_state import get_tensor_parallel_group
from batchllm.layers.attention import AttentionMetadata
from batchllm.runner.cascade import CascadePolicy
from batchllm.runner.inflight import InflightRound, collect_results, merge_outputs, queue_results
from batchllm.runner.input_batch import HostBatch, build_host_batch, build_round_batch, longest_first
from batchllm.runner.kv_cache import KVCache
from batchllm.runner.prompt_logprobs import PromptRows, prompt_columns, prompt_rows
from batchllm.runner.sampler import Sampler
from batchllm.sampling_params import SamplingParams


class EngineFaultError(RuntimeError):
    """The device could not run a step even after shrinking it; the job should stop."""


class ModelRunner:
    """Owns the model, the KV cache and the sampler; never mutates requests or block tables."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler: Sampler | None,
                 block_size: int, device: torch.device, eos_token_id: int | None,
                 cascade: CascadePolicy | None = None):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler  # no sampler: rank > 0
        self.tp = get_tensor_parallel_group()
        self.tp_group = None  # rank 0 under tensor parallelism: sends plans (distributed.group)
        self.cascade = cascade or CascadePolicy(False, block_size)
        self.num_shared_prefix_steps = 0
        self.eos_token_id = eos_token_id
        self.block_size, self.device = block_size, device
        self.layer_caches = kv_cache.layer_caches()
        self._pin = device.type == "cuda"
        self.graphs = None  # DecodeGraphs, set by capture_decode_graphs
        self.num_oom_splits = 0
        # requests that asked for prompt log-probs: req_id -> (top k, prompt token ids); every
        # rank keeps it, as every rank computes the same logits rows
        self._prompt_logprobs: dict[str, tuple[int, list[int]]] = {}

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        from batchllm.runner.cuda_graphs import DecodeGraphs

        max_blocks = (max_model_len + self.block_size - 1) // self.block_size
        min_reqs = self.cascade.min_reqs if self.cascade.enabled else None
        graphs = DecodeGraphs(self.model, self.layer_caches, self.device, max_batch, max_blocks,
                              max_model_len, shared_prefix_min_reqs=min_reqs)
        graphs.capture()
        self.graphs = graphs

    # ------------------------------------------------------------------ the two calls
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        """Run a plan and wait for its samples."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, prev: InflightRound | None = None) -> InflightRound:
        """Apply the plan's block moves (swap out, swap in, copy-on-write) and queue its forward
        and sampling on the device without waiting; `prev`: the plan launched before it, whose
        samples feed this plan's placeholder inputs (plan.prev_rows)."""
        if self.tp_group is not None:
            self.tp_group.send(plan)
        failed = self._apply_plan(plan)
        handle = self._launch(plan, prev)
        handle.failed = failed or None
        return handle

    def _launch(self, plan: SchedulerOutput, prev: InflightRound | None) -> InflightRound:
        if not plan.chunks:
            return InflightRound.done(RunnerOutput(), self.device)
        rows = None
        if plan.prev_rows is not None:
            assert prev is not None, "a plan with placeholder inputs needs the plan before it"
            rows = np.asarray(plan.prev_rows, dtype=np.int64)
        if plan.num_steps > 1:
            return self._launch_round(plan.chunks, plan.num_steps, rows, prev)
        try:
            return self._launch_step(plan.chunks, rows, prev)
        except torch.cuda.OutOfMemoryError as exc:
            if self.tp.size > 1:  # every rank would have to split alike
                raise EngineFaultError("out of device memory in a tensor-parallel step; lower "
                                       "max_num_batched_tokens or gpu_memory_utilization") from exc
            chunks = plan.chunks
            if rows is not None:  # the halves run from host tokens: resolve the placeholders
                last = prev.host_tokens()
                chunks = [replace(c, token_ids=c.token_ids[:-1] + [last[r]]) if r >= 0 else c
                          for c, r in zip(chunks, rows)]
            return InflightRound.done(self._split(chunks, exc), self.device)

    def collect(self, handle: InflightRound) -> RunnerOutput:
        """Wait for a launched plan (only for it) and shape its samples per request."""
        return collect_results(handle)

    # ------------------------------------------------------------------ internals
    def _apply_plan(self, plan: SchedulerOutput) -> dict[str, str]:
        """The plan's bookkeeping and block moves (swap out, swap in, copy-on-write), in order.
        Returns the new requests the sampler could not take (req_id -> why): they run this step
        with default sampling and come back as errors, so one bad request fails alone."""
        failed: dict[str, str] = {}
        if self.sampler is not None:
            for req_id in plan.finished_req_ids:
                self.sampler.remove_request(req_id)
        if self._prompt_logprobs:
            for req_id in plan.finished_req_ids:
                self._prompt_logprobs.pop(req_id, None)
        for new in plan.new_requests:
            if new.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs[new.req_id] = (new.sampling_params.prompt_logprobs,
                                                     list(new.prompt_token_ids))
        self.kv_cache.swap_out(plan.swap_out)
        self.kv_cache.swap_in(plan.swap_in)
        self.kv_cache.copy(plan.copy_blocks)
        if self.sampler is not None:
            for new in plan.new_requests:
                try:
                    self.sampler.add_request(new.req_id, new.prompt_token_ids, new.sampling_params,
                                             new.seed, self.eos_token_id)
                except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
                    self.sampler.add_request(new.req_id, new.prompt_token_ids, SamplingParams(),
                                             None, self.eos_token_id)
                    failed[new.req_id] = (f"request {new.req_id!r}: its sampling settings could "
                                          f"not be applied: {type(exc).__name__}: {exc}")
            self.sampler.set_grammar(plan.grammar)  # structured output: the constrained rows' mask
        return failed

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _input_ids(self, hb: HostBatch, rows: np.ndarray | None, prev: InflightRound | None) -> torch.Tensor:
        """The step's input ids on the device; a chunk whose last input is a placeholder takes
        the last token the plan before sampled in its row."""
        ids = self._to_device(hb.input_ids)
        fed = np.flatnonzero(rows >= 0) if rows is not None else ()
        if len(fed):
            ids[self._to_device(hb.query_start[fed + 1] - 1)] = prev.last_tokens[self._to_device(rows[fed])]
        return ids

    def _launch_step(self, chunks: list[ScheduledChunk], rows: np.ndarray | None,
                     prev: InflightRound | None) -> InflightRound:
        hb = build_host_batch(chunks, self.block_size)
        prompt = None
        if self._prompt_logprobs:
            prompt = prompt_rows(chunks, hb.query_start, self._prompt_logprobs)
        logits, scored = self._step_logits(hb, self._input_ids(hb, rows, prev), prompt)
        if not hb.sample_req_ids and scored is None:
            return InflightRound.done(RunnerOutput(), self.device)
        samples = [self._sample(logits, hb.sample_req_ids)] if hb.sample_req_ids else []
        active = np.ones((1, len(hb.sample_req_ids)), dtype=bool)
        last = samples[0].tokens if samples else torch.empty(0, dtype=torch.long, device=self.device)
        return self._results(hb.sample_req_ids, active, samples, last,
                             None if scored is None else (prompt.spans, prompt.k, scored))

    def _sample(self, logits: torch.Tensor, req_ids: list[str], active: list[bool] | None = None):
        """Rank 0 samples (and broadcasts the tokens under tensor parallelism); the other ranks
        take the broadcast tokens. `active`: the rows whose samples count (see Sampler)."""
        if self.sampler is not None:
            sample = self.sampler.sample_on_device(logits, req_ids, active)
            if self.tp.size > 1:
                dist.broadcast(sample.tokens, src=0, group=self.tp.group)
            return sample
        tokens = torch.empty(len(req_ids), dtype=torch.long, device=self.device)
        dist.broadcast(tokens, src=0, group=self.tp.group)
        return _Tokens(tokens)

    def _results(self, req_ids: list[str], active: np.ndarray, samples: list,
                 last: torch.Tensor, prompt: tuple | None = None) -> InflightRound:
        if self.sampler is None:  # rank > 0: only the last tokens matter (they feed the next plan)
            return InflightRound(req_ids, active, [], last, None, None, RunnerOutput())
        return queue_results(req_ids, active, samples, last, prompt)

    def _split(self, chunks: list[ScheduledChunk], exc: Exception) -> RunnerOutput:
        """Run a step that ran out of device memory in two halves instead. Requests of one step
        are independent (each attends to its own blocks and writes its own slots), so splitting
        changes no result, only the peak memory."""
        if len(chunks) == 1:
            raise EngineFaultError(
                f"out of device memory even for a single request's step ({len(chunks[0].token_ids)} "
                "tokens); lower max_num_batched_tokens or gpu_memory_utilization") from exc
        torch.cuda.empty_cache()
        self.num_oom_splits += 1
        half = len(chunks) // 2
        return merge_outputs(self._run_now(chunks[:half]), self._run_now(chunks[half:]))

    def _run_now(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        try:
            return collect_results(self._launch_step(chunks, None, None))
        except torch.cuda.OutOfMemoryError as exc:
            return self._split(chunks, exc)

    def _step_logits(self, hb: HostBatch, input_ids: torch.Tensor, prompt: PromptRows | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of one step's sampled rows (a CUDA graph for a decode batch it covers, else
        eager) and the prompt log-prob columns of `prompt`'s rows (None without)."""
        prefix = self.cascade.shared_tokens(hb.block_tables, hb.positions) if hb.is_decode else 0
        self.num_shared_prefix_steps += prefix > 0
        if self.graphs is not None and hb.is_decode and len(hb.seq_lens) <= self.graphs.max_batch \
                and prompt is None:  # (a decode batch has no prompt rows)
            return self.graphs.run(input_ids, self._to_device(hb.positions),
                                   self._to_device(hb.slot_mapping),
                                   self._to_device(hb.seq_lens.astype(np.int32)),
                                   self._to_device(hb.block_tables.astype(np.int32)), prefix,
                                   self._to_device(longest_first(hb.seq_lens))), None
        meta = AttentionMetadata(
            slot_mapping=self._to_device(hb.slot_mapping),
            query_start_loc=self._to_device(hb.query_start.astype(np.int32)),
            seq_lens=self._to_device(hb.seq_lens.astype(np.int32)),
            block_tables=self._to_device(hb.block_tables.astype(np.int32)),
            max_query_len=hb.max_query_len, max_seq_len=int(hb.seq_lens.max()),
            shared_prefix_len=self._prefix_tensor(prefix),
            seq_order=self._to_device(longest_first(hb.seq_lens)) if hb.is_decode else None)
        hidden = self.model(input_ids, self._to_device(hb.positions), self.layer_caches, meta)
        logits = self.model.compute_logits(hidden[self._to_device(hb.logits_indices)])
        if prompt is None:
            return logits, None
        return logits, prompt_columns(self.model.compute_logits, hidden, self._to_device(prompt.rows),
                                      self._to_device(prompt.targets), prompt.k,
                                      score=self.sampler is not None)

    def _prefix_tensor(self, n: int) -> torch.Tensor | None:
        return self._to_device(np.array([n], dtype=np.int32)) if n else None

    def _launch_round(self, chunks: list[ScheduledChunk], num_steps: int, rows: np.ndarray | None,
                      prev: InflightRound | None) -> InflightRound:
        """Several decode steps in a row, each fed by the tokens sampled on the device before it
        (see input_batch.RoundBatch for which request writes where in each sub-step)."""
        rb = build_round_batch(chunks, num_steps, self.block_size)
        hb, num_reqs = rb.host, len(chunks)
        positions = self._to_device(rb.positions)
        slot_mapping = self._to_device(rb.slots)
        seq_lens = self._to_device((rb.positions + 1).astype(np.int32))
        block_tables = self._to_device(hb.block_tables.astype(np.int32))
        query_start = self._to_device(np.arange(num_reqs + 1, dtype=np.int32))
        order = self._to_device(longest_first(hb.positions))  # every context grows alike: one order per round
        ids = self._input_ids(hb, rows, prev)
        req_ids = hb.sample_req_ids
        use_graphs = self.graphs is not None and num_reqs <= self.graphs.max_batch
        prefix = self.cascade.shared_tokens(hb.block_tables, hb.positions)  # holds for the whole round
        prefix_tensor = None if use_graphs else self._prefix_tensor(prefix)
        self.num_shared_prefix_steps += num_steps if prefix else 0
        samples = []
        every = bool(rb.active.all())  # usual: every request runs the whole round
        for step in range(num_steps):
            if use_graphs:
                logits = self.graphs.run(ids, positions[step], slot_mapping[step], seq_lens[step],
                                         block_tables, prefix, order)
            else:
                meta = AttentionMetadata(slot_mapping[step], query_start, seq_lens[step], block_tables,
                                         max_query_len=1, max_seq_len=int(rb.positions[step].max()) + 1,
                                         shared_prefix_len=prefix_tensor, seq_order=order)
                hidden = self.model(ids, positions[step], self.layer_caches, meta)
                logits = self.model.compute_logits(hidden)
            sample = self._sample(logits, req_ids, None if every else rb.active[step].tolist())
            samples.append(sample)
            ids = sample.tokens
        # each request's last token of this round: what the plan after it is fed
        tokens = torch.stack([d.tokens for d in samples])  # [steps, reqs]
        last = tokens[self._to_device(rb.last_step), torch.arange(num_reqs, device=tokens.device)]
        return self._results(req_ids, rb.active, samples, last)


class _Tokens:
    """Sampled tokens as a rank > 0 receives them."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
