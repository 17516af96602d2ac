"""Rotary position embedding tables: default, linear and Llama-3 frequency scaling."""
from __future__ import annotations

import math

import torch


class UnsupportedRopeError(ValueError):
    pass


def rope_parameters(hf_config) -> dict:
    """The rope settings of a config, whichever transformers version wrote it."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    """Per-pair rotation frequencies, scaled as the config's rope_type says."""
    base = float(params["rope_theta"])
    # float32 throughout, as the reference implementation computes it, so positions agree bit for bit
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params.get("rope_type") or "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise UnsupportedRopeError(
        f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def cos_sin_cache(head_dim: int, max_positions: int, params: dict,
                  device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32 table: cat(cos, sin) over head_dim / 2 frequencies."""
    inv_freq = inverse_frequencies(head_dim, params).to(device)
    t = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
