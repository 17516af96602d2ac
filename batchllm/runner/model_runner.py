"""Runs one SchedulerOutput on a device: plan → flattened token batch → forward → sample → RunnerOutput."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.core.outputs import RunnerOutput, SchedulerOutput
from batchllm.layers.attention import AttentionMetadata
from batchllm.runner.kv_cache import KVCache


@dataclass(slots=True)
class StepInputs:
    """The device tensors of one step, plus which rows are sampled for which requests."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sample_req_ids: list[str]


class ModelRunner:
    """Owns the model, the KV cache and the sampler; never mutates requests or block tables."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler, block_size: int,
                 device: torch.device, eos_token_id: int | None):
        self.model, self.kv_cache, self.sampler = model, kv_cache, sampler
        self.eos_token_id = eos_token_id
        self.block_size, self.device = block_size, device
        self.layer_caches = kv_cache.layer_caches()
        self._pin = device.type == "cuda"

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def prepare(self, plan: SchedulerOutput) -> StepInputs:
        """Flatten the plan's chunks into one batch; vectorized over tokens, one pass over chunks."""
        chunks = plan.chunks
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
        bs = self.block_size
        slot_mapping = block_tables[req_of_token, positions // bs] * bs + positions % bs
        seq_lens = computed + q_lens
        sampled = [i for i, c in enumerate(chunks) if c.sample]
        logits_indices = query_start[1:][sampled] - 1
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping),
            query_start_loc=self._to_device(query_start.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            block_tables=self._to_device(block_tables.astype(np.int32)),
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()))
        return StepInputs(self._to_device(input_ids), self._to_device(positions), meta,
                          self._to_device(logits_indices.astype(np.int64)),
                          [chunks[i].req_id for i in sampled])

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        """Apply the plan's block moves, run the forward pass and sample."""
        for req_id in plan.finished_req_ids:
            self.sampler.remove_request(req_id)
        self.kv_cache.swap_out(plan.swap_out)
        self.kv_cache.swap_in(plan.swap_in)
        self.kv_cache.copy(plan.copy_blocks)
        for new in plan.new_requests:
            self.sampler.add_request(new, self.eos_token_id)
        if not plan.chunks:
            return RunnerOutput()
        inputs = self.prepare(plan)
        hidden = self.model(inputs.input_ids, inputs.positions, self.layer_caches, inputs.meta)
        if not inputs.sample_req_ids:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        result = self.sampler.sample(logits, inputs.sample_req_ids)
        return RunnerOutput(req_ids=inputs.sample_req_ids, sampled_token_ids=result.token_ids,
                            logprobs=result.logprobs, top_logprobs=result.top_logprobs,
                            errors=result.errors)

    def activation_bytes_estimate(self, num_tokens: int, num_sampled: int) -> int:
        """Device memory one full step needs beyond weights and cache, kept on the safe side:
        a few hidden-sized and intermediate-sized activations per token, float32 logits, probs
        and sampling noise per sampled row, and a 10% + 256 MiB margin for the allocator."""
        cfg = self.model.config
        elem = next(self.model.parameters()).element_size()
        per_token = elem * (8 * cfg.hidden_size + 6 * cfg.intermediate_size)
        logits = num_sampled * cfg.vocab_size * 4 * 4
        return int((per_token * num_tokens + logits) * 1.1) + (256 << 20)
