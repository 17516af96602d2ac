"""GPU correctness: every supported family against HF transformers on the same random weights.

For each family (llama, mistral, qwen2, qwen3) and each kernel backend (torch, triton):
- float32 greedy generation equals HF `generate` token for token (TF32 off on both sides; HF's
  min_new_tokens masks EOS, so ours masks it too with min_tokens);
- bfloat16 teacher-forced logits: our error against HF float32 is at most 2x HF-bfloat16's own
  error against HF float32, plus 0.02 — bf16 rounding of 8 mantissa bits makes ~1e-2 relative
  logit noise unavoidable; a wrong rotary, norm or mask gives errors of order 1.
Usage: python benchmarks/gpu_parity.py --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchllm import LLM, SamplingParams  # noqa: E402
from batchllm.layers.attention import AttentionMetadata  # noqa: E402
from tests.tiny_models import make_tiny_model_dir  # noqa: E402

SHAPE = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, intermediate_size=512, max_position_embeddings=1024)


def teacher_forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position, prefilling `ids` in two chunks through the paged cache."""
    eng = llm.engine
    model, dev, bs = eng.model, eng.device, eng.config.cache.block_size
    n = len(ids)
    nblocks = (n + bs - 1) // bs
    table = torch.arange(nblocks, dtype=torch.int32, device=dev)[None] + 1
    caches = eng.kv_cache.layer_caches()
    out = []
    x = torch.tensor(ids, device=dev)
    with torch.inference_mode():
        for s, e in ((0, n // 2), (n // 2, n)):
            pos = torch.arange(s, e, device=dev)
            slots = table[0][pos // bs].long() * bs + pos % bs
            meta = AttentionMetadata(slots, torch.tensor([0, e - s], dtype=torch.int32, device=dev),
                                     torch.tensor([e], dtype=torch.int32, device=dev), table, e - s, e)
            out.append(model.compute_logits(model(x[s:e], pos, caches, meta)))
    return torch.cat(out).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    results, ok = [], True
    tmp = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 250, (int(n),), generator=g).tolist() for n in (7, 33, 64, 129, 300, 18)]
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        d = make_tiny_model_dir(tmp / family, family, **SHAPE)
        hf32 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
        hf16 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
        want = []
        for p in prompts:
            x = torch.tensor([p], device="cuda")
            y = hf32.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                              min_new_tokens=16, do_sample=False, pad_token_id=0)
            want.append(y[0, len(p):].tolist())
        long_ids = prompts[4]
        with torch.no_grad():
            ref32 = hf32(torch.tensor([long_ids], device="cuda")).logits[0].float()
            ref16 = hf16(torch.tensor([long_ids], device="cuda")).logits[0].float()
        hf_bf16_err = (ref16 - ref32).abs().max().item()
        for backend in ("torch", "triton"):
            llm = LLM(str(d), dtype="float32", device="cuda", attention_backend=backend,
                      gpu_memory_utilization=0.3, block_size=16)
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, ignore_eos=True))
            got = [o.outputs[0].token_ids for o in outs]
            fp32_logit_err = (teacher_forced_logits(llm, long_ids) - ref32).abs().max().item()
            del llm
            llm16 = LLM(str(d), dtype="bfloat16", device="cuda", attention_backend=backend,
                        gpu_memory_utilization=0.3)
            ours16_err = (teacher_forced_logits(llm16, long_ids) - ref32).abs().max().item()
            del llm16
            row = dict(family=family, backend=backend, greedy_fp32_equal=got == want,
                       fp32_max_logit_err=fp32_logit_err, bf16_max_logit_err=ours16_err,
                       hf_bf16_max_logit_err=hf_bf16_err,
                       bf16_ok=ours16_err <= 2 * hf_bf16_err + 0.02)
            ok &= row["greedy_fp32_equal"] and row["bf16_ok"] and fp32_logit_err < 1e-3
            results.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"ok": ok, "device": torch.cuda.get_device_name(),
                                               "results": results}, indent=2))
    print("GPU PARITY", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
