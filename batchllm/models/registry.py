"""Which model class serves which HF `architectures` entry."""
from __future__ import annotations

from batchllm.models.gemma3 import Gemma3ForCausalLM
from batchllm.models.llama import LlamaForCausalLM
from batchllm.models.moe import MoeForCausalLM

_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # its text model only
    "Qwen3MoeForCausalLM": MoeForCausalLM,
    "MixtralForCausalLM": MoeForCausalLM,
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


class UnsupportedModelError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(hf_config) -> type:
    """The class for a config's `architectures` (or model_type when architectures is missing)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf_config.model_type]]
    for arch in archs:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise UnsupportedModelError(
        f"model architecture {archs or getattr(hf_config, 'model_type', None)!r} is not supported; "
        f"supported: {', '.join(supported_architectures())}")
