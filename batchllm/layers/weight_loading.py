"""How a checkpoint tensor lands in a parameter: shape check, copy, tensor-parallel shard arithmetic."""
from __future__ import annotations

import torch

from batchllm.distributed.parallel_state import get_tensor_parallel_group

# What a weight_loader returns: the row range [start, end) of the parameter it filled, or None
# when it filled the whole parameter (see batchllm.loader.check_all_loaded).
FilledRows = tuple[int, int] | None


def tp_rank_and_size(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """The layer's (rank, size): the process's tensor-parallel place unless given explicitly."""
    state = get_tensor_parallel_group()
    rank = state.rank if tp_rank is None else tp_rank
    size = state.size if tp_size is None else tp_size
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is not in a group of size {size}")
    return rank, size


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, refusing a remainder (e.g. 9 attention heads over 2 ranks)."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor parallel size "
                         f"{denominator}; choose a size that divides it")
    return numerator // denominator


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError when a checkpoint tensor does not have the (unsharded) shape the layer expects."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(expected)}")


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` (any device and dtype) into `dst` (a view of a parameter's data) after a shape check."""
    check_shape(src, tuple(dst.shape))
    dst.copy_(src)


def replicated_weight_loader(param: torch.Tensor, loaded: torch.Tensor,
                             shard_id: object = None) -> FilledRows:
    """Every rank holds the whole tensor (norm scales, replicated layers)."""
    if shard_id is not None:
        raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
    copy_into(param.data, loaded)
    return None
