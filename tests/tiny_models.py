"""Tiny random Hugging Face model folders (config, safetensors, local fast tokenizer) for tests.

`make_tiny_model_dir(path, family)` writes a folder that both HF transformers and batchllm can
load, so tests can compare the two. Nothing here touches the network.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES: dict[str, tuple[str, str]] = {
    # family -> (model_type, architecture)
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "gemma3_mm": ("gemma3", "Gemma3ForConditionalGeneration"),  # text model inside a multimodal one
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    # no native implementation: these run through the transformers fallback
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "granite": ("granite", "GraniteForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
}
# mixture-of-experts families: few, small experts (Qwen3-MoE 8 of 32 features, top 2, weights
# renormalized; Mixtral 4 of 48, top 2), so the tokens of a step spread over several experts
_MOE: dict[str, dict[str, object]] = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                    sliding_window=None),
}

# Gemma 3: local (8-key window) and global layers alternate; the two rotary bases, the attention
# scale and the window all differ from their defaults, so mixing one up moves the logits
_GEMMA3: dict[str, object] = dict(
    num_hidden_layers=4, sliding_window=8, sliding_window_pattern=2,  # local, global, local, ...
    rope_theta=1_000_000.0, rope_local_base_freq=100.0, query_pre_attn_scalar=24,
    hidden_activation="gelu_pytorch_tanh")
# Fallback families, each with what sets it apart from Llama turned away from its default so that a
# step the fallback skipped moves the logits: Phi-3's sliding window (8 keys) over fused qkv and
# gate_up; Granite's four multipliers; Gemma 2's alternating local / global layers, attention
# scale, tanh-capped logits (its attention-logit cap is off: the paged kernels do not apply one)
_FALLBACK: dict[str, dict[str, object]] = {
    "phi3": dict(sliding_window=8, original_max_position_embeddings=512),
    "olmo2": {},
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                    logits_scaling=4.0),
    "gemma2": dict(sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=None,
                   final_logit_softcapping=5.0, hidden_activation="gelu_pytorch_tanh"),
}
_TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A few hand-picked byte-level merges so that common words become multi-byte tokens.
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("e", "r"),
           ("o", "n"), ("Ġ", "s"), ("r", "e"), ("a", "t"), ("Ġ", "c"), ("e", "n")]


def build_tokenizer():
    """A byte-level BPE fast tokenizer over all 256 bytes plus a few merges (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE)


def tiny_config(family: str = "llama", vocab_size: int = 300, **overrides: object):
    """The HF config of a tiny model of `family` (64 hidden, 2 layers, 4 heads / 2 KV heads)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
    model_type, arch = FAMILIES[family]
    kwargs: dict[str, object] = dict(
        architectures=[arch], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=vocab_size,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    if model_type.startswith("gemma3"):
        kwargs.update(_GEMMA3)
    if model_type == "gemma3":  # the text model's settings go into text_config
        text = {k: v for k, v in {**kwargs, **overrides}.items() if k != "architectures"}
        return AutoConfig.for_model(model_type, architectures=[arch], text_config=text,
                                    vision_config=dict(_TINY_SIGLIP), mm_tokens_per_image=4,
                                    tie_word_embeddings=text["tie_word_embeddings"], dtype="float32")
    kwargs.update(_MOE.get(family, {}))
    kwargs.update(_FALLBACK.get(family, {}))
    # a tuple (hashable, as the tiny_model_factory fixture's keys must be) stands for a JSON list
    kwargs.update({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Fill every parameter from a seeded generator: weights/biases ~ N(0, std), norm scales
    ~ 1 + N(0, std). Non-trivial biases and norm scales make a wrong load visible in logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        p.copy_(noise + 1.0 if "norm" in name else noise)


def make_tiny_model_dir(path: str | Path, family: str = "llama", seed: int = 0,
                        **overrides: object) -> Path:
    """Write a tiny random HF model folder of `family` at `path` and return it.

    `overrides` go into the HF config (e.g. tie_word_embeddings=True, num_hidden_layers=3).
    Weights: the HF model class built from that config with seeded random parameters, saved as
    model.safetensors in float32; tokenizer: the local byte-level BPE tokenizer with a chat template.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    overrides.setdefault("vocab_size", len(tokenizer))
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
