"""W-hf side by side in one process: HF transformers `generate` (static batches of 64),
`generate_batch` (continuous batching, when the installed transformers has it) and batchllm,
all on the same random Llama-3.2-1B weights (HF's seeded init, saved once and loaded by batchllm).

Usage: python benchmarks/hf_side_by_side.py [--json OUT] [--num-prompts N] [--skip-generate-batch]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (StepTrace, count_output_tokens, greedy, machine_info, make_llm, parse_sets, rates,  # noqa: E402
                               release, timed_generate, write_json)
from benchmarks.shapes import write_model_dir  # noqa: E402
from benchmarks.workloads import build_workload, warmup_workload  # noqa: E402

HF_BATCH = 64


def build_hf_model(config_dir: Path, weights_dir: Path):
    """HF's own seeded random init of the shape, saved as safetensors for batchllm to load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None  # fixed output lengths (ignore_eos)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(weights_dir)
    return model


def _left_padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.cuda(), mask.cuda()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new: int) -> tuple[float, list[list[int]]]:
    """Static batches of HF_BATCH in input order, greedy; (seconds, generated ids per prompt)."""
    outs: list[list[int]] = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), HF_BATCH):
        ids, mask = _left_padded(prompts[i:i + HF_BATCH])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                             min_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
        outs.extend(gen[:, ids.shape[1]:].tolist())
    torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def hf_generate_batch(model, prompts: list[list[int]], max_new: int) -> tuple[float, int]:
    """transformers' continuous batching; (seconds, generated tokens)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=prompts[:8], generation_config=cfg, progress_bar=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.generated_tokens) for r in res.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--num-prompts", type=int, default=None, help="first N prompts of W-hf only (quick runs)")
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also time batchllm with these engine settings (e.g. kv_cache_dtype=fp8)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("hf_side_by_side.py needs a CUDA GPU")
    info = machine_info()  # device ceilings, measured before any model takes memory
    work = build_workload("W-hf")
    prompts, out_lens = work.prompts[:args.num_prompts], work.output_lens[:args.num_prompts]
    max_new = out_lens[0]
    n_prompt = sum(len(p) for p in prompts)
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = write_model_dir(work.shape, Path(tmp))
        weights_dir = Path(tmp) / "weights"
        model = build_hf_model(config_dir, weights_dir)

        hf_generate(model, prompts[:HF_BATCH][:8], 8)  # warm-up
        sec, hf_tokens = hf_generate(model, prompts, max_new)
        figures["hf_generate"] = rates(sec, len(prompts), n_prompt, sum(len(t) for t in hf_tokens))
        if args.skip_generate_batch:
            figures["hf_generate_batch"] = "skipped (--skip-generate-batch)"
        elif hasattr(model, "generate_batch"):
            try:
                sec, n_out = hf_generate_batch(model, prompts, max_new)
                figures["hf_generate_batch"] = rates(sec, len(prompts), n_prompt, n_out)
            except Exception as exc:  # report and go on: the comparison with `generate` still stands
                figures["hf_generate_batch"] = f"failed: {type(exc).__name__}: {exc}"[:500]
        else:
            figures["hf_generate_batch"] = "not available in this transformers"
        del model
        release()

        ours = None
        for variant in [""] + args.variant:
            settings = parse_sets([kv for kv in variant.split(",") if kv])
            llm = make_llm(weights_dir, load_format="auto", **settings)
            warm_p, warm_o = warmup_workload(work)
            llm.generate(warm_p, [greedy(n) for n in warm_o])
            with StepTrace(llm.engine) as trace:
                sec, outs = timed_generate(llm, prompts, out_lens)
            name = f"batchllm[{variant}]" if variant else "batchllm"
            figures[name] = dict(rates(sec, len(outs), n_prompt, count_output_tokens(outs)), steps=trace.summary())
            ours = ours or [list(o.outputs[0].token_ids) for o in outs]
            del llm
            release()

    base = figures["hf_generate"]["output_tok_per_s"]
    figures["batchllm_over_hf_generate"] = round(figures["batchllm"]["output_tok_per_s"] / base, 2)
    for variant in args.variant:
        figures[f"batchllm[{variant}]_over_hf_generate"] = round(
            figures[f"batchllm[{variant}]"]["output_tok_per_s"] / base, 2)
    if isinstance(figures["hf_generate_batch"], dict):
        figures["batchllm_over_hf_generate_batch"] = round(
            figures["batchllm"]["output_tok_per_s"] / figures["hf_generate_batch"]["output_tok_per_s"], 2)
    # bf16 greedy on random weights: batch shape changes rounding, so agreement is informative only
    figures["greedy_first16_agreement_with_hf"] = round(
        sum(a[:16] == b[:16] for a, b in zip(ours, hf_tokens)) / len(ours), 3)
    write_json(args.json, dict(workload="W-hf", shape=work.shape, num_requests=len(prompts),
                               prompt_tokens=n_prompt, **info, figures=figures))


if __name__ == "__main__":
    main()
