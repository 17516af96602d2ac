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


class CheckpointSlice:
    """A checkpoint tensor read lazily (safetensors' get_slice): its shape is known, and only the
    part a rank narrows to is read from the file, so no tensor-parallel rank reads the whole model.

    Supports what the weight_loaders do to a checkpoint tensor: `.shape`, `.dim()`,
    `.narrow(dim, start, length)`, `.split(sizes, dim=0)`, row slicing `[a:b]`; `copy_into` reads it."""

    def __init__(self, source, shape: tuple[int, ...] | None = None,
                 window: tuple[tuple[int, int], ...] | None = None) -> None:
        self._source = source  # object with get_shape() and numpy-style slicing (safe_open's get_slice)
        full = tuple(source.get_shape())
        self._window = window or tuple((0, n) for n in full)  # (start, stop) per dimension
        self.shape = torch.Size(shape or tuple(b - a for a, b in self._window))

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointSlice":
        dim = dim % self.dim()
        if not (0 <= start and start + length <= self.shape[dim]):
            raise ValueError(f"rows {start}:{start + length} are outside a dimension of {self.shape[dim]}")
        window = list(self._window)
        base = window[dim][0]
        window[dim] = (base + start, base + start + length)
        return CheckpointSlice(self._source, None, tuple(window))

    def split(self, sizes: list[int], dim: int = 0) -> list["CheckpointSlice"]:
        parts, start = [], 0
        for n in sizes:
            parts.append(self.narrow(dim, start, n))
            start += n
        return parts

    def __getitem__(self, rows: slice) -> "CheckpointSlice":
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "only contiguous row ranges"
        return self.narrow(0, start, stop - start)

    def read(self) -> torch.Tensor:
        return self._source[tuple(slice(a, b) for a, b in self._window)]


def materialize(tensor) -> torch.Tensor:
    """A tensor for `tensor`, reading a CheckpointSlice's part from its file."""
    return tensor.read() if isinstance(tensor, CheckpointSlice) else tensor


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError when a checkpoint tensor does not have the (unsharded) shape the layer expects."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(expected)}")


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` (any device and dtype) into `dst` (a view of a parameter's data) after a shape check."""
    check_shape(src, tuple(dst.shape))
    dst.copy_(materialize(src))


def replicated_weight_loader(param: torch.Tensor, loaded: torch.Tensor,
                             shard_id: object = None) -> FilledRows:
    """Every rank holds the whole tensor (norm scales, replicated layers)."""
    if shard_id is not None:
        raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
    copy_into(param.data, loaded)
    return None
