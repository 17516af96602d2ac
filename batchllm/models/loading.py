"""Checkpoint tensors (HF names) -> a model's parameters, through each layer's weight_loader.

Separate checkpoint projections (q_proj, k_proj, ...) map onto our fused ones as named parts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from batchllm.layers.weight_loading import replicated_weight_loader

# checkpoint module name -> (our fused module, which part of it), e.g. "k_proj" -> ("qkv_proj", "k")
FusedNames = dict[str, tuple[str, str | int]]


def checkpoint_target(name: str, fused: FusedNames) -> tuple[str, str | int | None]:
    """(our parameter name, part id or None) for a checkpoint tensor name."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in fused:
        dest, shard_id = fused[parts[-2]]
        return ".".join(parts[:-2] + [dest, parts[-1]]), shard_id
    return name, None


@torch.no_grad()
def load_checkpoint_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                            fused: FusedNames, skip: Callable[[str], bool]) -> set[str]:
    """Place every (name, tensor) not skipped; returns what was filled: parameter names, or
    `name[start:end]` for the rows of a fused parameter (what loader.check_all_loaded reads).

    A tensor with no place raises KeyError, one of the wrong shape ValueError; both name it."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target, shard_id = checkpoint_target(name, fused)
        if target not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        owner = model.get_submodule(target.rpartition(".")[0])
        loader = getattr(owner, "weight_loader", replicated_weight_loader)
        convert = getattr(owner, "checkpoint_tensor", None)  # e.g. an FP8 layer's per-tensor scale
        try:
            if convert is not None:
                tensor = convert(target.rpartition(".")[2], tensor, shard_id)
            rows = loader(params[target], tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {name!r} {exc}") from exc
        loaded.add(target if rows is None else f"{target}[{rows[0]}:{rows[1]}]")
    return loaded


def expected_weight_count(model: nn.Module, fused: FusedNames) -> int:
    """How many checkpoint tensors a complete checkpoint has for `model` (fused parts count apiece)."""
    parts: dict[str, int] = {}
    for dest, _ in fused.values():
        parts[dest] = parts.get(dest, 0) + 1
    return sum(parts.get(name.split(".")[-2], 1) for name, _ in model.named_parameters())
