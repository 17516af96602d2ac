"""Engine replicas started together for a multi-GPU benchmark: one spawned process per replica,
each with its GPUs (CUDA_VISIBLE_DEVICES) and its slice of the prompts, timed from a common start.

    parent                                 replica i (spawned; CUDA_VISIBLE_DEVICES = its tp GPUs)
    starts every replica                   LLM(tensor_parallel_size=tp): its own ranks and group
    waits for every ("ready", i) ◄──────── warmed up on fresh ids, then waits for `go`
    t0; go.set() ─────────────────────────► timed pass over prompts[start:stop]
    last ("done", i) arrives: t1 ◄──────── ("done", i, figures); shuts its ranks down
The layout's time is t1 - t0 on the parent's clock. A replica that fails sends ("failed", i,
error); one that dies is noticed by its exit; the others are told to stop (`abort`) if they have
not started, or waited for if they have.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from batchllm.jobs.executors.devices import visible_devices
from benchmarks.common import count_output_tokens, greedy, make_llm, timed_generate
from benchmarks.throughput import truncated
from benchmarks.workloads import Workload, build_workload, warmup_workload

STARTUP_TIMEOUT_S = 1800.0  # building a 70B replica (dummy weights, CUDA graphs) and its warm-up
JOIN_WAIT_S = 300.0         # for a replica to exit after its pass (or after another one failed)
DEAD_GRACE_S = 5.0          # a replica that exited may still have a message in the pipe


class ReplicaFailed(RuntimeError):
    """A replica raised, died or did not get ready in time; the message names which and why."""


@dataclass(slots=True)
class ReplicaSetup:
    """What one replica process needs (pickled to it)."""

    index: int
    workload: str
    shape: str               # the shape it runs (a workload's own, or --shape)
    num_prompts: int | None  # the workload's first N requests (None: all)
    start: int               # its slice of those requests
    stop: int
    model_dir: str
    tensor_parallel_size: int
    engine: dict             # engine settings on top of make_llm's (e.g. from --set)
    threads: int | None      # torch threads (the replicas share the host's cores)


def replica_workload(workload: str, shape: str, num_prompts: int | None, start: int = 0,
                     stop: int | None = None) -> Workload:
    """The requests [start:stop] of the workload's first num_prompts, on `shape`."""
    work = truncated(build_workload(workload), num_prompts)
    return Workload(work.name, shape, work.prompts[start:stop], work.output_lens[start:stop])


def replica_main(setup: ReplicaSetup, messages, go, abort) -> None:
    """One replica: build, warm up, report ready, wait for `go`, time its slice, report."""
    llm = None
    try:
        if setup.threads is not None:
            torch.set_num_threads(setup.threads)
        work = replica_workload(setup.workload, setup.shape, setup.num_prompts, setup.start, setup.stop)
        t0 = time.perf_counter()
        llm = make_llm(Path(setup.model_dir), tensor_parallel_size=setup.tensor_parallel_size, **setup.engine)
        startup = time.perf_counter() - t0
        prompts, out_lens = warmup_workload(work, n=min(64, len(work.prompts)))
        llm.generate(prompts, [greedy(n) for n in out_lens])
        messages.put(("ready", setup.index, dict(startup_s=round(startup, 2),
                                                 kv_blocks=llm.stats().get("num_gpu_blocks"))))
        go.wait()
        if abort.is_set():
            return
        seconds, outs = timed_generate(llm, work.prompts, work.output_lens)
        errors = sum(o.outputs[0].finish_reason == "error" for o in outs)
        messages.put(("done", setup.index, dict(seconds=round(seconds, 3), requests=len(outs),
                                                output_tokens=count_output_tokens(outs), num_errors=errors)))
    except BaseException as exc:  # reported, so the parent never waits for a replica that is gone
        messages.put(("failed", setup.index, f"{type(exc).__name__}: {exc}"))
    finally:
        if llm is not None:
            llm.shutdown()


def _gather(procs: list, messages, kind: str, timeout_s: float | None) -> dict[int, tuple[dict, float]]:
    """Every replica's `kind` message as index -> (figures, arrival time on this clock)."""
    got: dict[int, tuple[dict, float]] = {}
    dead_since: dict[int, float] = {}
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while len(got) < len(procs):
        try:
            what, index, payload = messages.get(timeout=1.0)
        except queue.Empty:
            now = time.perf_counter()
            for i, p in enumerate(procs):
                if i not in got and not p.is_alive():
                    if now - dead_since.setdefault(i, now) > DEAD_GRACE_S:
                        raise ReplicaFailed(f"replica {i} exited (code {p.exitcode}) before sending '{kind}'")
            if deadline is not None and now > deadline:
                missing = sorted(set(range(len(procs))) - set(got))
                raise ReplicaFailed(f"replicas {missing} not {kind} after {timeout_s:.0f} s")
            continue
        if what == "failed":
            raise ReplicaFailed(f"replica {index}: {payload}")
        if what != kind:
            raise ReplicaFailed(f"replica {index} sent '{what}' while the parent waited for '{kind}'")
        got[index] = (payload, time.perf_counter())
    return got


def run_replicas(setups: list[ReplicaSetup], devices: list[str | None]) -> dict:
    """Start one process per setup (CUDA_VISIBLE_DEVICES = devices[i], None: unchanged), wait
    until all are warm, start them together; returns the wall time from that start to the last
    finish and each replica's figures. Raises ReplicaFailed (after stopping them all)."""
    ctx = mp.get_context("spawn")
    messages, go, abort = ctx.Queue(), ctx.Event(), ctx.Event()
    procs = []
    try:
        for setup, device in zip(setups, devices):
            with visible_devices(device):  # the replica (and the ranks it spawns) inherit it
                p = ctx.Process(target=replica_main, args=(setup, messages, go, abort),
                                name=f"bench-replica-{setup.index}", daemon=False)  # it starts TP ranks
                p.start()
            procs.append(p)
        ready = _gather(procs, messages, "ready", STARTUP_TIMEOUT_S)
        t0 = time.perf_counter()
        go.set()
        done = _gather(procs, messages, "done", None)
        wall = max(t for _, t in done.values()) - t0
    finally:
        if not go.is_set():
            abort.set()
            go.set()
        for p in procs:
            p.join(timeout=JOIN_WAIT_S)
            if p.is_alive():
                p.kill()
                p.join()
    replicas = [dict(index=i, devices=devices[i], first_request=s.start, **ready[i][0], **done[i][0],
                     finished_after_s=round(done[i][1] - t0, 3)) for i, s in enumerate(setups)]
    return dict(wall_s=wall, replicas=replicas)
