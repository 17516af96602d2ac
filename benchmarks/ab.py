"""Old code against new on one machine in one call: each workload's benchmarks/throughput.py runs
alternately from an older tree and from this one (old, new, old, new, ...), every run's JSON and log
is kept, and a table gives new / old.

OLD_DIR is an export of the older commit that holds its own batchllm/ and benchmarks/, e.g.
    mkdir ab-old && git archive <commit> batchllm benchmarks | tar -x -C ab-old
Its runs use PYTHONPATH=OLD_DIR and OLD_DIR/benchmarks/throughput.py; the new runs use this tree.
Arguments after `--` go to throughput.py on both sides (e.g. -- --set kv_cache_dtype=fp8).
Everything is written under OUT: ab.json (the table's figures) and ab_runs.tgz (each run's JSON
and log; loose too with --keep-raw), since only a few files come back from the GPU machine.

Usage: python benchmarks/ab.py OLD_DIR OUT [W-hf W-8B ...] [--rounds 2] [--old-commit SHA]
       [--new-commit SHA] [--keep-raw] [-- THROUGHPUT ARGS ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

NEW_DIR = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOADS = ("W-hf", "W-8B")


def headline(figures: dict) -> dict | None:
    """The figures of a run's main pass: the plain run, W-prefix's cached run, W-pressure's
    unconstrained one."""
    for f in (figures, figures.get("prefix_on"), figures.get("unconstrained")):
        if isinstance(f, dict) and "output_tok_per_s" in f:
            return f
    return None


def run_side(tree: Path, workload: str, json_path: Path, commit: str, extra: list[str]) -> dict | None:
    """One throughput.py run from `tree`; its headline figures, or None if it failed."""
    env = dict(os.environ, PYTHONPATH=str(tree), BATCHLLM_COMMIT=commit)
    cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), "--workload", workload,
           "--json", str(json_path), *extra]
    log = json_path.with_suffix(".log")
    print(f"== {json_path.stem}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not json_path.exists():
        print(f"   FAILED (exit {rc}); tail of {log}:\n" + "".join(log.read_text().splitlines(True)[-15:]))
        return None
    data = json.loads(json_path.read_text())
    head = headline(data.get("figures", {}))
    if head is None:
        print(f"   no throughput figures in {json_path}")
        return None
    print(f"   {head['seconds']} s, {head['req_per_s']} req/s, {head['output_tok_per_s']} output tok/s", flush=True)
    return dict(seconds=head["seconds"], req_per_s=head["req_per_s"], output_tok_per_s=head["output_tok_per_s"],
                device=data.get("device"), ceilings=data.get("ceilings"), commit=data.get("commit"))


def ratios(old: list[dict], new: list[dict]) -> dict:
    """new / old of the mean and of the best output tokens/s (None where a side has no run)."""
    if not old or not new:
        return dict(ratio_mean=None, ratio_best=None)
    o = [r["output_tok_per_s"] for r in old]
    n = [r["output_tok_per_s"] for r in new]
    return dict(ratio_mean=round((sum(n) / len(n)) / (sum(o) / len(o)), 4), ratio_best=round(max(n) / max(o), 4))


def table(report: dict) -> str:
    lines = [f"old {report['old_commit']} ({report['old_dir']}) vs new {report['new_commit']}, "
             f"output tok/s per run in order (device {report.get('device')})",
             f"{'workload':<10} {'old runs':<28} {'new runs':<28} {'new/old mean':>12} {'new/old best':>12}"]
    for w, r in report["workloads"].items():
        old = " ".join(f"{x['output_tok_per_s']:.0f}" for x in r["old"]) or "-"
        new = " ".join(f"{x['output_tok_per_s']:.0f}" for x in r["new"]) or "-"
        lines.append(f"{w:<10} {old:<28} {new:<28} {str(r['ratio_mean']):>12} {str(r['ratio_best']):>12}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("workloads", nargs="*", default=list(DEFAULT_WORKLOADS))
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs per workload")
    ap.add_argument("--old-commit", default="old", help="recorded as the old runs' commit")
    ap.add_argument("--new-commit", default=os.environ.get("BATCHLLM_COMMIT", "new"))
    ap.add_argument("--keep-raw", action="store_true", help="keep each run's JSON and log beside the archive")
    args = ap.parse_args(argv)
    old_dir = args.old_dir.resolve()
    for sub in ("batchllm", "benchmarks/throughput.py"):
        if not (old_dir / sub).exists():
            raise SystemExit(f"{old_dir} has no {sub}: OLD_DIR must be an export of the old commit "
                             f"holding its own batchllm/ and benchmarks/")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = dict(old_dir=str(old_dir), old_commit=args.old_commit, new_commit=args.new_commit,
                        throughput_args=extra, rounds=args.rounds, workloads={})
    raw: list[Path] = []
    for w in args.workloads:
        runs: dict[str, list[dict]] = dict(old=[], new=[])
        for r in range(1, args.rounds + 1):
            for side, tree, commit in (("old", old_dir, args.old_commit), ("new", NEW_DIR, args.new_commit)):
                path = out / f"{w}.{side}.{r}.json"
                fig = run_side(tree, w, path, commit, extra)
                raw += [p for p in (path, path.with_suffix(".log")) if p.exists()]
                if fig:
                    runs[side].append(fig)
                    report["device"] = fig["device"]
        report["workloads"][w] = dict(runs, **ratios(runs["old"], runs["new"]))
    (out / "ab.json").write_text(json.dumps(report, indent=2))
    with tarfile.open(out / "ab_runs.tgz", "w:gz") as tar:
        for p in raw:
            tar.add(p, arcname=p.name)
    if not args.keep_raw:
        for p in raw:
            p.unlink()
    print(table(report))
    failed = any(len(r["old"]) < args.rounds or len(r["new"]) < args.rounds for r in report["workloads"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
