"""The physical floor of a workload's time on the benchmark GPU (BENCHMARKS.md, "Roofline").

compute floor = (2 x non-embedding params x processed tokens + 2 x vocab x hidden x sampled
tokens) / 792 TFLOP/s. Processed tokens are the prompt tokens the engine must compute (minus those
served from the prefix cache) plus every generated token but the last of each request; each
generated token needs one row of logits.

memory floor = sum over decode steps of (weight bytes + KV bytes of the running requests) / 3.0 TB/s.
The step count is estimated by replaying the workload through an ideal continuous batcher:
requests enter in order as soon as one of `max_num_seqs` slots is free, each decodes one token per
step until its output length is reached, and the KV cache never runs out. The replay ignores
prefill steps (they are compute-bound and counted in the compute floor), so it is a lower bound.

With `shared_prefix_len`, the memory floor of an engine that reads a prefix shared by every
running request once per step (shared-prefix attention) instead of once per request: that is
the floor such a run is held to; BENCHMARKS.md's definition reads every request's KV.
"""
from __future__ import annotations

from dataclasses import dataclass

from benchmarks.shapes import ShapeStats

PEAK_FLOPS = 792e12    # bf16 matmul, measured on the H100
PEAK_BYTES = 3.0e12    # device-to-device copy, measured on the H100


@dataclass(frozen=True, slots=True)
class Floor:
    compute_s: float
    memory_s: float
    decode_steps: int

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)


def decode_steps_and_kv_reads(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int,
                              kv_bytes_per_token: int, shared_prefix_len: int = 0) -> tuple[int, float]:
    """(decode steps, total KV bytes read) of the ideal batcher described in the module doc."""
    pending = list(zip(prompt_lens, output_lens))[::-1]
    running: list[list[int]] = []  # [context length, tokens still to generate]
    steps, kv_tokens = 0, 0
    while pending or running:
        while pending and len(running) < max_num_seqs:
            p, o = pending.pop()
            running.append([p + 1, o - 1])  # the prefill samples the first output token
        running = [r for r in running if r[1] > 0]
        if not running:
            continue
        steps += 1
        kv_tokens += shared_prefix_len
        for r in running:
            kv_tokens += r[0] - shared_prefix_len
            r[0] += 1
            r[1] -= 1
    return steps, float(kv_tokens) * kv_bytes_per_token


def workload_floor(stats: ShapeStats, prompt_lens: list[int], output_lens: list[int],
                   cached_prompt_tokens: int = 0, max_num_seqs: int = 256,
                   shared_prefix_len: int = 0) -> Floor:
    processed = sum(prompt_lens) - cached_prompt_tokens + sum(output_lens) - len(output_lens)
    sampled = sum(output_lens)
    flops = 2.0 * stats.non_embedding_params * processed + 2.0 * stats.vocab * stats.hidden * sampled
    steps, kv_bytes = decode_steps_and_kv_reads(prompt_lens, output_lens, max_num_seqs,
                                                stats.kv_bytes_per_token, shared_prefix_len)
    memory = steps * stats.weight_bytes_per_step + kv_bytes
    return Floor(flops / PEAK_FLOPS, memory / PEAK_BYTES, steps)
