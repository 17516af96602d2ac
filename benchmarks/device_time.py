"""Device time read from the torch profiler: kernels by category, busy against wall, and a run's
timeline cut into plans at marker kernels (benchmarks/step_profile.py drives the engine)."""
from __future__ import annotations

import time

import torch

CATEGORIES = (
    ("attention", ("paged_attention", "merge_splits", "flash", "fmha")),
    ("kv_write", ("write_kv",)),
    ("norm", ("rms", "norm")),
    ("rotary", ("rotary",)),
    ("activation", ("silu",)),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "cublas", "splitk", "matmul")),
    ("sampler", ("argmax", "logsumexp", "reduce", "softmax", "gather", "topk", "exp", "log")),
    ("copies", ("copy", "memcpy", "memset", "fill", "cat", "index", "elementwise")),
)
MARKER = "spin_kernel"  # torch.cuda._sleep queues it: before each plan, it marks where the plan starts
SLOW_API_MS = 1.0  # host calls into the CUDA runtime at least this long are listed one by one


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _ms(d: dict[str, float], top: int | None = None) -> dict[str, float]:
    return {k: round(v / 1e3, 3) for k, v in sorted(d.items(), key=lambda x: -x[1])[:top]}


def device_breakdown(fn) -> dict:
    """Run fn once under the profiler: device time per category (ms), busy vs wall."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_cat: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        by_cat[category(ev.name)] = by_cat.get(category(ev.name), 0.0) + us
        top[ev.name[:90]] = top.get(ev.name[:90], 0.0) + us
    return dict(wall_ms=round(wall * 1e3, 3), device_busy_ms=round(sum(by_cat.values()) / 1e3, 3),
                by_category_ms=_ms(by_cat), top_kernels_ms=_ms(top, 14))


def runtime_calls(prof, t0: float) -> dict:
    """CUDA runtime calls on the host (allocations, synchronizations, copies): count and total
    time per name, and the slow ones with their time since the first kernel (ms)."""
    per: dict[str, tuple[int, float]] = {}
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


def mark() -> None:
    """Queue the marker kernel on the current stream: plans_on_device cuts the timeline there."""
    torch.cuda._sleep(1)


def plans_on_device(kernels: list[tuple[float, float, str]], kinds: list[str]) -> list[dict]:
    """Cut the timeline (kernels as (start us, end us, name), in start order) at the marker
    kernels: plan i runs from its marker to the next one."""
    marks = [i for i, k in enumerate(kernels) if MARKER in k[2].lower()]
    if len(marks) != len(kinds):
        raise RuntimeError(f"{len(marks)} marker kernels on the device for {len(kinds)} plans launched")
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
        plans.append(dict(kind=kind, start=kernels[i][0], span=nxt - kernels[i][0], busy=busy, kernels=ks))
    return plans


def summarize_kind(plans: list[dict], kind: str) -> dict:
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
                by_category_ms={k: round(v, 2) for k, v in _ms(by_cat).items()})
