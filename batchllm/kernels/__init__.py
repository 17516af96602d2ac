"""Kernel backends: the plain-torch references and their Triton twins, picked by name.

Importing this package never imports triton; `get_kernels("triton")` does.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "triton")


@dataclass(frozen=True, slots=True)
class KernelSet:
    """One backend's kernels; every function has the signature of its reference.py twin."""

    name: str
    paged_attention: Callable[..., torch.Tensor]
    write_kv: Callable[..., None]
    rms_norm: Callable[..., torch.Tensor]
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    gelu_tanh_and_mul: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]  # routed experts' MLP (reference.fused_moe)


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: triton importable, and a CUDA device or the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.device(device).type == "cuda" or interpreting()


GreedySample = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def greedy_sample_for(device: torch.device | str) -> GreedySample:
    """greedy_sample (logits [B, V] -> tokens, token log-probs, bad rows) for logits on `device`:
    the fused Triton kernel on a CUDA device with triton installed, else the torch reference (the
    interpreter is for the kernel tests, which call the Triton version directly; it would only
    slow the engine's CPU path)."""
    if torch.device(device).type == "cuda" and triton_available(device):
        from batchllm.kernels import triton_sampling

        return triton_sampling.greedy_sample
    from batchllm.kernels import reference

    return reference.greedy_sample


def get_kernels(backend: str) -> KernelSet:
    """The kernels of `backend` ("torch" or "triton")."""
    if backend == "torch":
        from batchllm.kernels import reference as ref

        return KernelSet("torch", ref.paged_attention, ref.write_kv, ref.rms_norm, ref.fused_add_rms_norm,
                         ref.rotary_embedding, ref.silu_and_mul, gelu_tanh_and_mul=ref.gelu_tanh_and_mul,
                         fused_moe=ref.fused_moe)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("kernel backend 'triton' needs the triton package: `pip install triton`, "
                               "or use attention_backend='torch'")
        from batchllm.kernels import triton_activation, triton_attention, triton_cache, triton_norm, triton_rotary
        from batchllm.kernels import triton_moe

        return KernelSet("triton", triton_attention.paged_attention, triton_cache.write_kv,
                         triton_norm.rms_norm, triton_norm.fused_add_rms_norm,
                         triton_rotary.rotary_embedding, triton_activation.silu_and_mul,
                         gelu_tanh_and_mul=triton_activation.gelu_tanh_and_mul,
                         fused_moe=triton_moe.fused_moe)
    raise ValueError(f"unknown kernel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
