"""Throughput of one BENCHMARKS.md workload: warm-up excluded, one timed pass, roofline ratio.

Usage: python benchmarks/throughput.py --workload W-8B|W-nano|W-hf|W-prefix|W-pressure|W-json
       [--json OUT] [--set KEY=VALUE ...] [--num-prompts N] [--shape NAME] [--tokenizer DIR]
W-prefix runs with prefix caching on and off; W-pressure caps the KV cache to 1/4 of need and
runs every preemption mode against an unconstrained greedy run; W-json runs W-hf's prompts
unconstrained and each with its JSON schema, side by side (--tokenizer: an HF tokenizer folder
whose vocabulary fits the shape's; default the tests' tiny byte-level one, whose masks are cheap). The floor uses the ceilings of
the device it runs on (benchmarks/roofline.py), recorded in the JSON.
Smoke run on CPU: --set device=cpu --shape Tiny --num-prompts 8 (figures mean nothing there).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (THROUGHPUT_ENGINE, StepTrace, count_output_tokens, greedy,  # noqa: E402
                               machine_info, make_llm, parse_sets, rates, release, timed_generate,
                               write_json)
from benchmarks.roofline import device_ceilings, workload_floor  # noqa: E402
from benchmarks.shapes import SHAPES, shape_stats, write_model_dir  # noqa: E402
from benchmarks.workloads import WORKLOADS, Workload, build_workload, warmup_workload  # noqa: E402
from batchllm.sampling_params import StructuredOutputsParams  # noqa: E402

COUNTERS = ("num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "num_prompt_tokens",
            "num_generated_tokens", "num_shared_prefix_steps", "num_chained_steps", "num_chained_rounds")


def warm_up(llm, work: Workload, constrained: bool = False) -> None:
    prompts, outs = warmup_workload(work)
    llm.generate(prompts, _params(outs, work.schemas if constrained else None))


def _params(output_lens: list[int], schemas: list[dict] | None, logprobs: int | None = None) -> list:
    """Greedy, fixed lengths; with schemas, each request also constrained to its schema (it then
    ends where its JSON is complete, within its length)."""
    params = [greedy(n, logprobs) for n in output_lens]
    if schemas:
        params = [p.with_overrides(structured_outputs=StructuredOutputsParams(
            json=schemas[i % len(schemas)])) for i, p in enumerate(params)]
    return params


def run_once(model_dir: Path, work: Workload, logprobs: int | None = None, constrained: bool = False,
             **engine_kwargs: object) -> dict:
    """Build an engine, warm it up, time the workload; returns figures, stats delta and outputs.
    `constrained`: each request with its schema (W-json)."""
    t0 = time.perf_counter()
    llm = make_llm(model_dir, **engine_kwargs)
    startup = time.perf_counter() - t0  # weights, KV cache, CUDA graph capture
    warm_up(llm, work, constrained)
    before = llm.stats()
    with StepTrace(llm.engine) as trace:
        if constrained:
            seconds, outs = _timed(llm, work.prompts, _params(work.output_lens, work.schemas))
        else:
            seconds, outs = timed_generate(llm, work.prompts, work.output_lens, logprobs)
    after = llm.stats()
    delta = {k: after[k] - before.get(k, 0) for k in COUNTERS if k in after}
    errors = [o.outputs[0].finish_reason for o in outs if o.outputs[0].finish_reason == "error"]
    result = dict(rates(seconds, len(outs), work.num_prompt_tokens, count_output_tokens(outs)),
                  stats=delta, num_errors=len(errors), engine=engine_kwargs, startup_s=round(startup, 2),
                  kv_blocks=after.get("num_gpu_blocks"), steps=trace.summary())
    if constrained:
        valid = [o.outputs[0].structured_output_valid for o in outs]
        result.update(num_valid=sum(v is True for v in valid), num_invalid=sum(v is False for v in valid))
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    top = [[{t: x.logprob for t, x in step.items()} for step in o.outputs[0].logprobs]
           for o in outs] if logprobs else None
    del llm
    release()
    return dict(result=result, tokens=tokens, top_logprobs=top)


def _floor(work: Workload, cached: int = 0, shared_prefix_len: int = 0):
    """The floor of this run's settings: its max_num_seqs, and one byte per KV element with an fp8 cache."""
    stats = shape_stats(work.shape)
    if str(THROUGHPUT_ENGINE.get("kv_cache_dtype", "auto")).startswith("fp8"):
        stats = dataclasses.replace(stats, kv_bytes_per_token=stats.kv_bytes_per_token // 2)
    return workload_floor(stats, [len(p) for p in work.prompts], work.output_lens, device_ceilings(),
                          cached_prompt_tokens=cached, shared_prefix_len=shared_prefix_len,
                          max_num_seqs=int(THROUGHPUT_ENGINE.get("max_num_seqs", 256)))


def with_floor(result: dict, work: Workload, cached: int = 0) -> dict:
    floor = _floor(work, cached)
    result["floor"] = dict(seconds=round(floor.seconds, 3), compute_s=round(floor.compute_s, 3),
                           memory_s=round(floor.memory_s, 3), est_decode_steps=floor.decode_steps)
    result["time_over_floor"] = round(result["seconds"] / floor.seconds, 2)
    if result["stats"].get("num_shared_prefix_steps"):  # the run read the shared prefix once per step
        once = _floor(work, cached, work.shared_prefix_len)
        result["floor_prefix_read_once"] = dict(seconds=round(once.seconds, 3), memory_s=round(once.memory_s, 3))
        result["time_over_floor_prefix_read_once"] = round(result["seconds"] / once.seconds, 2)
    return result


def bench_plain(model_dir: Path, work: Workload) -> dict:
    return with_floor(run_once(model_dir, work)["result"], work)


def _timed(llm, prompts: list[list[int]], params: list) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def bench_json(model_dir: Path, work: Workload, tokenizer: str) -> dict:
    """W-json: the prompts unconstrained (fixed lengths) and constrained to their schemas (up to
    the same lengths), one after the other in this call; the ratio compares output tokens/s."""
    kw = dict(tokenizer=tokenizer, skip_tokenizer_init=False)
    plain = run_once(model_dir, work, **kw)["result"]
    constrained = run_once(model_dir, work, constrained=True, **kw)["result"]
    return dict(unconstrained=plain, constrained=constrained, tokenizer=tokenizer,
                output_tok_per_s_ratio=round(constrained["output_tok_per_s"] / plain["output_tok_per_s"], 3))


def write_tiny_tokenizer(folder: Path) -> str:
    """The tests' byte-level BPE tokenizer (300 ids), for smoke runs of W-json."""
    from tests.tiny_models import build_tokenizer

    out = Path(folder) / "tiny-tokenizer"
    build_tokenizer().save_pretrained(str(out))
    return str(out)


def bench_prefix(model_dir: Path, work: Workload) -> dict:
    on = run_once(model_dir, work, enable_prefix_caching=True)["result"]
    off = run_once(model_dir, work, enable_prefix_caching=False)["result"]
    shared = work.shared_prefix_len * len(work.prompts)
    hits = on["stats"].get("prefix_cache_hits", 0)
    return dict(prefix_on=with_floor(on, work, cached=hits), prefix_off=with_floor(off, work),
                speedup_on_over_off=round(off["seconds"] / on["seconds"], 2),
                shared_prefix_tokens=shared, prefix_cache_hit_tokens=hits,
                shared_prefix_fraction_from_cache=round(min(hits, shared) / shared, 4))


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _capped_blocks(work: Workload, prompts: list[list[int]], block: int = 16) -> tuple[int, int]:
    """(blocks all requests need at full length, a quarter of that, but at least the largest one)."""
    per_request = [-(-(len(p) + o) // block) for p, o in zip(prompts, work.output_lens)]
    return sum(per_request), max(sum(per_request) // 4, max(per_request))


def _compare(tokens: list[list[int]], base: list[list[int]]) -> dict:
    same = [a == b for a, b in zip(tokens, base)]
    diverged = [_first_divergence(a, b) for a, b, s in zip(tokens, base, same) if not s]
    return dict(outputs_identical=all(same), num_identical=sum(same), first_divergence_positions=diverged[:20])


def fp32_equality(model_dir: Path, work: Workload, n: int = 128) -> dict:
    """Greedy outputs under a 1/4 cache vs an unconstrained cache, in float32 without TF32.

    bf16 greedy on random weights is no test of preemption: logits of a random model are close
    together, so the rounding differences between two batch schedules flip argmaxes within tens
    of tokens whether or not anything was preempted. float32 rounding is ~1e5 times smaller."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sub = truncated(work, n)
    _, cap = _capped_blocks(sub, sub.prompts)
    ref = run_once(model_dir, sub, logprobs=2, dtype="float32")
    base = ref["tokens"]
    report: dict = dict(num_requests=len(sub.prompts), blocks_capped=cap)
    for mode in ("recompute", "swap", "auto"):
        run = run_once(model_dir, sub, dtype="float32", num_gpu_blocks_override=cap, preemption_mode=mode)
        report[mode] = dict(_compare(run["tokens"], base),
                            num_preemptions=run["result"]["stats"].get("num_preemptions"),
                            top2_logprob_gaps_at_divergence=_gaps(run["tokens"], base, ref["top_logprobs"]))
    return report


def _gaps(tokens: list[list[int]], base: list[list[int]], top: list | None) -> list[float]:
    """For each diverging request, the unconstrained run's gap between its two best log-probs at the
    first divergence: a gap near float32 rounding (~1e-6) marks a tie, not a preemption bug."""
    gaps = []
    for r, (a, b) in enumerate(zip(tokens, base)):
        i = _first_divergence(a, b)
        if a != b and top and top[r] and i < len(top[r]) and len(top[r][i]) >= 2:
            best = sorted(top[r][i].values(), reverse=True)
            gaps.append(float(f"{best[0] - best[1]:.3g}"))
    return gaps[:20]


def bench_pressure(model_dir: Path, work: Workload) -> dict:
    """Unconstrained greedy run, then the KV cache capped to 1/4 of what all requests need at full
    length, once per preemption mode (bf16 throughput; bf16 and float32 output equality)."""
    base = run_once(model_dir, work)
    need, cap = _capped_blocks(work, work.prompts)
    report: dict = dict(blocks_needed=need, blocks_capped=cap, unconstrained=with_floor(base["result"], work))
    for mode in ("recompute", "swap", "auto"):
        run = run_once(model_dir, work, num_gpu_blocks_override=cap, preemption_mode=mode)
        report[mode] = dict(with_floor(run["result"], work), **_compare(run["tokens"], base["tokens"]))
    report["float32_equality"] = fp32_equality(model_dir, work)
    return report


def truncated(work: Workload, n: int | None) -> Workload:
    """The first n requests of a workload (all of them when n is None)."""
    n = len(work.prompts) if n is None else min(n, len(work.prompts))
    return Workload(work.name, work.shape, work.prompts[:n], work.output_lens[:n], work.shared_prefix_len,
                    work.schemas[:n] if work.schemas else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, choices=WORKLOADS)
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting for every run (e.g. num_decode_steps=1, device=cpu)")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N requests only (quick runs)")
    ap.add_argument("--shape", default=None, choices=list(SHAPES),
                    help="run the workload's prompts on another shape (Tiny: CPU smoke runs)")
    ap.add_argument("--tokenizer", default=None,
                    help="W-json: an HF tokenizer folder (default: the tests' tiny tokenizer)")
    args = ap.parse_args()
    THROUGHPUT_ENGINE.update(parse_sets(args.set))
    if not torch.cuda.is_available() and THROUGHPUT_ENGINE.get("device") != "cpu":
        raise SystemExit("throughput.py needs a CUDA GPU (the figures are GPU figures); for a smoke "
                         "run on CPU pass --set device=cpu --shape Tiny --num-prompts 8")
    info = machine_info()  # measures the device's ceilings before any engine takes its memory
    work = truncated(build_workload(args.workload), args.num_prompts)
    if args.shape:
        work.shape = args.shape
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(work.shape, Path(tmp))
        if args.workload == "W-prefix":
            figures = bench_prefix(model_dir, work)
        elif args.workload == "W-pressure":
            figures = bench_pressure(model_dir, work)
        elif args.workload == "W-json":
            figures = bench_json(model_dir, work, args.tokenizer or write_tiny_tokenizer(Path(tmp)))
        else:
            figures = bench_plain(model_dir, work)
    write_json(args.json, dict(workload=args.workload, shape=work.shape, num_requests=len(work.prompts),
                               prompt_tokens=work.num_prompt_tokens, output_tokens=work.num_output_tokens,
                               engine_settings=THROUGHPUT_ENGINE, **info, figures=figures))


if __name__ == "__main__":
    main()
