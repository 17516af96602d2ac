"""FP8 weights against the same model unquantized: greedy agreement and logit differences.

For P prompts: each model's greedy continuation (N tokens, EOS ignored); agreement is the share
of positions where the FP8 tokens equal the reference's, and the share of prompts whose first N
tokens are all equal. Then both models are teacher-forced on prompt + the reference's tokens and
the mean absolute difference of their logits over those N positions is reported (beside the
reference's mean |logit|, for scale).

Usage (CPU, the default model):   python -m benchmarks.fp8_accuracy --out OUT
GPU, random weights of a shape:   python -m benchmarks.fp8_accuracy --shape Llama-3.2-1B --out OUT
Writes OUT/fp8_accuracy.json and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.attention import AttentionMetadata

_TOPICS = ["the ocean", "a small village", "the history of paper", "learning to cook",
           "the moon", "a rainy afternoon", "trains", "the first computers", "friendship",
           "mountains in winter", "a lost key", "honey bees", "the printing press",
           "a city at night", "gardening", "the speed of light"]
_FORMS = ["Write a short story about {}.", "Explain {} to a child.",
          "List three facts about {}.", "The most surprising thing about {} is"]
BLOCK = 16


def accuracy_prompts(n: int = 64) -> list[str]:
    """`n` varied prompts, the same every run."""
    return [_FORMS[i // len(_TOPICS) % len(_FORMS)].format(_TOPICS[i % len(_TOPICS)])
            for i in range(n)]


@torch.inference_mode()
def teacher_forced_logits(model, seqs: list[list[int]], last: int) -> torch.Tensor:
    """Logits predicting each of the last `last` tokens of every sequence ([len(seqs) * last,
    vocab], float32), all sequences in one prefill through a fresh paged cache (torch kernels)."""
    from batchllm.kernels import get_kernels

    model.use_kernels(get_kernels("torch"))
    p = next(model.parameters())
    f = model.family
    blocks = [-(-len(s) // BLOCK) for s in seqs]
    layers = len(model.model.layers)
    caches = [tuple(torch.zeros(sum(blocks), BLOCK, f.num_kv_heads, f.head_dim, dtype=p.dtype,
                                device=p.device) for _ in range(2)) for _ in range(layers)]
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    slots, positions, starts, rows, first = [], [], [0], [], 0
    for i, (s, nb) in enumerate(zip(seqs, blocks)):
        table[i, :nb] = torch.arange(first, first + nb)
        slots.extend(first * BLOCK + j for j in range(len(s)))
        positions.extend(range(len(s)))
        rows.extend(starts[-1] + j for j in range(len(s) - last - 1, len(s) - 1))
        starts.append(starts[-1] + len(s))
        first += nb
    dev = p.device
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev), seq_lens=torch.tensor(
            [len(s) for s in seqs], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        block_tables=table.to(dev), max_query_len=max(map(len, seqs)),
        max_seq_len=max(map(len, seqs)))
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    hidden = model(ids, torch.tensor(positions, device=dev), caches, meta)
    return model.compute_logits(hidden[torch.tensor(rows, device=dev)]).float()


def run_variant(model: str, prompts: list, tokens: int, **engine) -> tuple[list[list[int]], object, list[list[int]]]:
    """(prompt token ids, the LLM, greedy continuations) of one engine."""
    llm = LLM(model, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate(prompts, params)
    return [list(o.prompt_token_ids) for o in outs], llm, [list(o.outputs[0].token_ids) for o in outs]


def measure(model: str, prompts: list, tokens: int = 32, **engine) -> dict:
    """Agreement and logit figures of quantization=fp8 against the same engine settings unquantized."""
    t0 = time.perf_counter()
    prompt_ids, ref_llm, ref = run_variant(model, prompts, tokens, **engine)
    seqs = [p + r for p, r in zip(prompt_ids, ref)]
    ref_logits = teacher_forced_logits(ref_llm.engine.model, seqs, tokens).cpu()
    del ref_llm
    gc.collect()
    _, fp8_llm, got = run_variant(model, prompts, tokens, quantization="fp8", **engine)
    fp8_logits = teacher_forced_logits(fp8_llm.engine.model, seqs, tokens).cpu()
    del fp8_llm
    gc.collect()
    same = [sum(a == b for a, b in zip(r, g)) for r, g in zip(ref, got)]
    leading = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), tokens) for r, g in zip(ref, got)]
    forced_same = (ref_logits.argmax(-1) == fp8_logits.argmax(-1)).float().mean().item()
    return dict(
        prompts=len(prompts), tokens=tokens,
        token_agreement=round(sum(same) / (tokens * len(prompts)), 4),
        prompts_all_equal=round(sum(n == tokens for n in same) / len(prompts), 4),
        mean_leading_equal=round(sum(leading) / len(prompts), 2),
        teacher_forced_top1_agreement=round(forced_same, 4),
        mean_abs_logit_diff=round((ref_logits - fp8_logits).abs().mean().item(), 5),
        max_abs_logit_diff=round((ref_logits - fp8_logits).abs().max().item(), 4),
        mean_abs_logit=round(ref_logits.abs().mean().item(), 4),
        seconds=round(time.perf_counter() - t0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name or folder (default model)")
    ap.add_argument("--shape", default=None, help="a benchmarks/shapes.py shape, dummy weights, "
                    "token-id prompts (for the GPU)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="folder for fp8_accuracy.json")
    args = ap.parse_args()
    engine: dict = dict(dtype=args.dtype, device=args.device, seed=0)
    if args.shape:
        import tempfile

        from benchmarks.shapes import SHAPES, write_model_dir

        model = str(write_model_dir(args.shape, Path(tempfile.mkdtemp())))
        gen = torch.Generator().manual_seed(0)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompts: list = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
                         for n in torch.randint(16, 128, (args.prompts,), generator=gen)]
        engine.update(load_format="dummy", skip_tokenizer_init=True, max_model_len=1024)
        name = f"{args.shape} (dummy weights)"
    else:
        model, prompts, name = args.model, accuracy_prompts(args.prompts), args.model
    figures = dict(model=name, dtype=args.dtype, device=args.device,
                   **measure(model, prompts, args.tokens, **engine))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_accuracy.json").write_text(json.dumps(figures, indent=2))
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
