"""FusedMoE: every expert's gate/up and down weights stacked in two parameters, split for tensor parallelism by intermediate features.

The router (which experts a token goes to, with what weights) belongs to the model; this layer
takes its decision and runs the experts through the kernel set's `fused_moe`:

    gate_up_proj  [E, 2 * I/N, H]   expert e's rows: [gate features of rank r | up features of rank r]
    down_proj     [E, H, I/N]       expert e's columns: the same I/N features of rank r

Rank r of N holds features [r * I/N, (r + 1) * I/N) of every expert (like a merged column-parallel
gate/up followed by a row-parallel down), so each rank computes a partial output for every token
and one all-reduce sums them; with N = 1 there is no collective. A checkpoint stores each expert's
projections as separate tensors (Mixtral w1/w3/w2, Qwen3-MoE gate_proj/up_proj/down_proj); the
weight_loader places one of them, given as part (expert, which) of a stacked parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from batchllm.distributed.parallel_state import tensor_model_parallel_all_reduce
from batchllm.kernels import KernelSet
from batchllm.layers.weight_loading import FilledRows, check_shape, copy_into, divide, tp_rank_and_size

GATE, UP = 0, 1  # the parts of gate_up_proj; down_proj has one part per expert (None)
# checkpoint projection -> (our stacked parameter, part), per family's names of (gate, up, down)
ExpertParts = dict[str, tuple[str, int | None]]


def expert_parts(gate: str, up: str, down: str) -> ExpertParts:
    """How a family's per-expert checkpoint projections map onto FusedMoE's parameters."""
    return {gate: ("gate_up_proj", GATE), up: ("gate_up_proj", UP), down: ("down_proj", None)}


class FusedMoE(nn.Module):
    """out[t] = sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), every expert a
    gated SiLU MLP; `kernels` is swapped by the model's `use_kernels` (torch reference or Triton)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 kernels: KernelSet, tp_rank: int | None = None, tp_size: int | None = None,
                 reduce_results: bool = True):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.inter_per_rank = divide(intermediate_size, self.tp_size, "expert intermediate size")
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.inter_per_rank, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter_per_rank))
        self.reduce_results = reduce_results
        self.kernels = kernels

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, K] float32, topk_ids [T, K] -> [T, H] (summed over ranks)."""
        out = self.kernels.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        if self.tp_size > 1 and self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: tuple[int, int | None] | None = None) -> FilledRows:
        """Place one expert's checkpoint tensor (shard_id (expert, GATE | UP) for gate_up_proj,
        (expert, None) for down_proj), or with shard_id None the whole stacked tensor ([E, 2I, H]
        with each expert's gate rows first, or [E, H, I]). Returns the experts filled (rows of
        dim 0), None when all."""
        is_gate_up = param is self.gate_up_proj
        rows, start = self.inter_per_rank, self.tp_rank * self.inter_per_rank
        if shard_id is None:  # narrow only (a lazily read checkpoint slice supports no indexing)
            inter = self.intermediate_size
            if is_gate_up:
                check_shape(loaded, (self.num_experts, 2 * inter, self.hidden_size))
                copy_into(param.data[:, :rows], loaded.narrow(1, start, rows))
                copy_into(param.data[:, rows:], loaded.narrow(1, inter + start, rows))
            else:
                check_shape(loaded, (self.num_experts, self.hidden_size, inter))
                copy_into(param.data, loaded.narrow(2, start, rows))
            return None
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"is for expert {expert}, but this layer has experts "
                             f"0..{self.num_experts - 1} (the expert count of config.json)")
        if is_gate_up:
            if part not in (GATE, UP):
                raise ValueError(f"part {part!r} does not exist: gate_up_proj has parts {GATE} (gate) "
                                 f"and {UP} (up)")
            check_shape(loaded, (self.intermediate_size, self.hidden_size))
            copy_into(param.data[expert].narrow(0, part * rows, rows), loaded.narrow(0, start, rows))
        else:
            if part is not None:
                raise ValueError(f"part {part!r} does not exist: down_proj is one tensor per expert")
            check_shape(loaded, (self.hidden_size, self.intermediate_size))
            copy_into(param.data[expert], loaded.narrow(1, start, rows))
        return (expert, expert + 1)
