"""W-job: `batchllm run` as a user runs it (its own process: JSONL in, tokenize, engine, Arrow out,
commits) beside `LLM.generate` on the same text prompts, in one call.

Model: a shape of benchmarks/shapes.py (default W-hf's Llama-3.2-1B) with dummy weights and the
default model's tokenizer (vocabulary 49152); prompts: seeded English-like text of 80-600 words;
exactly --max-tokens output tokens each (greedy, ignore_eos). The engine runs first (it also warms
the Triton cache the job then finds), then the job in a fresh process. Figures:
- engine: output tokens / seconds of the timed LLM.generate call (text prompts, after a warm-up);
- job: output tokens / the job loop's elapsed time (summary.json: from its first row read to its
  last commit) and their ratio (target >= 0.97), also without the job's first step (kernel
  compilation, which the engine's warm-up kept out of its timed call); the job process's wall
  time, and the time from its start to its engine's first step.

Usage: python benchmarks/job_path.py --out OUT [--num-prompts 4096] [--shape Llama-3.2-1B]
       [--max-tokens 256] [--set KEY=VALUE ...]     (engine settings for both sides)
CPU smoke: python benchmarks/job_path.py --out /tmp/jp --shape Tiny --num-prompts 16
           --max-tokens 8 --set device=cpu
Writes OUT/job_path.json (and the job's folder OUT/job/) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.text_model import (FIRST_STEP_ENV, install_first_step_stamp,  # noqa: E402
                                   text_prompts, write_text_model_dir)

ENGINE = dict(dtype="bfloat16", load_format="dummy", seed=0, max_model_len=4096,
              max_num_seqs=512, max_num_batched_tokens=16384)  # benchmarks.common.THROUGHPUT_ENGINE


def run_engine(model_dir: Path, prompts: list[str], max_tokens: int, engine: dict) -> dict:
    """LLM.generate over `prompts` in this process, after a short warm-up."""
    import torch

    from batchllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(model_dir), **engine)
    build_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:min(len(prompts), 64)], SamplingParams(temperature=0.0, max_tokens=8,
                                                                 ignore_eos=True))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    del llm, outs
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return dict(build_s=round(build_s, 2), seconds=round(seconds, 3), output_tokens=tokens,
                prompt_tokens=prompt_tokens, output_tok_per_s=round(tokens / seconds, 1))


def write_job(work: Path, model_dir: Path, prompts: list[str], max_tokens: int, engine: dict) -> Path:
    import yaml

    src = work / "prompts.jsonl"
    with open(src, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i:06d}", "prompt": p}) + "\n")
    job = {"model": str(model_dir), "input": {"path": str(src), "id_column": "id"},
           "output": {"path": str(work / "job")},
           "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
           "engine": engine}
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_cli(job: Path, stamps: Path) -> dict:
    """`batchllm run JOB -q --overwrite` in a fresh process (this file's --child mode: the CLI's
    own entry point, with the first-step stamp installed)."""
    env = {**os.environ, FIRST_STEP_ENV: str(stamps), "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", "run", str(job), "-q", "--overwrite"],
                          env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"batchllm run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    stamp = json.loads(stamps.read_text())
    summary = json.loads((job.parent / "job" / "summary.json").read_text())
    return dict(wall_s=round(wall, 2), to_first_step_s=round(stamp["first_step_start"] - start, 2),
                first_step_s=round(stamp["first_step_end"] - stamp["first_step_start"], 2),
                loop_s=summary["elapsed_s"], rows=summary["rows"], errors=summary["errors"],
                output_tokens=summary["output_tokens"], prompt_tokens=summary.get("prompt_tokens"),
                output_tok_per_s=summary["throughput"]["output_tokens_per_s"],
                stdout=proc.stdout.strip()[-300:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for job_path.json and the job's files")
    ap.add_argument("--shape", default="Llama-3.2-1B")
    ap.add_argument("--num-prompts", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--words", default="80-600", help="prompt length range in words")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from benchmarks.common import machine_info, parse_sets

    info = machine_info()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    engine = {**ENGINE, **parse_sets(args.set)}
    model_dir = write_text_model_dir(args.shape, out)
    lo, hi = (int(x) for x in args.words.split("-"))
    prompts = text_prompts(args.num_prompts, seed=0, min_words=lo, max_words=hi)
    eng = run_engine(model_dir, prompts, args.max_tokens, engine)
    job = run_cli(write_job(out, model_dir, prompts, args.max_tokens, engine), out / "first_step.json")
    ratio = job["output_tok_per_s"] / eng["output_tok_per_s"]
    # the job's first step compiles (or loads) its kernels; the engine's warm-up did that outside
    # its timed call: the ratio without that step says what the job path itself costs
    steady = job["output_tokens"] / max(job["loop_s"] - job["first_step_s"], 1e-9)
    record = dict(workload="W-job", shape=args.shape, tokenizer="smollm2-135m (vocab 49152)",
                  num_prompts=len(prompts), max_tokens=args.max_tokens, engine_settings=engine,
                  engine=eng, job=job, job_over_engine=round(ratio, 4), target=0.97,
                  job_over_engine_without_first_step=round(steady / eng["output_tok_per_s"], 4),
                  end_to_end_tok_per_s=round(job["output_tokens"] / job["wall_s"], 1), **info)
    (out / "job_path.json").write_text(json.dumps(record, indent=2))
    rows = [("engine LLM.generate", f"{eng['output_tok_per_s']:.1f}", f"{eng['seconds']:.1f}", "-"),
            ("job batchllm run", f"{job['output_tok_per_s']:.1f}", f"{job['loop_s']:.1f}",
             f"{job['to_first_step_s']:.1f}")]
    print(f"W-job on {info['device']}: {len(prompts)} prompts, {args.shape}, {args.max_tokens} out")
    print(f"{'path':<22}{'output tok/s':>14}{'seconds':>10}{'to 1st step s':>15}")
    for r in rows:
        print(f"{r[0]:<22}{r[1]:>14}{r[2]:>10}{r[3]:>15}")
    print(f"job / engine: {ratio:.3f} (target >= 0.97), "
          f"{record['job_over_engine_without_first_step']:.3f} without the job's first step "
          f"({job['first_step_s']:.1f} s); job process wall {job['wall_s']:.1f} s, "
          f"end to end {record['end_to_end_tok_per_s']:.1f} tok/s; tokens equal: "
          f"{job['output_tokens'] == eng['output_tokens']}")


def child() -> None:
    """`batchllm ARGS...` with the first-step stamp: the job process of run_cli."""
    install_first_step_stamp()
    from batchllm.cli import app

    app(args=sys.argv[2:], prog_name="batchllm")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
    else:
        main()
