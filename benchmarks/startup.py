"""Start-up: time from process start to the engine's first step, broken down, per model shape.

Each run is a fresh process (`--child`) that imports what `batchllm run` / `LLM(...)` import,
builds an engine (dummy weights, the default model's tokenizer, the benchmark engine settings)
and generates from one prompt. Phases, measured by wrapping the functions the engine build calls
(the build itself is unchanged):
  python       interpreter start until the child's first line (parent's clock)
  imports      torch, batchllm (LLM, engine, jobs, CLI) and transformers
  tokenizer    Tokenizer.load (the default model's files)
  config       the model's config.json (AutoConfig)
  model        building the model's modules on the device (empty weights)
  weights      dummy weights drawn (or a checkpoint read), FP8 quantization if set
  kv_cache     the KV cache's allocation: device blocks and the pinned CPU swap pool (its
               sizing is part of 'other')
  scheduler    the scheduler and its block pool (one record per KV block)
  cuda_graphs  decode graph capture (CUDA with the Triton backend)
  other        the rest of LLM(...) (sampler, runner, scheduler, memory sizing)
  first_step   the first engine.step: Triton compilation (or its disk cache), the first forward
Runs --runs times per shape: the first on a cold Triton kernel cache if the machine is fresh,
the later ones on a warm cache (the issue's target: <= 10 s to the first step for the 1B shape).

Usage: python benchmarks/startup.py --out OUT [--shapes Llama-3.2-1B,Llama-3.1-8B] [--runs 2]
       [--set KEY=VALUE ...]
CPU smoke: python benchmarks/startup.py --out /tmp/su --shapes Tiny --runs 1 --set device=cpu
Writes OUT/startup.json and prints a table.
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
PHASES = ("python", "imports", "tokenizer", "config", "model", "weights", "kv_cache",
          "scheduler", "cuda_graphs", "other", "first_step")
ENGINE = dict(dtype="bfloat16", load_format="dummy", seed=0, max_model_len=4096,
              max_num_seqs=512, max_num_batched_tokens=16384)  # as job_path.py


def _timed(times: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def child(parent_start: float, model_dir: str, engine: dict, result: Path) -> None:
    """One start-up, timed by phase; writes the phases (seconds) to `result`."""
    began = time.time()
    times: dict[str, float] = {"python": began - parent_start}
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import batchllm.cli  # noqa: F401  (what `batchllm run` imports first)
    import transformers  # noqa: F401
    from batchllm import LLM, SamplingParams
    from batchllm.engine import build
    from batchllm.jobs import api  # noqa: F401
    times["imports"] = time.perf_counter() - t0

    from batchllm import loader
    from batchllm.engine.llm_engine import LLMEngine
    from batchllm.models import registry
    from batchllm.runner.model_runner import ModelRunner
    from batchllm.tokenizer import Tokenizer

    Tokenizer.load = classmethod(_timed(times, "tokenizer", Tokenizer.load.__func__))
    loader.load_hf_config = _timed(times, "config", loader.load_hf_config)
    registry.build_model = _timed(times, "model", registry.build_model)
    loader.load_model = _timed(times, "load_model", loader.load_model)
    build.KVCache = _timed(times, "kv_cache", build.KVCache)
    build.Scheduler = _timed(times, "scheduler", build.Scheduler)
    ModelRunner.capture_decode_graphs = _timed(times, "cuda_graphs", ModelRunner.capture_decode_graphs)
    first = {}
    step = LLMEngine.step

    def first_step(self, *args, **kwargs):
        if "s" in first:
            return step(self, *args, **kwargs)
        t = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first["s"], first["end"] = time.perf_counter() - t, time.time()
    LLMEngine.step = first_step

    t0 = time.perf_counter()
    llm = LLM(model_dir, **engine)
    built = time.perf_counter() - t0
    llm.generate(["The first step of a long day."], SamplingParams(temperature=0.0, max_tokens=2))
    times["first_step"] = first["s"]
    load = times.pop("load_model")
    times["weights"] = load - times.get("config", 0.0) - times.get("model", 0.0)
    times["other"] = built - load - sum(times.get(p, 0.0) for p in
                                       ("tokenizer", "kv_cache", "scheduler", "cuda_graphs"))
    times["num_kv_blocks"] = llm.engine.kv_cache.num_blocks
    times["to_first_step"] = first["end"] - parent_start  # through the end of the first step
    result.write_text(json.dumps({k: round(v, 3) for k, v in times.items()}))
    del llm


def run_once(model_dir: Path, engine: dict, result: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(start), str(model_dir),
                           json.dumps(engine), str(result)], env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"start-up run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(result.read_text()), process_wall_s=round(wall, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="Llama-3.2-1B,Llama-3.1-8B")
    ap.add_argument("--runs", type=int, default=2, help="runs per shape (the first may be cold)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info, parse_sets
    from benchmarks.text_model import write_text_model_dir

    info = machine_info()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    engine = {**ENGINE, **parse_sets(args.set)}
    runs = []
    for shape in args.shapes.split(","):
        model_dir = write_text_model_dir(shape, out)
        for i in range(args.runs):
            runs.append(dict(shape=shape, run=i + 1, **run_once(model_dir, engine, out / "phases.json")))
    (out / "phases.json").unlink(missing_ok=True)
    (out / "startup.json").write_text(json.dumps(dict(engine_settings=engine, runs=runs,
                                                      target_1b_warm_s=10.0, **info), indent=2))
    cols = PHASES + ("to_first_step",)
    print(f"start-up on {info['device']} (seconds; run 1 may be on a cold kernel cache)")
    print(f"{'shape':<14}{'run':>4}" + "".join(f"{c[:10]:>11}" for c in cols) + f"{'kv blocks':>11}")
    for r in runs:
        print(f"{r['shape']:<14}{r['run']:>4}" + "".join(f"{r.get(c, 0.0):>11.2f}" for c in cols)
              + f"{r['num_kv_blocks']:>11}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(float(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
