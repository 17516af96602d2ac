"""Several GPUs of one machine: W-8B data parallel (efficiency against one GPU, same call), W-70B
tensor parallel and data x tensor parallel, each against the roofline (BENCHMARKS.md, issue 15).

Usage: python benchmarks/multi_gpu.py [--layouts L,L,...] [--num-prompts N] [--json OUT]
       [--set KEY=VALUE ...] [--shape NAME]
A layout is WORKLOAD:dpD, WORKLOAD:tpT or WORKLOAD:dpDxtpT (D replicas of T GPUs each); a bare
workload name means its default layouts. Default: every default layout that fits the visible GPUs:
W-8B at dp 1, 2, 4, 8; W-70B at tp 2, 4, 8, and dp x tp over all GPUs at tp 2 and tp 4.
Each replica is its own spawned process (CUDA_VISIBLE_DEVICES = its T GPUs) that builds its own
LLM(tensor_parallel_size=T) on dummy weights (its own ranks and process group; dummy weights are
random per rank, which is fine for throughput), takes its 1/D of the prompts in order, warms up
and waits; all start the timed pass together (benchmarks/replicas.py) and the layout's time runs
from that start to the last replica's finish.
DP efficiency = req/s / (D x req/s of the dp1 layout at the same T), where that ran in the same
call (a W-8B:dpD adds W-8B:dp1 when it is missing). Roofline: the floor of each replica's slice on
T GPUs (the device's ceilings x T, communication free; benchmarks/roofline.py), the largest over
the replicas; "roofline" = floor / time.
Smoke run on CPU (code paths only; every process shares the same cores): --shape Tiny
--num-prompts 16 --set device=cpu --layouts W-8B:dp1,W-8B:dp2,W-8B:tp2,W-8B:dp2xtp2
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm.jobs.executors.devices import visible_devices  # noqa: E402
from benchmarks.common import THROUGHPUT_ENGINE, machine_info, parse_sets, rates, write_json  # noqa: E402
from benchmarks.replicas import ReplicaFailed, ReplicaSetup, replica_workload, run_replicas  # noqa: E402
from benchmarks.roofline import Ceilings, workload_floor  # noqa: E402
from benchmarks.shapes import SHAPES, shape_stats, write_model_dir  # noqa: E402
from benchmarks.workloads import WORKLOADS, build_workload  # noqa: E402

TARGET_DP_EFFICIENCY = 0.95  # per GPU, W-8B (BENCHMARKS.md)
TARGET_70B_REQ_S = 45.0      # W-70B, best layout on 8 GPUs
LAYOUT_WORKLOADS = tuple(w for w in WORKLOADS if w != "W-pressure")  # plain passes only
CPU_LAYOUTS = "W-8B:dp1,W-8B:dp2,W-8B:tp2,W-8B:dp2xtp2"
_LAYOUT = re.compile(r"dp(\d+)(?:xtp(\d+))?|tp(\d+)")


@dataclass(frozen=True, slots=True)
class Layout:
    workload: str
    dp: int  # replicas
    tp: int  # GPUs (ranks) per replica

    @property
    def gpus(self) -> int:
        return self.dp * self.tp

    @property
    def name(self) -> str:
        return f"dp{self.dp}" if self.tp == 1 else f"tp{self.tp}" if self.dp == 1 else f"dp{self.dp}xtp{self.tp}"


def default_layouts(workload: str, gpus: int) -> list[Layout]:
    if workload == "W-70B":  # 141 GB of bf16 weights: two GPUs at least
        tps = [t for t in (2, 4, 8) if t <= gpus]
        return [Layout(workload, 1, t) for t in tps] + [Layout(workload, gpus // t, t) for t in (2, 4)
                                                        if gpus // t >= 2]
    return [Layout(workload, d, 1) for d in (1, 2, 4, 8) if d <= gpus]


def parse_layouts(text: str, gpus: int) -> list[Layout]:
    """`--layouts` as Layouts in order, without repeats; a DP layout at tp 1 gets its dp1
    baseline (the efficiency's denominator) first when the list lacks it."""
    out: list[Layout] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        workload, _, spec = item.partition(":")
        if workload not in LAYOUT_WORKLOADS:
            raise SystemExit(f"--layouts: unknown workload {workload!r} in {item!r}; "
                             f"known: {', '.join(LAYOUT_WORKLOADS)}")
        m = _LAYOUT.fullmatch(spec)
        dp, tp = (int(m[1] or 1), int(m[2] or m[3] or 1)) if m else (0, 0)
        if not spec:
            out += default_layouts(workload, gpus)
        elif dp < 1 or tp < 1:
            raise SystemExit(f"--layouts: {item!r} is not WORKLOAD:dpD, WORKLOAD:tpT or WORKLOAD:dpDxtpT "
                             "with D, T >= 1 (e.g. W-8B:dp4, W-70B:tp8, W-70B:dp2xtp4)")
        else:
            out.append(Layout(workload, dp, tp))
    for lay in list(out):
        base = Layout(lay.workload, 1, 1)
        if lay.tp == 1 and lay.dp > 1 and base not in out:
            out.insert(out.index(lay), base)
    return list(dict.fromkeys(out))


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES entries (or 0..N-1) of the GPUs this process sees."""
    count = torch.cuda.device_count()
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def _probe(out) -> None:
    out.put(machine_info())


def probe_machine(first_gpu: str | None) -> dict:
    """machine_info() (device, its measured ceilings, versions, commit) from a child process on
    the first GPU, so that this process holds no CUDA context while the replicas size their caches."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with visible_devices(first_gpu):
        p = ctx.Process(target=_probe, args=(out,))
        p.start()
    info = out.get(timeout=600)
    p.join()
    return info


def layout_floor(layout: Layout, shape: str, num_prompts: int | None, bounds: list[tuple[int, int]],
                 ceilings: Ceilings, engine: dict) -> dict:
    """The floor of the layout: each replica's slice on tp GPUs (ceilings x tp), the slowest one."""
    stats = shape_stats(shape)
    if str(engine.get("kv_cache_dtype", "auto")).startswith("fp8"):
        stats = dataclasses.replace(stats, kv_bytes_per_token=stats.kv_bytes_per_token // 2)
    scaled = dataclasses.replace(ceilings, matmul_flops=ceilings.matmul_flops * layout.tp,
                                 copy_bytes=ceilings.copy_bytes * layout.tp)
    floors = []
    for start, stop in bounds:
        part = replica_workload(layout.workload, shape, num_prompts, start, stop)
        floors.append(workload_floor(stats, [len(p) for p in part.prompts], part.output_lens, scaled,
                                     max_num_seqs=int(engine.get("max_num_seqs", 256))))
    f = max(floors, key=lambda x: x.seconds)
    return dict(seconds=round(f.seconds, 3), compute_s=round(f.compute_s, 3), memory_s=round(f.memory_s, 3))


def run_layout(layout: Layout, args, model_dir: Path, gpus: list[str], engine: dict, ceilings: Ceilings) -> dict:
    work = replica_workload(layout.workload, args.shape or build_workload(layout.workload).shape, args.num_prompts)
    n = len(work.prompts)
    bounds = [(i * n // layout.dp, (i + 1) * n // layout.dp) for i in range(layout.dp)]
    cpu = engine.get("device") == "cpu"
    threads = max(1, torch.get_num_threads() // layout.dp)  # the replicas split the host's cores
    devices = [None if cpu else ",".join(gpus[i * layout.tp:(i + 1) * layout.tp]) for i in range(layout.dp)]
    setups = [ReplicaSetup(i, layout.workload, work.shape, args.num_prompts, a, b, str(model_dir), layout.tp,
                           dict(engine), threads) for i, (a, b) in enumerate(bounds)]
    record = dict(workload=layout.workload, shape=work.shape, layout=layout.name, data_parallel=layout.dp,
                  tensor_parallel=layout.tp, gpus=layout.gpus)
    print(f"== {layout.workload} {layout.name}: {layout.dp} replica(s) x {layout.tp} rank(s), {n} requests",
          flush=True)
    try:
        run = run_replicas(setups, devices)
    except ReplicaFailed as exc:
        print(f"   failed: {exc}", flush=True)
        return dict(record, error=str(exc))
    out_tokens = sum(r["output_tokens"] for r in run["replicas"])
    floor = layout_floor(layout, work.shape, args.num_prompts, bounds, ceilings, engine)
    record.update(rates(run["wall_s"], n, work.num_prompt_tokens, out_tokens), floor=floor,
                  time_over_floor=round(run["wall_s"] / floor["seconds"], 2),
                  roofline_fraction=round(floor["seconds"] / run["wall_s"], 3),
                  num_errors=sum(r["num_errors"] for r in run["replicas"]), replicas=run["replicas"])
    print(f"   {record['req_per_s']} req/s, {record['output_tok_per_s']} output tok/s", flush=True)
    return record


def add_targets(results: list[dict], comparable: bool) -> dict:
    """DP efficiency per result (against dp1 at the same tp, same call) and the issue's targets."""
    ok = {(r["workload"], r["data_parallel"], r["tensor_parallel"]): r for r in results if "error" not in r}
    dp_eff: dict[str, float] = {}
    for r in ok.values():
        base = ok.get((r["workload"], 1, r["tensor_parallel"]))
        if base is not None and r["data_parallel"] > 1:
            r["dp_efficiency"] = round(r["req_per_s"] / (r["data_parallel"] * base["req_per_s"]), 3)
            if r["workload"] == "W-8B" and r["tensor_parallel"] == 1:
                dp_eff[r["layout"]] = r["dp_efficiency"]
    on8 = [r for r in ok.values() if r["workload"] == "W-70B" and r["gpus"] == 8]
    best = max(on8, key=lambda r: r["req_per_s"], default=None)
    return dict(
        comparable=comparable,  # False: another shape or fewer prompts than the workload
        w8b_dp_efficiency=dict(target=TARGET_DP_EFFICIENCY, by_layout=dp_eff,
                               met=bool(dp_eff) and comparable and min(dp_eff.values()) >= TARGET_DP_EFFICIENCY),
        w70b_best_on_8_gpus=dict(target_req_per_s=TARGET_70B_REQ_S, layout=best and best["layout"],
                                 req_per_s=best and best["req_per_s"],
                                 met=bool(best) and comparable and best["req_per_s"] >= TARGET_70B_REQ_S))


def print_table(payload: dict) -> None:
    results, targets = payload["results"], payload["targets"]
    best, cpu = targets["w70b_best_on_8_gpus"], payload["gpu_count"] == 0
    c = payload["ceilings"]
    where = "cpu (ranks, not GPUs)" if cpu else f"{payload['device']} x {payload['gpu_count']}"
    print(f"\n== multi-gpu == {where}, commit {payload['commit']}, ceilings per device {c.get('matmul_tflops')} "
          f"TFLOP/s, {c.get('copy_tbps')} TB/s ({c.get('source')}); roofline = floor / time")
    print(f"{'workload':<9} {'layout':<9} {'ranks' if cpu else 'GPUs':>5} {'req/s':>8} {'out tok/s':>10} "
          f"{'DP eff':>7} {'roofline':>8}  target")

    def verdict(met: bool) -> str:
        return ("met" if met else "open") if targets["comparable"] else "n/a (not the full workload)"

    for r in results:
        if "error" in r:
            print(f"{r['workload']:<9} {r['layout']:<9} {r['gpus']:>5}  FAILED: {r['error'][:90]}")
            continue
        eff = r.get("dp_efficiency")
        target = ""
        if r["workload"] == "W-8B" and r["tensor_parallel"] == 1 and eff is not None:
            target = f"DP eff >= {TARGET_DP_EFFICIENCY}: {verdict(eff >= TARGET_DP_EFFICIENCY)}"
        elif r["workload"] == "W-70B" and r["gpus"] == 8 and r["layout"] == best["layout"]:
            target = f"best on 8 GPUs, >= {TARGET_70B_REQ_S:g} req/s: {verdict(best['met'])}"
        print(f"{r['workload']:<9} {r['layout']:<9} {r['gpus']:>5} {r['req_per_s']:>8} {r['output_tok_per_s']:>10} "
              f"{'-' if eff is None else eff:>7} {r['roofline_fraction']:>8}  {target}")
    if any(r["workload"] == "W-70B" for r in results) and best["layout"] is None:
        print(f"W-70B target (best layout on 8 GPUs >= {TARGET_70B_REQ_S:g} req/s): not measured here")
    for note in payload["notes"]:
        print(f"note: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=None, help="comma-separated WORKLOAD[:dpDxtpT] (default: all that fit)")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N requests of each workload (quick runs)")
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting for every replica (e.g. kv_cache_dtype=fp8, device=cpu)")
    ap.add_argument("--shape", default=None, choices=list(SHAPES),
                    help="run every workload's prompts on another shape (Tiny: CPU smoke runs)")
    args = ap.parse_args()
    sets = parse_sets(args.set)
    engine = dict(THROUGHPUT_ENGINE, **sets)
    cpu = engine.get("device") == "cpu"
    gpus = [] if cpu else visible_gpus()
    if not cpu and not gpus:
        raise SystemExit("multi_gpu.py needs CUDA GPUs; for a smoke run on CPU pass --set device=cpu "
                         f"--shape Tiny --num-prompts 16 --layouts {CPU_LAYOUTS}")
    slots = 2 if cpu else len(gpus)  # bare workload names on CPU: the layouts of two devices
    layouts = parse_layouts(args.layouts or (CPU_LAYOUTS if cpu else "W-8B,W-70B"), slots)
    too_big = [f"{lay.workload}:{lay.name} ({lay.gpus})" for lay in layouts if not cpu and lay.gpus > len(gpus)]
    if too_big:
        raise SystemExit(f"--layouts: {', '.join(too_big)} need more GPUs than the {len(gpus)} visible "
                         f"({','.join(gpus)}); drop them or make more GPUs visible")
    notes = []
    if cpu:
        notes.append(f"CPU run: every replica and rank shares the same {os.cpu_count()} core(s) "
                     f"(torch threads {torch.get_num_threads()} split among them); this checks the code "
                     "paths only, the figures mean nothing")
    comparable = args.shape is None and args.num_prompts is None
    if not comparable:
        notes.append("another shape or fewer prompts than the workloads: the targets do not apply")
    info = probe_machine(None if cpu else gpus[0])
    c = info["ceilings"]
    ceilings = Ceilings(c["device"], c["matmul_flops"], c["copy_bytes"], c["source"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs: dict[str, Path] = {}
        for lay in layouts:
            shape = args.shape or build_workload(lay.workload).shape
            if shape not in dirs:
                dirs[shape] = write_model_dir(shape, Path(tmp))
            results.append(run_layout(lay, args, dirs[shape], gpus, engine, ceilings))
    payload = dict(benchmark="multi_gpu", device=info["device"], gpu_count=len(gpus), commit=info["commit"],
                   layouts=[f"{lay.workload}:{lay.name}" for lay in layouts], num_prompts=args.num_prompts,
                   shape=args.shape, engine_settings=engine, ceilings=info["ceilings"],
                   machine={k: v for k, v in info.items() if k not in ("device", "ceilings", "commit")},
                   notes=notes, results=results)
    payload["targets"] = add_targets(results, comparable)
    write_json(args.json, payload)
    print_table(payload)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
