"""This process's place in its tensor-parallel group (rank, size, process group) and the collectives over it.

Until `init_tensor_parallel` is called every process is rank 0 of a group of size 1 and the
collectives are identities, so a single-GPU engine never touches torch.distributed. The one piece
of module state is the `TensorParallelGroup` record that `init_tensor_parallel` sets, once per
process, before any model is built; layers read it when they are constructed (and may be given
an explicit rank and size instead, as the tests do) and never change it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TensorParallelGroup:
    """Which shard of the model this process holds: rank `rank` of `size`, talking over `group`."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None with size 1 (or: the default world group)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in a group of size {self.size}")


_STATE = TensorParallelGroup()


def init_tensor_parallel(rank: int, size: int,
                         group: dist.ProcessGroup | None = None) -> TensorParallelGroup:
    """Set this process's tensor-parallel place; call once per process before building the model.

    With size > 1, torch.distributed must already be initialized (group None = the world group)."""
    global _STATE
    if size > 1 and not dist.is_initialized():
        raise RuntimeError(f"tensor parallel size {size} needs torch.distributed initialized first "
                           f"(torch.distributed.init_process_group)")
    _STATE = TensorParallelGroup(rank, size, group)
    return _STATE


def get_tensor_parallel_group() -> TensorParallelGroup:
    """This process's tensor-parallel place (rank 0 of 1 unless `init_tensor_parallel` said otherwise)."""
    return _STATE


def get_tp_rank() -> int:
    return _STATE.rank


def get_tp_size() -> int:
    return _STATE.size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel group, in place; `x` itself at size 1."""
    if _STATE.size == 1:
        return x
    dist.all_reduce(x, group=_STATE.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` in rank order; `x` itself at size 1."""
    if _STATE.size == 1:
        return x
    if x.is_cuda and dist.get_backend(_STATE.group) == "gloo":  # gloo gathers host tensors only
        return tensor_model_parallel_all_gather(x.cpu(), dim).to(x.device)
    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=dim)
