"""Shared benchmark plumbing: build an engine on a dummy shape, time one pass, describe the machine."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from batchllm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """Device, its ceilings (measured once per process: call this before building engines),
    library versions and commit, for the record in RESULTS.md."""
    import transformers

    from benchmarks.roofline import device_ceilings

    commit = os.environ.get("BATCHLLM_COMMIT", "")  # the GPU machine's copy has no .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dict(device=device, ceilings=device_ceilings().as_dict(), torch=torch.__version__,
                transformers=transformers.__version__, commit=commit, date=time.strftime("%Y-%m-%d %H:%M:%S"))


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
    outs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def prompt_tokens(plan) -> int:
    """Tokens of a plan's prefill chunks (any chunk but a one-token decode)."""
    return sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1 or not c.sample)


def patch(obj: object, name: str, fn) -> Callable[[], None]:
    """Set `obj.name = fn` on the instance; returns the undo (which drops the instance attribute
    again, so no bound method of the engine outlives the patch and keeps its GPU memory)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, fn)

    def undo() -> None:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)
    return undo


@dataclass(slots=True)
class StepRecord:
    seconds: float        # host time of the engine.step() call
    num_steps: int        # decode steps of the plans it applied (1 for a prompt or mixed step)
    num_chunks: int       # requests in the largest plan it applied
    prompt_tokens: int    # prefill tokens of the plans it applied
    collect_s: float      # of `seconds`, time in runner.collect (device wait + reading results)


class StepTrace:
    """Host time of each engine.step() of a run, by the kind of plan it applied (the plans passed
    to scheduler.update during the call): steps that carry prompt tokens (prefill chunks, with
    whatever decodes ride along) and decode steps or multi-step rounds. These times add up to the
    run's wall time and show where it goes; the part spent in runner.collect (waiting for the
    device, then reading its results) against the rest (planning, bookkeeping, outputs) tells
    whether the rounds are bound by the device or by the host.

    Relies only on engine.step(), scheduler.update(plan, out), runner.collect(handle) and the
    plan's chunks / num_steps.  with StepTrace(llm.engine) as trace: llm.generate(...); trace.summary()"""

    def __init__(self, engine) -> None:
        self.engine, self.records = engine, []
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "StepTrace":
        eng = self.engine
        step0, update0, collect0 = eng.step, eng.scheduler.update, eng.runner.collect
        applied: list = []
        waited = [0.0]

        def update(plan, out):
            if plan.chunks:
                applied.append(plan)
            return update0(plan, out)

        def collect(handle):
            t0 = time.perf_counter()
            try:
                return collect0(handle)
            finally:
                waited[0] += time.perf_counter() - t0

        def step():
            applied.clear()
            waited[0] = 0.0
            t0 = time.perf_counter()
            out = step0()
            if applied:
                self.records.append(StepRecord(
                    time.perf_counter() - t0, sum(p.num_steps for p in applied),
                    max(len(p.chunks) for p in applied), sum(prompt_tokens(p) for p in applied), waited[0]))
            return out

        self._undo = [patch(eng.scheduler, "update", update), patch(eng.runner, "collect", collect),
                      patch(eng, "step", step)]
        return self

    def __exit__(self, *exc) -> None:
        for undo in self._undo:
            undo()
        self._undo = []
        self.engine = None  # the records stay; the engine (and its GPU memory) may go

    def summary(self) -> dict:
        pre = [r for r in self.records if r.prompt_tokens > 0]
        dec = [r for r in self.records if r.prompt_tokens == 0]
        dec_steps = sum(r.num_steps for r in dec)
        pre_s, dec_s = sum(r.seconds for r in pre), sum(r.seconds for r in dec)
        return dict(
            prompt_steps=dict(count=len(pre), seconds=round(pre_s, 3),
                              prompt_tokens=sum(r.prompt_tokens for r in pre),
                              ms_each=round(1e3 * pre_s / max(len(pre), 1), 2),
                              collect_s=round(sum(r.collect_s for r in pre), 3)),
            decode=dict(rounds=len(dec), steps=dec_steps, seconds=round(dec_s, 3),
                        ms_per_step=round(1e3 * dec_s / max(dec_steps, 1), 3),
                        collect_s=round(sum(r.collect_s for r in dec), 3),
                        mean_batch=round(sum(r.num_chunks * r.num_steps for r in dec) / max(dec_steps, 1), 1)))


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
