"""Where the device's time goes: per BENCHMARKS.md shape (decode rounds, a prefill step, GEMMs), or
over one timed pass of a workload (busy against idle per kind of plan).

Per shape (default): an engine on dummy weights is filled with requests whose context matches the
workload (8B: 512 x 384 tokens; 1B: 512 x 672; 0.6B: 256 x 900), prefilled; then decode rounds
are timed through engine.step() with async scheduling off and on, for each num_decode_steps;
three decode rounds and one 16k-token prefill step are profiled on the device (kernel time by
category: GEMM, attention, KV write, norms, rotary, activation, sampler, copies, other; busy
against wall: the gap is the GPU idle); the shape's matrix products are timed at the decode batch.

Timeline (--workload W): a warm-up pass, then one timed pass under the profiler with a marker
kernel queued before each plan the runner launches. Per kind of plan (prompt steps, multi-step
decode rounds, single decode steps): device time from marker to marker, the busy part, the idle
rest (what overlapping host and device work can still win), time by kernel category; and the
host's calls into the CUDA runtime (a long cudaFree or synchronize is where the host stalled).

Relies on engine.step(), add_request, stats(), scheduler.update, runner.launch / execute and the
plans' chunks / num_steps only.
Usage: python benchmarks/step_profile.py [--shapes 8B 1B 0.6B] [--steps 8] [--prompt-len 1024]
       [--set kv_cache_dtype=fp8] [--json OUT.json]
       python benchmarks/step_profile.py --workload W-hf [--set KEY=VALUE ...] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (THROUGHPUT_ENGINE, greedy, machine_info, make_llm, parse_sets, patch,  # noqa: E402
                               prompt_tokens, release, write_json)
from benchmarks.device_time import device_breakdown, mark, plans_on_device, runtime_calls, summarize_kind  # noqa: E402
from benchmarks.shapes import SHAPES, write_model_dir  # noqa: E402
from benchmarks.workloads import WORKLOADS, build_workload, warmup_workload  # noqa: E402

CASES = {  # shape -> (name, decode batch, context at which decode is measured)
    "8B": ("Llama-3.1-8B", 512, 384),
    "1B": ("Llama-3.2-1B", 512, 672),
    "0.6B": ("Qwen3-0.6B", 256, 900),
}


def fill(eng, num_reqs: int, ctx: int, max_tokens: int = 4000, max_calls: int = 10_000) -> None:
    """Add num_reqs requests of ctx random tokens and step until a step applies a plan that decodes
    all of them (every prompt is in the KV cache)."""
    g = torch.Generator().manual_seed(0)
    for i in range(num_reqs):
        eng.add_request(f"r{i}", torch.randint(100, 100000, (ctx,), generator=g).tolist(), greedy(max_tokens))
    applied: list = []
    update0 = eng.scheduler.update
    undo = patch(eng.scheduler, "update", lambda plan, out: (applied.append(plan), update0(plan, out))[1])
    try:
        for _ in range(max_calls):
            applied.clear()
            eng.step()
            if any(len(p.chunks) == num_reqs and not prompt_tokens(p) for p in applied):
                return
    finally:
        undo()
    raise RuntimeError(f"{num_reqs} requests of {ctx} tokens never decoded together; raise max_num_seqs "
                       f"(--set max_num_seqs=...) or lower the batch")


def _decode_rounds(eng, batch: int, ctx: int, rounds: int) -> dict:
    fill(eng, batch, ctx)
    for _ in range(2):
        eng.step()
    torch.cuda.synchronize()
    before = eng.stats()["num_generated_tokens"]
    t0 = time.perf_counter()
    for _ in range(rounds):
        eng.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = eng.stats()["num_generated_tokens"] - before
    return dict(ms_per_decode_step=round(wall / (tokens / batch) * 1e3, 3), decode_tok_per_s=round(tokens / wall, 1),
                profile_three_rounds=device_breakdown(lambda: [eng.step() for _ in range(3)]))


def decode_case(model_dir: Path, batch: int, ctx: int, steps: int, async_on: bool, rounds: int = 6) -> dict:
    """Decode rounds through engine.step() (so async scheduling pipelines them as in a run)."""
    llm = make_llm(model_dir, num_decode_steps=steps, async_scheduling=async_on)
    try:
        return dict(num_decode_steps=steps, async_scheduling=async_on, batch=batch, context=ctx,
                    **_decode_rounds(llm.engine, batch, ctx, rounds))
    finally:
        del llm
        release()


def _prefill_step(eng, prompts: list[list[int]]) -> dict:
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, greedy(1))
    return device_breakdown(lambda: eng.step())


def prefill_case(model_dir: Path, num_tokens: int = 16384, prompt_len: int = 1024) -> dict:
    """One eager prefill step of num_tokens (prompts of prompt_len), after a warm-up pass."""
    llm = make_llm(model_dir, max_num_batched_tokens=num_tokens, enforce_eager=True)
    g = torch.Generator().manual_seed(1)

    def prompts() -> list[list[int]]:
        return [torch.randint(100, 100000, (prompt_len,), generator=g).tolist()
                for _ in range(num_tokens // prompt_len)]

    try:
        llm.generate(prompts(), greedy(1))
        return dict(num_tokens=num_tokens, prompt_len=prompt_len, **_prefill_step(llm.engine, prompts()))
    finally:
        del llm
        release()


def gemm_case(shape: str, m: int) -> dict:
    cfg = SHAPES[shape]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    from triton.testing import do_bench

    out = {}
    for name, (n, k) in dict(qkv=(q + 2 * kv, h), o=(h, q), gate_up=(2 * inter, h), down=(h, inter),
                             lm_head=(cfg["vocab_size"], h)).items():
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        ms = do_bench(lambda: torch.nn.functional.linear(x, w))
        out[name] = dict(ms=round(ms, 4), tflops=round(2 * m * n * k / ms / 1e9, 1))
    return out


def timeline(workload: str, settings: dict) -> dict:
    work = build_workload(workload)
    with tempfile.TemporaryDirectory() as tmp:
        llm = make_llm(write_model_dir(work.shape, Path(tmp)), **settings)
        eng = llm.engine
        warm_p, warm_o = warmup_workload(work)  # other prompts: the timed pass finds no cached prefix
        llm.generate(warm_p, [greedy(n) for n in warm_o])
        kinds: list[str] = []
        last: list = [None]

        def marked(fn):
            def run(plan, *a, **kw):
                if plan.chunks and plan is not last[0]:  # execute may launch the same plan: mark once
                    last[0] = plan
                    kinds.append("prompt" if prompt_tokens(plan) else ("round" if plan.num_steps > 1 else "decode"))
                    mark()
                return fn(plan, *a, **kw)
            return run

        undo = [patch(eng.runner, "launch", marked(eng.runner.launch)),
                patch(eng.runner, "execute", marked(eng.runner.execute))]
        before = dict(eng.stats())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(work.prompts, [greedy(n) for n in work.output_lens])
            torch.cuda.synchronize()
        for u in undo:
            u()
        undo.clear()  # the undo closures hold the runner (and its KV cache)
        stats = {k: v - before.get(k, 0) for k, v in eng.stats().items()
                 if isinstance(v, int) and not k.startswith(("num_gpu", "num_cpu"))}
        del llm, eng
        release()
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                     if ev.device_type == torch.autograd.DeviceType.CUDA)
    plans = plans_on_device(kernels, kinds)
    t0 = kernels[0][0]
    return dict(workload=workload, stats=stats, device_wall_ms=round((kernels[-1][1] - t0) / 1e3, 2),
                prompt_steps=summarize_kind(plans, "prompt"), decode_rounds=summarize_kind(plans, "round"),
                decode_steps=summarize_kind(plans, "decode"),
                plan_starts_ms=[dict(kind=p["kind"], at_ms=round((p["start"] - t0) / 1e3, 1))
                                for p in plans if p["kind"] == "prompt"],
                runtime_calls=runtime_calls(prof, t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default=None, choices=WORKLOADS, help="timeline of this workload's timed pass")
    ap.add_argument("--shapes", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", nargs="*", type=int, default=[8], help="num_decode_steps settings to time")
    ap.add_argument("--prompt-len", type=int, default=1024, help="prompt length of the prefill step")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting for every case (e.g. kv_cache_dtype=fp8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_profile.py profiles CUDA kernels: it needs a CUDA GPU")
    settings = parse_sets(args.set)
    info = machine_info()
    if args.workload:
        write_json(args.json, dict(**info, settings=settings, **timeline(args.workload, settings)))
        return
    THROUGHPUT_ENGINE.update(settings)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.shapes:
            shape, batch, ctx = CASES[key]
            model_dir = write_model_dir(shape, Path(tmp) / key)
            r: dict = dict(shape=shape, gemm_at_decode_batch=gemm_case(shape, batch))
            r["decode"] = [decode_case(model_dir, batch, ctx, s, a) for s in args.steps for a in (False, True)]
            r["prefill"] = prefill_case(model_dir, prompt_len=args.prompt_len)
            results[key] = r
            print(json.dumps(r, indent=1), flush=True)
    write_json(args.json, dict(**info, engine_settings=THROUGHPUT_ENGINE, results=results))


if __name__ == "__main__":
    main()
