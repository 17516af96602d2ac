"""Runs one SchedulerOutput on a device: plan → flattened token batch → forward → sample → RunnerOutput."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from batchllm.core.outputs import RunnerOutput, ScheduledChunk, SchedulerOutput
from batchllm.layers.attention import AttentionMetadata
from batchllm.layers.sampler import NONFINITE_ERROR
from batchllm.runner.kv_cache import KVCache


def longest_first(context_lens: np.ndarray) -> np.ndarray:
    """The decode batch's rows by context length, longest first (int32): the order in which the
    attention kernels start the requests, so the short ones fill in behind the long ones."""
    return np.argsort(-context_lens, kind="stable").astype(np.int32)


class EngineFaultError(RuntimeError):
    """The device could not run a step even after shrinking it; the job should stop."""


@dataclass(slots=True)
class HostBatch:
    """One step's flattened batch as host arrays (built once, vectorized over tokens)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start: np.ndarray  # [B + 1] int64
    seq_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, max_blocks] int64
    logits_indices: np.ndarray  # rows of the sampled tokens
    sample_req_ids: list[str]
    max_query_len: int

    @property
    def is_decode(self) -> bool:
        """Every request computes one token and samples it: the shape CUDA graphs serve."""
        return self.max_query_len == 1 and len(self.sample_req_ids) == len(self.seq_lens)


def build_host_batch(chunks: list[ScheduledChunk], block_size: int) -> HostBatch:
    num_reqs = len(chunks)
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=num_reqs)
    computed = np.fromiter((c.num_computed_tokens for c in chunks), dtype=np.int64, count=num_reqs)
    query_start = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=query_start[1:])
    total = int(query_start[-1])
    input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=total)
    max_blocks = max(len(c.block_table) for c in chunks)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
    for i, c in enumerate(chunks):
        block_tables[i, :len(c.block_table)] = c.block_table
    req_of_token = np.repeat(np.arange(num_reqs), q_lens)
    positions = computed[req_of_token] + (np.arange(total) - query_start[:-1][req_of_token])
    slot_mapping = block_tables[req_of_token, positions // block_size] * block_size + positions % block_size
    sampled = [i for i, c in enumerate(chunks) if c.sample]
    return HostBatch(input_ids, positions, slot_mapping, query_start, computed + q_lens, block_tables,
                     query_start[1:][sampled] - 1, [chunks[i].req_id for i in sampled],
                     int(q_lens.max()))


# A shared prefix is read once per step for the whole batch (cascade attention) only when that
# saves much: below these sizes, or when it would not at least halve the keys the batch reads,
# the extra partial results and merge cost about what they save (benchmarks/shared_prefix_bench.py:
# 8 requests of 2048 shared + 8192 own keys run 9% slower that way).
SHARED_PREFIX_MIN_TOKENS = 256
SHARED_PREFIX_MIN_REQS = 8


def shared_prefix_blocks(block_tables: np.ndarray, positions: np.ndarray, block_size: int) -> int:
    """How many leading blocks every request of a decode batch shares (the same block ids in
    every row), among the blocks wholly before each request's first query position: those are
    written already and this step writes none of them."""
    cap = int(positions.min()) // block_size
    head = block_tables[:, :cap]
    differs = (head != head[:1]).any(axis=0)
    return int(differs.argmax()) if differs.any() else cap


def shared_prefix_tokens(block_tables: np.ndarray, positions: np.ndarray, block_size: int) -> int:
    """How many leading keys a decode batch should read once for all its requests (0: read
    every request's keys per request): its shared blocks, when the batch and the shared part are
    large enough and sharing at least halves the keys read."""
    num_reqs = len(block_tables)
    if num_reqs < SHARED_PREFIX_MIN_REQS:
        return 0
    n = shared_prefix_blocks(block_tables, positions, block_size) * block_size
    own = int(positions.sum()) - num_reqs * n  # keys after the shared part, summed (about)
    return n if n >= SHARED_PREFIX_MIN_TOKENS and (num_reqs - 1) * n >= own else 0


class ModelRunner:
    """Owns the model, the KV cache and the sampler; never mutates requests or block tables."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler, block_size: int,
                 device: torch.device, eos_token_id: int | None, shared_prefix: bool = False):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler
        self.shared_prefix = shared_prefix  # the kernels can read a shared prefix once per batch
        self.num_shared_prefix_steps = 0
        self.eos_token_id = eos_token_id
        self.block_size, self.device = block_size, device
        self.layer_caches = kv_cache.layer_caches()
        self._pin = device.type == "cuda"
        self.graphs = None  # DecodeGraphs, set by capture_decode_graphs
        self.num_oom_splits = 0

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        from batchllm.runner.cuda_graphs import DecodeGraphs

        max_blocks = (max_model_len + self.block_size - 1) // self.block_size
        graphs = DecodeGraphs(self.model, self.layer_caches, self.device, max_batch, max_blocks,
                              max_model_len,
                              shared_prefix_min_reqs=SHARED_PREFIX_MIN_REQS if self.shared_prefix else None)
        graphs.capture()
        self.graphs = graphs

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _shared_prefix_len(self, block_tables: np.ndarray, positions: np.ndarray) -> int:
        if not self.shared_prefix:
            return 0
        return shared_prefix_tokens(block_tables, positions, self.block_size)

    def _prefix_tensor(self, n: int) -> torch.Tensor | None:
        return self._to_device(np.array([n], dtype=np.int32)) if n else None

    def _logits_eager(self, hb: HostBatch, input_ids: torch.Tensor, shared_prefix_len: int = 0) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self._to_device(hb.slot_mapping),
            query_start_loc=self._to_device(hb.query_start.astype(np.int32)),
            seq_lens=self._to_device(hb.seq_lens.astype(np.int32)),
            block_tables=self._to_device(hb.block_tables.astype(np.int32)),
            max_query_len=hb.max_query_len, max_seq_len=int(hb.seq_lens.max()),
            shared_prefix_len=self._prefix_tensor(shared_prefix_len),
            seq_order=self._to_device(longest_first(hb.seq_lens)) if hb.is_decode else None)
        hidden = self.model(input_ids, self._to_device(hb.positions), self.layer_caches, meta)
        return self.model.compute_logits(hidden[self._to_device(hb.logits_indices)])

    def _step_logits(self, hb: HostBatch, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of one step's sampled rows: a CUDA graph for a decode batch it covers, else eager."""
        prefix = self._shared_prefix_len(hb.block_tables, hb.positions) if hb.is_decode else 0
        self.num_shared_prefix_steps += prefix > 0
        if self.graphs is not None and hb.is_decode and len(hb.seq_lens) <= self.graphs.max_batch:
            return self.graphs.run(input_ids, self._to_device(hb.positions),
                                   self._to_device(hb.slot_mapping),
                                   self._to_device(hb.seq_lens.astype(np.int32)),
                                   self._to_device(hb.block_tables.astype(np.int32)), prefix,
                                   self._to_device(longest_first(hb.seq_lens)))
        return self._logits_eager(hb, input_ids, prefix)

    def _apply_plan(self, plan: SchedulerOutput) -> None:
        """The plan's bookkeeping and block moves (swap out, swap in, copy-on-write), in order."""
        for req_id in plan.finished_req_ids:
            self.sampler.remove_request(req_id)
        self.kv_cache.swap_out(plan.swap_out)
        self.kv_cache.swap_in(plan.swap_in)
        self.kv_cache.copy(plan.copy_blocks)
        for new in plan.new_requests:
            self.sampler.add_request(new, self.eos_token_id)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        """Apply the plan's block moves (swap out, swap in, copy-on-write), run, sample."""
        if plan.num_steps > 1:
            return self.collect(self.launch(plan))
        self._apply_plan(plan)
        if not plan.chunks:
            return RunnerOutput()
        return self._run(plan.chunks)

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, prev: "InflightRound | None" = None) -> "InflightRound":
        """Queue a plan on the device without waiting for it; `collect` waits.

        A chained plan (plan.prev_rows set) takes the input tokens of its fed chunks from `prev`,
        the plan queued just before it, on the device. The samples are copied to pinned host
        memory behind an event, so collecting a plan waits for it only, not for plans queued
        after it."""
        self._apply_plan(plan)
        rows = None
        if plan.prev_rows is not None:
            assert prev is not None, "a chained plan needs the one it follows"
            rows = np.asarray(plan.prev_rows, dtype=np.int64)
        if plan.num_steps > 1:
            feed = None if rows is None else prev.last_tokens.index_select(0, self._to_device(rows))
            return self._launch_multi_step(plan.chunks, plan.num_steps, feed)
        return self._launch_step(plan.chunks, rows, prev)

    def _launch_step(self, chunks: list[ScheduledChunk], rows: np.ndarray | None,
                     prev: "InflightRound | None") -> "InflightRound":
        """One ordinary step, queued: chunk i with rows[i] >= 0 is one token, the last that
        `prev` samples in its row rows[i]."""
        if not chunks:
            return InflightRound.done(RunnerOutput(), self.device)
        hb = build_host_batch(chunks, self.block_size)
        ids = self._to_device(hb.input_ids)
        fed = np.flatnonzero(rows >= 0) if rows is not None else np.zeros(0, dtype=np.int64)
        if len(fed):
            ids[self._to_device(hb.query_start[fed])] = prev.last_tokens[self._to_device(rows[fed])]
        try:
            logits = self._step_logits(hb, ids)
            sample = self.sampler.sample_on_device(logits, hb.sample_req_ids) if hb.sample_req_ids else None
        except torch.cuda.OutOfMemoryError as exc:
            if len(fed):  # the halves run from the host's chunks: give them their fed tokens
                last = prev.last_tokens.tolist()
                chunks = [replace(c, token_ids=[last[r]]) if r >= 0 else c for c, r in zip(chunks, rows)]
            return InflightRound.done(self._split(chunks, exc), self.device)
        if sample is None:
            return InflightRound.done(RunnerOutput(), self.device)
        active = np.ones((1, len(hb.sample_req_ids)), dtype=bool)
        return self._queue_results(hb.sample_req_ids, active, [sample], sample.tokens)

    def _run(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        """Forward and sample; on device out-of-memory, run the chunks in two halves instead.

        Requests of one step are independent (each attends to its own blocks and writes its own
        slots), so splitting a step changes no result, only its peak memory."""
        try:
            return self._forward_and_sample(chunks)
        except torch.cuda.OutOfMemoryError as exc:
            return self._split(chunks, exc)

    def _split(self, chunks: list[ScheduledChunk], exc: Exception) -> RunnerOutput:
        if len(chunks) == 1:
            raise EngineFaultError(
                f"out of device memory even for a single request's step ({len(chunks[0].token_ids)} "
                "tokens); lower max_num_batched_tokens or gpu_memory_utilization") from exc
        torch.cuda.empty_cache()
        self.num_oom_splits += 1
        half = len(chunks) // 2
        return _merge(self._run(chunks[:half]), self._run(chunks[half:]))

    def _forward_and_sample(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        hb = build_host_batch(chunks, self.block_size)
        logits = self._step_logits(hb, self._to_device(hb.input_ids))
        if not hb.sample_req_ids:
            return RunnerOutput()
        result = self.sampler.sample(logits, hb.sample_req_ids)
        return RunnerOutput(req_ids=hb.sample_req_ids, sampled_token_ids=result.token_ids,
                            logprobs=result.logprobs, top_logprobs=result.top_logprobs,
                            errors=result.errors)

    def _launch_multi_step(self, chunks: list[ScheduledChunk], num_steps: int,
                           feed: torch.Tensor | None) -> "InflightRound":
        """Several decode steps in a row, each fed by the tokens sampled on the device before it.
        Request i is active for its first chunk.num_steps sub-steps; after that it writes nowhere
        (slot -1) and its samples are ignored. `feed`: the first sub-step's input tokens, already
        on the device (a chained round), instead of the chunks' token ids.

            sub-step s of request i:  position p_i + min(s, k_i - 1),  slot -1 once s >= k_i
        """
        bs = self.block_size
        hb = build_host_batch(chunks, bs)
        num_reqs = len(chunks)
        k = np.fromiter((c.num_steps for c in chunks), dtype=np.int64, count=num_reqs)
        s = np.arange(num_steps)[:, None]
        active = s < k[None, :]
        pos = hb.positions[None, :] + np.minimum(s, k[None, :] - 1)  # [steps, reqs]
        rows = np.broadcast_to(np.arange(num_reqs)[None, :], pos.shape)
        slots = np.where(active, hb.block_tables[rows, pos // bs] * bs + pos % bs, -1)
        positions = self._to_device(np.ascontiguousarray(pos))
        slot_mapping = self._to_device(np.ascontiguousarray(slots))
        seq_lens = self._to_device((pos + 1).astype(np.int32))
        block_tables = self._to_device(hb.block_tables.astype(np.int32))
        query_start = self._to_device(np.arange(num_reqs + 1, dtype=np.int32))
        order = self._to_device(longest_first(hb.positions))  # every context grows alike: one order per round
        ids = feed if feed is not None else self._to_device(hb.input_ids)
        req_ids = hb.sample_req_ids
        use_graphs = self.graphs is not None and num_reqs <= self.graphs.max_batch
        prefix = self._shared_prefix_len(hb.block_tables, hb.positions)  # holds for the whole round
        prefix_tensor = None if use_graphs else self._prefix_tensor(prefix)
        self.num_shared_prefix_steps += num_steps if prefix else 0
        samples = []
        for step in range(num_steps):
            if use_graphs:
                logits = self.graphs.run(ids, positions[step], slot_mapping[step], seq_lens[step],
                                         block_tables, prefix, order)
            else:
                meta = AttentionMetadata(slot_mapping[step], query_start, seq_lens[step], block_tables,
                                         max_query_len=1, max_seq_len=int(pos[step].max()) + 1,
                                         shared_prefix_len=prefix_tensor, seq_order=order)
                hidden = self.model(ids, positions[step], self.layer_caches, meta)
                logits = self.model.compute_logits(hidden)
            sample = self.sampler.sample_on_device(logits, req_ids)
            samples.append(sample)
            ids = sample.tokens
        # each request's last token of this round: what a chained round is fed
        tokens = torch.stack([d.tokens for d in samples])  # [steps, reqs]
        last = tokens[self._to_device(k - 1), torch.arange(num_reqs, device=tokens.device)]
        return self._queue_results(req_ids, active, samples, last)

    def _queue_results(self, req_ids: list[str], active: np.ndarray, samples: list,
                       last: torch.Tensor) -> "InflightRound":
        """Start copying the samples to the host behind an event; the handle `collect` takes."""
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

    def collect(self, round_: "InflightRound") -> RunnerOutput:
        """Wait for a launched plan (only for it) and shape its samples per request."""
        if round_.output is not None:
            return round_.output
        if round_.event is not None:
            round_.event.synchronize()
        req_ids, active, host = round_.req_ids, round_.active, round_.host
        # per request, all sub-steps: transpose on the host tensor, then one tolist per column
        step_tokens = host[:, :, 0].t().long().tolist()
        step_logprobs = host[:, :, 1].t().tolist()
        bad = (host[:, :, 2] != 0).numpy() & active  # a non-finite row counts while active
        errors = {req_ids[i]: NONFINITE_ERROR for i in np.flatnonzero(bad.any(axis=0))}
        step_top = None
        if any(d.top is not None for d in round_.samples):
            results = [self.sampler.result_from_host(host[i], d.top_k, d.num_top, req_ids)
                       for i, d in enumerate(round_.samples)]
            step_top = [[r.top_logprobs[i] for r in results] for i in range(len(req_ids))]
        return RunnerOutput(req_ids=req_ids, sampled_token_ids=[t[0] for t in step_tokens],
                            logprobs=[lp[0] for lp in step_logprobs],
                            top_logprobs=[t[0] for t in step_top] if step_top else None,
                            errors=errors, step_token_ids=step_tokens, step_logprobs=step_logprobs,
                            step_top_logprobs=step_top)


@dataclass(slots=True)
class InflightRound:
    """A plan queued on the device (a multi-step decode round or one ordinary step): what
    `collect` and a plan chained onto it need. Rows: the plan's sampled chunks, in order."""

    req_ids: list[str]
    active: np.ndarray  # [steps, rows] bool: sub-step s of row i counts
    samples: list  # DeviceSample per sub-step (top-k shapes for the host layout)
    last_tokens: torch.Tensor  # [rows] on the device: each row's last sampled token
    host: torch.Tensor | None  # [steps, rows, columns]: the samples, copied (or being copied) to the host
    event: object | None  # CUDA event after the copy; None on CPU
    output: RunnerOutput | None = None  # already on the host (a step that ran synchronously)

    @staticmethod
    def done(output: RunnerOutput, device: torch.device) -> "InflightRound":
        last = torch.tensor(output.sampled_token_ids, dtype=torch.long, device=device)
        return InflightRound(output.req_ids, np.ones((1, len(output.req_ids)), dtype=bool), [],
                             last, None, None, output)


def activation_bytes_estimate(model: torch.nn.Module, num_tokens: int, num_sampled: int) -> int:
    """Device memory one full step needs beyond weights and cache, kept on the safe side:
    a few hidden-sized and intermediate-sized activations per token, float32 logits, probs
    and sampling noise per sampled row, and a 10% + 256 MiB margin for the allocator."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    per_token = elem * (8 * cfg.hidden_size + 6 * cfg.intermediate_size)
    logits = num_sampled * cfg.vocab_size * 4 * 4
    return int((per_token * num_tokens + logits) * 1.1) + (256 << 20)


def _merge(a: RunnerOutput, b: RunnerOutput) -> RunnerOutput:
    def cat(x, y, n_x, n_y):
        if x is None and y is None:
            return None
        return (x if x is not None else [None] * n_x) + (y if y is not None else [None] * n_y)

    na, nb = len(a.req_ids), len(b.req_ids)
    return RunnerOutput(req_ids=a.req_ids + b.req_ids,
                        sampled_token_ids=a.sampled_token_ids + b.sampled_token_ids,
                        logprobs=cat(a.logprobs, b.logprobs, na, nb),
                        top_logprobs=cat(a.top_logprobs, b.top_logprobs, na, nb),
                        errors={**a.errors, **b.errors})
