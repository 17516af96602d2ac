"""The device's ceilings (bf16 matmul rate, copy bandwidth) and the physical floor of a workload's
time on it (BENCHMARKS.md, "Roofline").

Ceilings are measured once per process on the device the benchmark runs on (an 8192^3 bf16
matrix product and a 1 GiB device-to-device copy, about a second); where measuring fails, or with
BENCH_CEILINGS=table in the environment, a table by device name gives them. Every benchmark JSON
records the ceilings it used.

compute floor = (2 x non-embedding params x processed tokens + 2 x vocab x hidden x sampled
tokens) / matmul rate. Processed tokens are the prompt tokens the engine must compute (minus those
served from the prefix cache) plus every generated token but the last of each request; each
generated token needs one row of logits.

memory floor = sum over decode steps of (weight bytes + KV bytes of the running requests) / copy
bandwidth. The step count is estimated by replaying the workload through an ideal continuous
batcher: requests enter in order as soon as one of `max_num_seqs` slots is free, each decodes one
token per step until its output length is reached, and the KV cache never runs out. The replay
ignores prefill steps (they are compute-bound and counted in the compute floor), so it is a
lower bound.

With `shared_prefix_len`, the memory floor of an engine that reads a prefix shared by every
running request once per step (shared-prefix attention) instead of once per request: that is
the floor such a run is held to; BENCHMARKS.md's definition reads every request's KV.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from benchmarks.shapes import ShapeStats

# Measured on the GPU machines (GPU.md): bf16 8192^3 matmul FLOP/s, device-to-device copy bytes/s
# (read + write). Keys are matched as substrings of torch.cuda.get_device_name().
KNOWN_CEILINGS: dict[str, tuple[float, float]] = {
    "H200": (803e12, 4.27e12),
    "H100 80GB": (792e12, 3.0e12),
}


@dataclass(frozen=True, slots=True)
class Ceilings:
    device: str
    matmul_flops: float  # bf16 matrix product, FLOP/s
    copy_bytes: float    # device-to-device copy, bytes read + written per second
    source: str          # "measured" or "table"

    def as_dict(self) -> dict:
        """The record a benchmark JSON keeps (with the table's figures beside measured ones)."""
        out = dict(asdict(self), matmul_tflops=round(self.matmul_flops / 1e12, 1),
                   copy_tbps=round(self.copy_bytes / 1e12, 3))
        known = table_ceilings(self.device) if self.source == "measured" else None
        if known is not None:
            out.update(table_matmul_tflops=round(known.matmul_flops / 1e12, 1),
                       table_copy_tbps=round(known.copy_bytes / 1e12, 3))
        return out


_CEILINGS: dict[str, Ceilings] = {}


def table_ceilings(device: str) -> Ceilings | None:
    """The table's ceilings for a device name, or None when the name is not in it."""
    for key, (flops, nbytes) in KNOWN_CEILINGS.items():
        if key.lower() in device.lower():
            return Ceilings(device, flops, nbytes, "table")
    return None


def _best_rate(fn, work: float, sync, repeats: int = 5, iters: int = 10) -> float:
    """The best of `repeats` timings of `iters` calls, as work per second."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return work / best


def _matmul_rate(n: int, dtype, device: str, sync) -> float:
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    if device.startswith("cuda"):  # let the clocks come up before timing
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            a @ b
            sync()
    return _best_rate(lambda: a @ b, 2.0 * n ** 3, sync)


def _copy_rate(nbytes: int, device: str, sync) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * nbytes, sync)


def measure_ceilings(device: str = "cuda") -> Ceilings:
    """Matmul rate and copy bandwidth measured now (a small problem on CPU, where they only make
    a smoke run's floor finite)."""
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    flops = _matmul_rate(8192 if cuda else 512, torch.bfloat16 if cuda else torch.float32, device, sync)
    nbytes = _copy_rate(1 << 30 if cuda else 1 << 24, device, sync)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Ceilings(name, flops, nbytes, "measured")


def device_ceilings() -> Ceilings:
    """This process's device ceilings: measured on first use (CUDA if present, else CPU), from the
    table by device name if measuring fails or BENCH_CEILINGS=table; cached for the process."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device in _CEILINGS:
        return _CEILINGS[device]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    known = table_ceilings(name)
    if os.environ.get("BENCH_CEILINGS") == "table":
        if known is None:
            raise RuntimeError(f"BENCH_CEILINGS=table but the table has no entry for {name}; add one "
                               f"to KNOWN_CEILINGS in benchmarks/roofline.py or unset BENCH_CEILINGS")
        _CEILINGS[device] = known
    else:
        try:
            _CEILINGS[device] = measure_ceilings(device)
        except RuntimeError as exc:  # out of memory among others
            if known is None:
                raise RuntimeError(f"could not measure the ceilings of {name} ({exc}) and the table has "
                                   f"no entry for it; add one to KNOWN_CEILINGS in benchmarks/roofline.py") from exc
            _CEILINGS[device] = known
    return _CEILINGS[device]


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


def workload_floor(stats: ShapeStats, prompt_lens: list[int], output_lens: list[int], ceilings: Ceilings,
                   cached_prompt_tokens: int = 0, max_num_seqs: int = 256,
                   shared_prefix_len: int = 0) -> Floor:
    """The floor of a workload on a device with these ceilings (see the module doc)."""
    processed = sum(prompt_lens) - cached_prompt_tokens + sum(output_lens) - len(output_lens)
    sampled = sum(output_lens)
    flops = 2.0 * stats.non_embedding_params * processed + 2.0 * stats.vocab * stats.hidden * sampled
    steps, kv_bytes = decode_steps_and_kv_reads(prompt_lens, output_lens, max_num_seqs,
                                                stats.kv_bytes_per_token, shared_prefix_len)
    memory = steps * stats.weight_bytes_per_step + kv_bytes
    return Floor(flops / ceilings.matmul_flops, memory / ceilings.copy_bytes, steps)
