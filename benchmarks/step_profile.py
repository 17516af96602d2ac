"""Where one decode step's time goes: host planning, device work, results, per decode-steps setting.

Builds a dummy Llama-3.2-1B engine, fills it with 256 requests (512-token prompts), prefills, then
times decode rounds with num_decode_steps 1 and 8: wall time per generated token batch, and the
host-side parts (schedule, runner incl. the device wait, update, engine bookkeeping). A torch
profiler table of the top device kernels of one round is written beside the JSON.
Usage: python benchmarks/step_profile.py --json OUT.json
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

from benchmarks.common import greedy, machine_info, make_llm, release  # noqa: E402
from benchmarks.shapes import write_model_dir  # noqa: E402


def profile(model_dir: Path, steps: int, num_reqs: int = 256, prompt_len: int = 512,
            rounds: int = 12) -> dict:
    llm = make_llm(model_dir, num_decode_steps=steps)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(num_reqs):
        eng.add_request(f"r{i}", torch.randint(100, 120000, (prompt_len,), generator=g).tolist(),
                        greedy(2000))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()  # warm
    torch.cuda.synchronize()
    parts = dict(schedule=0.0, execute=0.0, update=0.0)
    tokens = 0
    t_start = time.perf_counter()
    for _ in range(rounds):
        t0 = time.perf_counter()
        plan = eng.scheduler.schedule()
        t1 = time.perf_counter()
        out = eng.runner.execute(plan)
        t2 = time.perf_counter()
        eng.scheduler.update(plan, out)
        t3 = time.perf_counter()
        parts["schedule"] += t1 - t0
        parts["execute"] += t2 - t1
        parts["update"] += t3 - t2
        tokens += sum(c.num_steps for c in plan.chunks)
    wall = time.perf_counter() - t_start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        plan = eng.scheduler.schedule()
        out = eng.runner.execute(plan)
        eng.scheduler.update(plan, out)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    res = dict(num_decode_steps=steps, batch=num_reqs, rounds=rounds,
               ms_per_round={k: round(v / rounds * 1e3, 3) for k, v in parts.items()},
               tokens_per_round=tokens / rounds, decode_tok_per_s=round(tokens / wall, 1),
               ms_per_token_step=round(wall / (tokens / num_reqs) * 1e3, 3), kernels=table)
    del llm, eng
    release()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir("Llama-3.2-1B", Path(tmp))
        results = [profile(model_dir, s) for s in (1, 8)]
    for r in results:
        print(r.pop("kernels") if r is results[-1] else "", flush=True)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(**machine_info(), results=results), indent=2))


if __name__ == "__main__":
    main()
