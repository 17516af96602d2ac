"""Shared benchmark plumbing: build an engine on a dummy shape, time one pass, describe the machine."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from batchllm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """Device, library versions and commit, for the record in RESULTS.md."""
    import transformers

    commit = os.environ.get("BATCHLLM_COMMIT", "")  # the GPU machine's copy has no .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, torch=torch.__version__, transformers=transformers.__version__,
                commit=commit, date=time.strftime("%Y-%m-%d %H:%M:%S"))


# Engine settings for throughput runs (recorded in each JSON): room for 512 sequences at once
# (every workload here fits in the KV cache at that concurrency) and 16k-token prefill steps.
THROUGHPUT_ENGINE = dict(max_num_seqs=512, max_num_batched_tokens=16384)


def parse_sets(items: list[str]) -> dict:
    """`key=value` engine overrides from the command line (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def make_llm(model_dir: Path, **overrides: object) -> LLM:
    """An engine on the dummy weights of `model_dir` (bf16, no tokenizer), THROUGHPUT_ENGINE
    settings, engine defaults otherwise."""
    kwargs: dict = dict(dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True, seed=0,
                        max_model_len=4096)
    kwargs.update(THROUGHPUT_ENGINE)
    kwargs.update(overrides)
    return LLM(str(model_dir), **kwargs)


def release() -> None:
    """Free a dropped engine's GPU memory (call after `del llm`) before the next engine sizes
    its KV cache from what is free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def timed_generate(llm: LLM, prompts: list[list[int]], output_lens: list[int],
                   logprobs: int | None = None) -> tuple[float, list]:
    """(seconds, outputs) of one pass, GPU synchronized before and after."""
    params = [greedy(n, logprobs) for n in output_lens]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def prompt_tokens(plan) -> int:
    """Tokens of a plan's prefill chunks (any chunk but a one-token decode)."""
    return sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1 or not c.sample)


class StepTrace:
    """Host time of each LLMEngine.step call of a run, by the kind of plan it applied: steps that
    carry prompt tokens (prefill chunks, with whatever decodes ride along) and multi-step decode
    rounds. With async scheduling a round's step() waits for its device work, so these times add
    up to the run's wall time and show where it goes; the part of a round's time spent waiting
    for the device (in runner.collect) against the rest (host work: planning, bookkeeping,
    outputs) tells whether the rounds are bound by the device or by the host.

    with StepTrace(llm.engine) as trace: llm.generate(...);  trace.summary()"""

    def __init__(self, engine) -> None:
        self.engine, self.records = engine, []

    def __enter__(self) -> "StepTrace":
        eng, sched = self.engine, self.engine.scheduler
        self._step, self._schedule, self._collect = eng.step, sched.schedule, eng.runner.collect
        latest: list = [None]
        waited = [0.0]

        def collect(round_):
            t0 = time.perf_counter()
            if round_.event is not None:
                round_.event.synchronize()
            waited[0] += time.perf_counter() - t0
            return self._collect(round_)

        def schedule():
            latest[0] = self._schedule()
            return latest[0]

        def step():
            queued = eng._inflight[0] if eng._inflight is not None else None
            t0, waited[0] = time.perf_counter(), 0.0
            out = self._step()
            plan = queued or latest[0]
            if plan is not None and plan.chunks:
                self.records.append((time.perf_counter() - t0, plan.num_steps, len(plan.chunks),
                                     prompt_tokens(plan), waited[0]))
            return out

        sched.schedule, eng.step, eng.runner.collect = schedule, step, collect
        return self

    def __exit__(self, *exc) -> None:
        self.engine.step, self.engine.scheduler.schedule = self._step, self._schedule
        self.engine.runner.collect = self._collect
        # the records stay; the engine (and its GPU memory) may go
        self.engine = self._step = self._schedule = self._collect = None

    def summary(self) -> dict:
        pre = [r for r in self.records if r[3] > 0]
        dec = [r for r in self.records if r[3] == 0]
        dec_steps = sum(r[1] for r in dec)
        return dict(
            prompt_steps=dict(count=len(pre), seconds=round(sum(r[0] for r in pre), 3),
                              prompt_tokens=sum(r[3] for r in pre),
                              ms_each=round(1e3 * sum(r[0] for r in pre) / max(len(pre), 1), 2)),
            decode=dict(rounds=len(dec), steps=dec_steps, seconds=round(sum(r[0] for r in dec), 3),
                        ms_per_step=round(1e3 * sum(r[0] for r in dec) / max(dec_steps, 1), 3),
                        device_wait_s=round(sum(r[4] for r in dec), 3),
                        mean_batch=round(sum(r[2] * r[1] for r in dec) / max(dec_steps, 1), 1)))


def rates(seconds: float, num_requests: int, prompt_tokens: int, output_tokens: int) -> dict:
    return dict(seconds=round(seconds, 3), req_per_s=round(num_requests / seconds, 2),
                output_tok_per_s=round(output_tokens / seconds, 1),
                total_tok_per_s=round((prompt_tokens + output_tokens) / seconds, 1))


def count_output_tokens(outs: list) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outs)


def sweep(name: str, keys: tuple[str, ...], grid: dict[str, tuple], timed) -> list[dict]:
    """Time `timed(**setting)` (ms) for every combination of `grid`'s values, fastest first; a
    setting that cannot launch (out of shared memory etc.) is reported and skipped."""
    import itertools

    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        try:
            ms = timed(**setting)
        except Exception as exc:
            print(name, setting, type(exc).__name__)
            continue
        rows.append(dict(ms=round(ms, 4), **{k: setting[k] for k in keys}))
    rows.sort(key=lambda r: r["ms"])
    return rows


def write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
