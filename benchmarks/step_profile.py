"""Where one step's time goes, per BENCHMARKS.md shape: decode rounds and a prefill step.

For each shape, an engine on dummy weights is filled with requests whose context matches the
workload (8B: 512 x 384 tokens; 1B: 512 x 672; 0.6B: 256 x 900), prefilled, then:
- decode rounds are timed through LLMEngine.step, with async scheduling off and on, for each
  num_decode_steps setting;
- three decode rounds and one 16k-token prefill step are profiled on the device, kernel time
  summed by category (GEMM, attention, KV write, norms, rotary, activation, logits/sampler,
  copies, other), with the device's busy time against the wall time (the gap is the GPU idle);
- single matrix products of the shape's layers are timed at the decode batch (TFLOP/s).

Usage: python benchmarks/step_profile.py [--shapes 8B 1B 0.6B] [--prompt-len 1024]
       [--set kv_cache_dtype=fp8] [--json OUT.json]
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

from benchmarks.common import (THROUGHPUT_ENGINE, greedy, machine_info, make_llm, parse_sets,  # noqa: E402
                               release)
from benchmarks.shapes import SHAPES, write_model_dir  # noqa: E402

CASES = {  # shape -> (name, decode batch, context at which decode is measured)
    "8B": ("Llama-3.1-8B", 512, 384),
    "1B": ("Llama-3.2-1B", 512, 672),
    "0.6B": ("Qwen3-0.6B", 256, 900),
}

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


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


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
    busy = sum(by_cat.values()) / 1e3
    return dict(wall_ms=round(wall * 1e3, 3), device_busy_ms=round(busy, 3),
                by_category_ms={k: round(v / 1e3, 3) for k, v in sorted(by_cat.items(), key=lambda x: -x[1])},
                top_kernels_ms={k: round(v / 1e3, 3) for k, v in sorted(top.items(), key=lambda x: -x[1])[:14]})


def fill(eng, num_reqs: int, ctx: int, max_tokens: int = 4000) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(num_reqs):
        eng.add_request(f"r{i}", torch.randint(100, 100000, (ctx,), generator=g).tolist(), greedy(max_tokens))
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.running):
        eng.step()


def decode_case(model_dir: Path, batch: int, ctx: int, steps: int, async_on: bool, rounds: int = 6) -> dict:
    """Decode rounds through LLMEngine.step (so async scheduling pipelines them as in a run)."""
    llm = make_llm(model_dir, num_decode_steps=steps, async_scheduling=async_on)
    eng = llm.engine
    fill(eng, batch, ctx)
    for _ in range(2):
        eng.step()
    torch.cuda.synchronize()
    before = sum(r.num_output_tokens for r in eng.scheduler.running)
    t0 = time.perf_counter()
    for _ in range(rounds):
        eng.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(r.num_output_tokens for r in eng.scheduler.running) - before
    res = dict(num_decode_steps=steps, async_scheduling=async_on, batch=batch, context=ctx,
               ms_per_decode_step=round(wall / (tokens / batch) * 1e3, 3),
               decode_tok_per_s=round(tokens / wall, 1),
               profile_three_rounds=device_breakdown(lambda: [eng.step() for _ in range(3)]))
    del llm, eng
    release()
    return res


def prefill_case(model_dir: Path, num_tokens: int = 16384, prompt_len: int = 1024) -> dict:
    llm = make_llm(model_dir, max_num_batched_tokens=num_tokens, enforce_eager=True)
    eng = llm.engine
    g = torch.Generator().manual_seed(1)

    def add(tag: str) -> None:
        for i in range(num_tokens // prompt_len):
            eng.add_request(f"{tag}{i}", torch.randint(100, 100000, (prompt_len,), generator=g).tolist(),
                            greedy(1))

    add("w")
    while eng.has_unfinished_requests():
        eng.step()
    add("p")
    res = device_breakdown(lambda: eng.step())
    while eng.has_unfinished_requests():
        eng.step()
    del llm, eng
    release()
    return dict(num_tokens=num_tokens, prompt_len=prompt_len, **res)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(CASES))
    ap.add_argument("--steps", nargs="*", type=int, default=[8])
    ap.add_argument("--prompt-len", type=int, default=1024, help="prompt length of the prefill step")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting for every case (e.g. kv_cache_dtype=fp8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    THROUGHPUT_ENGINE.update(parse_sets(args.set))
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
    if args.json:
        Path(args.json).write_text(json.dumps(dict(**machine_info(), engine_settings=THROUGHPUT_ENGINE,
                                                   results=results), indent=2))


if __name__ == "__main__":
    main()
