"""Print a short table of every benchmark JSON in a gpu_suite output folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(name: str, data: dict) -> list[tuple[str, str]]:
    f = data.get("figures", {})
    rows: list[tuple[str, str]] = []

    def line(label: str, r: dict) -> None:
        if isinstance(r, dict) and "req_per_s" in r:
            extra = f"  time/floor {r['time_over_floor']}" if "time_over_floor" in r else ""
            rows.append((label, f"{r['req_per_s']} req/s  {r['output_tok_per_s']} out tok/s  "
                                f"{r['total_tok_per_s']} tok/s{extra}"))
        elif isinstance(r, str):
            rows.append((label, r[:100]))

    if name == "W-prefix":
        line("W-prefix on", f.get("prefix_on"))
        line("W-prefix off", f.get("prefix_off"))
        rows.append(("W-prefix", f"on/off {f.get('speedup_on_over_off')}x, shared prefix from cache "
                                 f"{f.get('shared_prefix_fraction_from_cache')}"))
    elif name == "W-pressure":
        line("W-pressure unconstrained", f.get("unconstrained"))
        for mode in ("recompute", "swap", "auto"):
            r = f.get(mode, {})
            line(f"W-pressure {mode}", r)
            e = f.get("float32_equality", {}).get(mode, {})
            rows.append((f"  {mode}", f"bf16 identical {r.get('num_identical')}/{data.get('num_requests')}, "
                                       f"preemptions {r.get('stats', {}).get('num_preemptions')}; float32 "
                                       f"identical {e.get('num_identical')}/{f.get('float32_equality', {}).get('num_requests')} "
                                       f"(preemptions {e.get('num_preemptions')})"))
    elif name == "W-hf-side-by-side":
        for k in ("hf_generate", "hf_generate_batch", "batchllm"):
            line(k, f.get(k))
        rows.append(("ratio", f"batchllm / HF generate {f.get('batchllm_over_hf_generate')}x, "
                              f"/ generate_batch {f.get('batchllm_over_hf_generate_batch')}x"))
    elif name == "kernels":
        rows.extend((k, str(v)) for k, v in f.get("overview", f).items())
    else:
        line(name, f)
    return rows


def _parity(data: dict) -> list[tuple[str, str]]:
    rows = data.get("results", [])
    f32 = [r for r in rows if r.get("dtype") == "float32"]
    b16 = [r for r in rows if r.get("dtype") == "bfloat16"]
    ok32 = sum(bool(r.get("greedy_equal")) and r.get("max_logit_err", 1) < 1e-3 for r in f32)
    ok16 = sum(r.get("max_logit_err", 1e9) <= r.get("bound", 0) for r in b16)
    return [("parity", f"float32 greedy = HF generate in {ok32}/{len(f32)} cases, bf16 logits within "
                       f"bound in {ok16}/{len(b16)} (tests/gpu/test_parity.py)")]


def _timeline(data: dict) -> list[tuple[str, str]]:
    rows = [("timeline", f"{data.get('workload')}: device wall {data.get('device_wall_ms')} ms")]
    for kind in ("prompt_steps", "decode_rounds", "decode_steps"):
        k = data.get(kind) or {}
        if k:
            rows.append((f"  {kind}", f"{k['count']} x, span {k['span_ms']} ms, busy {k['busy_ms']}, "
                                      f"idle {k['idle_ms']}"))
    return rows


def main(outdir: str) -> None:
    rows: list[tuple[str, str]] = []
    devices: dict[str, str] = {}
    for path in sorted(Path(outdir).glob("*.json")):
        if path.name == "all_results.json":
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            rows.append((path.stem, "unreadable JSON"))
            continue
        c = data.get("ceilings")
        if c:
            devices[data.get("device", "?")] = (f"{c.get('matmul_tflops')} TFLOP/s bf16, "
                                                f"{c.get('copy_tbps')} TB/s copy ({c.get('source')})")
        if path.stem == "parity":
            rows.extend(_parity(data))
        elif path.stem == "timeline":
            rows.extend(_timeline(data))
        elif "figures" not in data:  # another format: show its head
            rows.append((path.stem, json.dumps(data)[:110]))
        else:
            rows.extend(_rows(path.stem, data))
    width = max((len(r[0]) for r in rows), default=10)
    print("== results ==")
    for device, ceilings in devices.items():
        print(f"device {device}: ceilings {ceilings}")
    for label, text in rows:
        print(f"{label:<{width}}  {text}")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"usage: python benchmarks/summarize.py [OUTDIR]\n{__doc__}")
        sys.exit(0)
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
