"""The device's timeline over one timed pass of a workload: busy against idle, per phase.

Runs the workload once to warm up, then once under the profiler, with a marker kernel queued
before each plan, and reports per kind of plan (steps carrying prompt tokens, multi-step decode
rounds, single decode steps): their time on the device from marker to marker, the part of it the
device was busy, the idle rest (what overlapping the host's work with the device's can still
win), device time by kernel category (benchmarks/step_profile.py's categories), and the host's
calls into the CUDA runtime (a long cudaFree or synchronize is where the host stalled).

Usage: python benchmarks/gpu_timeline.py [--workload W-hf] [--set KEY=VALUE ...] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import greedy, machine_info, make_llm, parse_sets, prompt_tokens, write_json  # noqa: E402
from benchmarks.shapes import write_model_dir  # noqa: E402
from benchmarks.step_profile import category  # noqa: E402
from benchmarks.workloads import WORKLOADS, build_workload, warmup_workload  # noqa: E402

SLEEP = "spin_kernel"  # torch.cuda._sleep queues it: before each plan, it marks where the plan starts


def kernels_of(prof) -> list[tuple[float, float, str]]:
    """Device kernels (start us, end us, name) in start order."""
    out = [(ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
           if ev.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(out)


SLOW_API_MS = 1.0  # host calls into the CUDA runtime at least this long are listed one by one


def runtime_calls(prof, t0: float) -> dict:
    """CUDA runtime calls on the host (allocations, synchronizations, copies): count and total
    time per name, and the slow ones with their time since the first kernel (ms)."""
    per: dict[str, list] = {}
    slow = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA or not ev.name.startswith("cuda"):
            continue
        ms = (ev.time_range.end - ev.time_range.start) / 1e3
        n, total = per.get(ev.name, (0, 0.0))
        per[ev.name] = (n + 1, total + ms)
        if ms >= SLOW_API_MS:
            slow.append(dict(name=ev.name, ms=round(ms, 2), at_ms=round((ev.time_range.start - t0) / 1e3, 1)))
    return dict(by_name={k: dict(count=n, ms=round(t, 2)) for k, (n, t) in
                         sorted(per.items(), key=lambda x: -x[1][1])[:12]},
                slow=sorted(slow, key=lambda x: x["at_ms"])[:40])


def plans_on_device(kernels: list, kinds: list[str]) -> list[dict]:
    """Cut the timeline at the marker kernels: plan i runs from its marker to the next one."""
    marks = [i for i, k in enumerate(kernels) if SLEEP in k[2].lower()]
    assert len(marks) == len(kinds), (len(marks), len(kinds))
    plans = []
    for j, (i, kind) in enumerate(zip(marks, kinds)):
        stop = marks[j + 1] if j + 1 < len(marks) else len(kernels)
        ks = kernels[i + 1:stop]
        if not ks:
            continue
        nxt = kernels[stop][0] if stop < len(kernels) else ks[-1][1]
        busy, end = 0.0, ks[0][0]
        for s, e, _ in ks:
            if e > end:
                busy += e - max(s, end)
                end = e
        plans.append(dict(kind=kind, start=kernels[i][0], span=nxt - kernels[i][0], busy=busy,
                          kernels=ks))
    return plans


def summarize(plans: list[dict], kind: str) -> dict:
    ps = [p for p in plans if p["kind"] == kind]
    if not ps:
        return {}
    by_cat: dict[str, float] = {}
    for p in ps:
        for s, e, name in p["kernels"]:
            by_cat[category(name)] = by_cat.get(category(name), 0.0) + (e - s)
    span, busy = sum(p["span"] for p in ps), sum(p["busy"] for p in ps)
    return dict(count=len(ps), span_ms=round(span / 1e3, 2), busy_ms=round(busy / 1e3, 2),
                idle_ms=round((span - busy) / 1e3, 2),
                span_ms_each=[round(p["span"] / 1e3, 2) for p in ps][:12],
                idle_ms_each=[round((p["span"] - p["busy"]) / 1e3, 2) for p in ps][:12],
                by_category_ms={k: round(v / 1e3, 2) for k, v in sorted(by_cat.items(), key=lambda x: -x[1])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="W-hf", choices=WORKLOADS)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = parse_sets(args.set)
    work = build_workload(args.workload)
    params = [greedy(n) for n in work.output_lens]
    with tempfile.TemporaryDirectory() as tmp:
        llm = make_llm(write_model_dir(work.shape, Path(tmp)), **settings)
        eng = llm.engine
        warm_p, warm_o = warmup_workload(work)  # other prompts: the timed pass finds no cached prefix
        llm.generate(warm_p, [greedy(n) for n in warm_o])
        launch, execute = eng.runner.launch, eng.runner.execute
        kinds: list[str] = []

        def marked(fn):
            def run(plan, *a):
                if plan.chunks:
                    kinds.append("prompt" if prompt_tokens(plan) else ("round" if plan.num_steps > 1 else "decode"))
                    torch.cuda._sleep(1)
                return fn(plan, *a)
            return run

        eng.runner.launch, eng.runner.execute = marked(launch), marked(execute)
        before = dict(eng.stats())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(work.prompts, params)
            torch.cuda.synchronize()
        stats = {k: v - before.get(k, 0) for k, v in eng.stats().items()
                 if isinstance(v, int) and not k.startswith(("num_gpu", "num_cpu"))}
    kernels = kernels_of(prof)
    plans = plans_on_device(kernels, kinds)
    wall = kernels[-1][1] - kernels[0][0]
    report = dict(workload=args.workload, settings=settings, **machine_info(), stats=stats,
                  device_wall_ms=round(wall / 1e3, 2),
                  prompt_steps=summarize(plans, "prompt"), decode_rounds=summarize(plans, "round"),
                  decode_steps=summarize(plans, "decode"),
                  plan_starts_ms=[dict(kind=p["kind"], at_ms=round((p["start"] - kernels[0][0]) / 1e3, 1))
                                  for p in plans if p["kind"] == "prompt"],
                  runtime_calls=runtime_calls(prof, kernels[0][0]))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
