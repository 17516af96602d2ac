"""Linear projections that know their tensor-parallel shard: replicated, column, merged column (gate/up), QKV, row.

Each layer holds only its rank's part of the weight and has a `weight_loader(param, loaded,
shard_id=None)` that checks the full checkpoint tensor's shape, copies exactly the slice this
rank owns and returns the rows of `param` it filled (None: all of them). With a tensor parallel
size of 1 (today's engine) every layer is a plain `F.linear` over the whole weight.

A layer may hold its weight quantized: `set_quant_method(method)` (layers/quantization, e.g.
FP8 with a float32 scale per output row) replaces the weight and adds the method's parameters;
the slicing below stays the same (a per-row scale is sliced like the bias), every copy of
weight rows goes through the method (which may quantize a bf16 slice as it lands), and the
forward pass calls `method.apply`.

    column parallel:  W [out, in] split by rows    -> rank r computes out/N features of y
    row parallel:     W [out, in] split by columns -> rank r computes a partial y; all-reduce sums
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.distributed.parallel_state import tensor_model_parallel_all_reduce
from batchllm.layers.weight_loading import (FilledRows, check_shape, copy_into, divide, materialize,
                                            replicated_weight_loader, tp_rank_and_size)


class LinearBase(nn.Module):
    """y = x W^T + b over this rank's [output_size, input_size] weight (sizes already per rank)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int | None,
                 tp_size: int | None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
        else:
            self.register_parameter("bias", None)
        self.quant_method = None  # e.g. layers.quantization.fp8.Fp8LinearMethod

    def set_quant_method(self, method, from_existing: bool = False) -> None:
        """Hold the weight as `method` does: quantized from the weight held now (`from_existing`)
        or empty, for a checkpoint to fill through this layer's weight_loader."""
        self.quant_method = method
        method.create_weights(self, from_existing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is None:
            return F.linear(x, self.weight, bias)
        return self.quant_method.apply(self, x, bias)

    def _copy_rows(self, param: nn.Parameter, dst_start: int, src: torch.Tensor) -> None:
        """Copy a checkpoint slice into rows [dst_start, dst_start + len(src)) of `param`; rows of
        a quantized weight go through the layer's method."""
        if param is self.weight and self.quant_method is not None:
            self.quant_method.load_weight_rows(self, dst_start, materialize(src))
            return
        if getattr(src, "dtype", None) == torch.float8_e4m3fn and param.dtype != src.dtype:
            raise ValueError("holds float8 values, but its layer is not quantized (the checkpoint "
                             "has no weight_scale for it)")
        copy_into(param.data.narrow(0, dst_start, src.shape[0]), src)

    def part_rows(self, shard_id: object = None) -> int:
        """Rows of the whole checkpoint tensor of part `shard_id` (how far a per-tensor scale
        of that part reaches)."""
        return self.weight.shape[0]

    def checkpoint_tensor(self, param_name: str, tensor: torch.Tensor,
                          shard_id: object = None) -> torch.Tensor:
        """A checkpoint tensor as this layer's weight_loader takes it (a quantized layer's
        weight_scale: float32, one value per row of its part)."""
        if self.quant_method is None or param_name != "weight_scale":
            return tensor
        return self.quant_method.scale_tensor(self, materialize(tensor), self.part_rows(shard_id))


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__(input_size, output_size, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> FilledRows:
        if param.dim() == 1:
            return replicated_weight_loader(param, loaded, shard_id)
        if shard_id is not None:
            raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
        check_shape(loaded, tuple(param.shape))
        self._copy_rows(param, 0, loaded)
        return None


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows [r * out/N, (r + 1) * out/N) of W and b."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        _, size = tp_rank_and_size(tp_rank, tp_size)
        super().__init__(input_size, divide(output_size, size, "output size"), bias, tp_rank, tp_size)
        self.input_size, self.output_size = input_size, output_size

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, dst_start: int, src_start: int,
                   rows: int) -> FilledRows:
        """Copy rows [src_start, src_start + rows) of `loaded` to rows [dst_start, ...) of `param`."""
        self._copy_rows(param, dst_start, loaded.narrow(0, src_start, rows))
        return (dst_start, dst_start + rows)

    def part_rows(self, shard_id: object = None) -> int:
        return self.output_size

    def _full_shape(self, param: nn.Parameter, out_rows: int) -> tuple[int, ...]:
        return (out_rows, self.input_size) if param.dim() == 2 else (out_rows,)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> FilledRows:
        if shard_id is not None:
            raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
        check_shape(loaded, self._full_shape(param, self.output_size))
        rows = param.shape[0]
        self._load_rows(param, loaded, 0, self.tp_rank * rows, rows)
        return None


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one weight (gate and up: output_sizes
    [inter, inter]). Rank r's weight is [part 0 of rank r; part 1 of rank r; ...]; the checkpoint's
    tensor for part i is loaded with shard_id i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        _, size = tp_rank_and_size(tp_rank, tp_size)
        self.output_sizes = list(output_sizes)
        for part in self.output_sizes:
            divide(part, size, "output size")
        super().__init__(input_size, sum(self.output_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | None = None) -> FilledRows:
        if shard_id is None:  # a checkpoint that stores the parts already fused
            check_shape(loaded, self._full_shape(param, self.output_size))
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return None
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"part {shard_id!r} does not exist: this projection has parts "
                             f"0..{len(self.output_sizes) - 1}")
        check_shape(loaded, self._full_shape(param, self.output_sizes[shard_id]))
        rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return self._load_rows(param, loaded, offset, self.tp_rank * rows, rows)

    def part_rows(self, shard_id: object = None) -> int:
        return self.output_size if shard_id is None else self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one weight, split across ranks by attention head.

    Rank r holds num_heads / N query heads and num_kv_heads / N key/value heads, laid out
    [q | k | v]. With fewer KV heads than ranks each KV head is replicated on N / num_kv_heads
    consecutive ranks (rank r holds KV head r // (N / num_kv_heads)): the query heads a rank
    holds all read that one KV head. `num_heads`, `num_kv_heads`, `q_size` and `kv_size` are this
    rank's."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int | None = None, tp_size: int | None = None):
        _, size = tp_rank_and_size(tp_rank, tp_size)
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, size, "number of attention heads")
        if num_kv_heads >= size:
            self.num_kv_heads = divide(num_kv_heads, size, "number of key/value heads")
            self.kv_replicas = 1
        else:
            if size % num_kv_heads:
                raise ValueError(f"tensor parallel size {size} is not a multiple of the number of "
                                 f"key/value heads {num_kv_heads}; choose a size that it divides")
            self.num_kv_heads, self.kv_replicas = 1, size // num_kv_heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # split by head, not by an even cut of the rows (replicated KV heads make those differ)
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias, tp_rank, tp_size)
        self.input_size, self.output_size = hidden_size, (num_heads + 2 * num_kv_heads) * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | None = None) -> FilledRows:
        q_full = self.total_num_heads * self.head_dim
        kv_full = self.total_num_kv_heads * self.head_dim
        if shard_id is None:  # a checkpoint that stores q, k and v already fused
            check_shape(loaded, self._full_shape(param, q_full + 2 * kv_full))
            for part, sid in zip(loaded.split([q_full, kv_full, kv_full], dim=0), "qkv"):
                self.weight_loader(param, part, sid)
            return None
        if shard_id == "q":
            check_shape(loaded, self._full_shape(param, q_full))
            return self._load_rows(param, loaded, 0, self.tp_rank * self.q_size, self.q_size)
        if shard_id not in ("k", "v"):
            raise ValueError(f"part {shard_id!r} does not exist: the fused attention projection "
                             f"has parts 'q', 'k', 'v'")
        check_shape(loaded, self._full_shape(param, kv_full))
        offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
        kv_rank = self.tp_rank // self.kv_replicas
        return self._load_rows(param, loaded, offset, kv_rank * self.kv_size, self.kv_size)

    def part_rows(self, shard_id: object = None) -> int:
        if shard_id in ("k", "v"):
            return self.total_num_kv_heads * self.head_dim
        return self.total_num_heads * self.head_dim if shard_id == "q" else self.output_size


class RowParallelLinear(LinearBase):
    """Input features split across ranks: rank r holds columns [r * in/N, (r + 1) * in/N) of W,
    takes the matching slice of x (the output of a column-parallel layer) and computes a partial
    product; the bias is added on rank 0 only, and the partials are summed by an all-reduce over
    the process's tensor-parallel group (`reduce_results=False`: left to the caller)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None,
                 reduce_results: bool = True):
        _, size = tp_rank_and_size(tp_rank, tp_size)
        super().__init__(divide(input_size, size, "input size"), output_size, bias, tp_rank, tp_size)
        self.input_size, self.output_size = input_size, output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> FilledRows:
        if param.dim() == 1:  # the bias: whole on every rank, added once (rank 0)
            return replicated_weight_loader(param, loaded, shard_id)
        if shard_id is not None:
            raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
        check_shape(loaded, (self.output_size, self.input_size))
        cols = param.shape[1]
        self._copy_rows(param, 0, loaded.narrow(1, self.tp_rank * cols, cols))
        return None

    def part_rows(self, shard_id: object = None) -> int:
        return self.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        y = self._matmul(x, self.bias if self.tp_rank == 0 else None)
        return tensor_model_parallel_all_reduce(y) if self.reduce_results else y
