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
        rows.extend((k, str(v)) for k, v in f.items())
    else:
        line(name, f)
    return rows


def main(outdir: str) -> None:
    rows: list[tuple[str, str]] = []
    device = ""
    for path in sorted(Path(outdir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            rows.append((path.stem, "unreadable JSON"))
            continue
        device = data.get("device", device)
        if "figures" not in data:  # another script's format (e.g. gpu_parity): show its head
            rows.append((path.stem, json.dumps(data)[:110]))
            continue
        rows.extend(_rows(path.stem, data))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"== results ({device}) ==")
    for label, text in rows:
        print(f"{label:<{width}}  {text}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
