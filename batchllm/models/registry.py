"""Which model class serves which HF `architectures` entry: a native one, or the transformers fallback.

`model_impl` (engine setting): `auto` takes the native class when there is one and transformers'
own modeling code otherwise; `native` refuses an architecture with no native class; `transformers`
always takes the fallback. Native classes are imported only when chosen, so deciding (the job
pre-flight does) loads no torch unless the fallback is considered.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping

from batchllm.config import MODEL_IMPLS, ConfigError

logger = logging.getLogger(__name__)

_NATIVE: dict[str, str] = {  # architecture -> module:class under batchllm.models
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "llama:LlamaForCausalLM",
    "Gemma3ForCausalLM": "gemma3:Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration": "gemma3:Gemma3ForCausalLM",  # its text model only
    "Qwen3MoeForCausalLM": "moe:MoeForCausalLM",
    "MixtralForCausalLM": "moe:MoeForCausalLM",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
# Architectures with no native class that the test suite checks through the fallback against
# transformers itself (tests/models/test_fallback_parity.py); any other decoder transformers can
# build whose attention goes through its attention interface runs the same way, untested.
FALLBACK_TESTED = ("Gemma2ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM")
# layer kinds the paged KV cache serves (config `layer_types`)
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


class UnsupportedModelError(ConfigError):
    """The model's architecture cannot run (with this model_impl); the message names it and why."""


def supported_architectures() -> list[str]:
    """Architectures with a native implementation."""
    return sorted(_NATIVE)


def fallback_architectures() -> list[str]:
    """Architectures tested through the transformers fallback (any transformers decoder may run)."""
    return list(FALLBACK_TESTED)


def _get(cfg, key: str):
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def architectures(hf_config) -> list[str]:
    """The config's `architectures`, or the one its model_type stands for (config object or dict)."""
    archs = list(_get(hf_config, "architectures") or [])
    if not archs and _get(hf_config, "model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[_get(hf_config, "model_type")]]
    return archs


def native_architecture(hf_config) -> str | None:
    """The first of the config's architectures with a native class, or None."""
    return next((a for a in architectures(hf_config) if a in _NATIVE), None)


def _described(hf_config) -> str:
    return ", ".join(architectures(hf_config)) or f"model_type {_get(hf_config, 'model_type')!r}"


def _choice(hf_config, model_impl: str) -> tuple[str, str | None]:
    if model_impl not in MODEL_IMPLS:
        raise ConfigError(f"model_impl={model_impl!r} is invalid: expected {' | '.join(MODEL_IMPLS)}")
    native = native_architecture(hf_config)
    if model_impl == "native" and native is None:
        raise UnsupportedModelError(
            f"model_impl=native but {_described(hf_config)} has no native implementation "
            f"(native: {', '.join(supported_architectures())}); use model_impl: auto or "
            "transformers to run it through transformers' modeling code")
    return ("native" if native is not None and model_impl != "transformers" else "transformers"), native


def _log_choice(hf_config, model_impl: str, choice: str, native: str | None) -> None:
    if choice == "native":
        logger.info("%s: native implementation (model_impl=%s)", native, model_impl)
    else:
        logger.warning("%s: running through transformers' modeling code with batchllm's paged "
                       "attention (model_impl=%s%s)", _described(hf_config), model_impl,
                       "; no native implementation" if native is None else "")


def get_model_class(hf_config, model_impl: str = "auto") -> type:
    """The class for a config under `model_impl` (auto: native when there is one), logged with the
    architecture; UnsupportedModelError names the architecture when it cannot run."""
    choice = check_runnable(hf_config, model_impl)
    native = native_architecture(hf_config)
    _log_choice(hf_config, model_impl, choice, native)
    if choice == "transformers":
        from batchllm.models.transformers_fallback import TransformersForCausalLM

        return TransformersForCausalLM
    module, cls = _NATIVE[native].split(":")
    return getattr(importlib.import_module(f"batchllm.models.{module}"), cls)


def build_model(hf_config, model_impl: str, dtype, device, trust_remote_code: bool = False):
    """The model for a config under `model_impl`, built on `device` with its weights not yet loaded."""
    cls = get_model_class(hf_config, model_impl)
    if getattr(cls, "runs_transformers_code", False):
        return cls(hf_config, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return cls(hf_config, dtype=dtype, device=device)


def fallback_problem(hf_config) -> str | None:
    """Why transformers' modeling code cannot serve this config on the paged cache, or None.

    Checks what the config and transformers' class say (no weights, no model built): a causal LM
    class exists and is the checkpoint's, the attention goes through the attention interface, no
    attention-logit soft-capping, every layer an attention layer."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = _get(hf_config, "model_type")
    if _get(hf_config, "is_encoder_decoder"):
        return "it is an encoder-decoder model; batchllm runs decoder-only models"
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    remote = (_get(hf_config, "auto_map") or {}).get("AutoModelForCausalLM")
    if causal is None and remote is None:
        return (f"transformers has no causal language model class for model_type {model_type!r} "
                "(an encoder-only or otherwise non-generating model)")
    archs = [a for a in (_get(hf_config, "architectures") or []) if a]
    names = {causal} if isinstance(causal, str) else set(causal or ())
    if archs and remote is None and not names.intersection(archs):
        return (f"the checkpoint is a {', '.join(archs)}, not a causal language model "
                f"(transformers' causal LM class for model_type {model_type!r} is "
                f"{', '.join(sorted(names))}); an encoder-only model cannot generate")
    if causal is not None:
        import transformers

        cls = getattr(transformers, sorted(names)[0], None)
        if cls is not None and not getattr(cls, "_supports_attention_backend", False):
            return (f"{cls.__name__}'s attention does not go through transformers' attention "
                    "interface (_supports_attention_backend is false), so batchllm's paged "
                    "attention cannot be plugged in")
    cap = _get(hf_config, "attn_logit_softcapping")
    if cap is not None:
        return (f"attn_logit_softcapping={cap} in its config: batchllm's paged attention kernels "
                "do not soft-cap attention logits")
    kinds = set(_get(hf_config, "layer_types") or ()) - _ATTENTION_LAYERS
    if kinds:
        return (f"its layer_types include {', '.join(sorted(kinds))}; the paged KV cache serves "
                f"{' and '.join(sorted(_ATTENTION_LAYERS))} layers only")
    return None


def check_runnable(hf_config, model_impl: str = "auto", tensor_parallel_size: int = 1) -> str:
    """Refuse (UnsupportedModelError naming the architecture and the reason) a model that cannot
    run under these settings, before anything loads; returns the implementation it will run on."""
    choice, _ = _choice(hf_config, model_impl)
    if choice == "transformers":
        problem = fallback_problem(hf_config)
        if problem:
            raise UnsupportedModelError(f"{_described(hf_config)} cannot run through the "
                                        f"transformers fallback: {problem}")
        if tensor_parallel_size > 1:
            raise UnsupportedModelError(
                f"tensor_parallel_size={tensor_parallel_size}: {_described(hf_config)} runs "
                "through the transformers fallback, which does not split a model over ranks; "
                "use tensor_parallel_size: 1")
    return choice
