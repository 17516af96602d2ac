"""The real default model (SmolLM2-135M-Instruct, float32): token-for-token parity with HF generate."""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What colour is the sky on a clear day?"}],
    [{"role": "user", "content": "List three prime numbers."}],
]


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", device="cpu")


def test_quickstart_answer(llm):
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert out.outputs[0].text.strip() == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"


def test_greedy_equals_hf_generate(llm, smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    max_new = 24
    outs = llm.chat(CHATS, SamplingParams(temperature=0.0, max_tokens=max_new))
    for chat, out in zip(CHATS, outs):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True)
        assert out.prompt_token_ids == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                            do_sample=False)
        want = y[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want, chat


def test_preemption_and_prefix_hits_keep_outputs(llm, smollm2_dir):
    sp = SamplingParams(temperature=0.0, max_tokens=16)
    base = [o.outputs[0].token_ids for o in llm.chat(CHATS, sp)]
    for mode in ("recompute", "swap"):
        small = LLM(str(smollm2_dir), dtype="float32", device="cpu", block_size=16,
                    num_gpu_blocks_override=8, preemption_mode=mode, swap_space=0.05)
        got = [o.outputs[0].token_ids for o in small.chat(CHATS, sp)]
        assert got == base
        stats = small.stats()
        assert stats["num_preemptions"] > 0
        assert stats["prefix_cache_hits"] > 0


def test_quickstart_answer_with_fp8_kv_cache(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", kv_cache_dtype="fp8")
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert out.outputs[0].text.strip() == "The capital of France is Paris."
