"""Token embedding and LM head split by vocabulary across tensor-parallel ranks (whole on one rank).

Rank r of N holds the contiguous rows [r * S, r * S + S) of the [vocab, hidden] matrix, S =
ceil(vocab / N); rows past the vocabulary (the last rank's padding) are zeros. The embedding
looks up the ids inside its slice, gives zeros for the others and sums over ranks; the LM head
computes its slice of the logits and gathers them in rank order. With N = 1 they are a plain
embedding lookup and a plain linear over the (possibly tied) weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.distributed.parallel_state import (tensor_model_parallel_all_gather,
                                                 tensor_model_parallel_all_reduce)
from batchllm.layers.weight_loading import FilledRows, check_shape, copy_into, tp_rank_and_size


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> embeddings [T, embedding_dim], this rank holding one slice of the vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int | None = None,
                 tp_size: int | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.shard_size = -(-num_embeddings // self.tp_size)
        self.vocab_start = min(self.tp_rank * self.shard_size, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> FilledRows:
        if shard_id is not None:
            raise ValueError(f"is a whole tensor, but was given as part {shard_id!r} of a fused one")
        check_shape(loaded, (self.num_embeddings, self.embedding_dim))
        rows = self.vocab_end - self.vocab_start
        copy_into(param.data[:rows], loaded[self.vocab_start:self.vocab_end])
        param.data[rows:].zero_()
        return None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_slice = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_slice, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight).masked_fill_(~in_slice.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [T, embedding_dim] -> logits [T, num_embeddings] in the weight's dtype.

    `tied=True` builds it without a weight of its own; `tie_to(embedding)` then shares the
    embedding's (call it after the model is materialized: `to_empty` replaces parameters)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tied: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        if tied:
            self.weight = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Use `embedding`'s weight as this head's (same vocabulary slice on this rank)."""
        assert (embedding.vocab_start, embedding.shard_size, embedding.embedding_dim) == (
            self.vocab_start, self.shard_size, self.embedding_dim), "tied layers split differently"
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every row of `hidden`; `out` ([T, num_embeddings]): write them there."""
        if self.tp_size == 1:
            if out is None:
                return F.linear(hidden, self.weight)
            return torch.mm(hidden, self.weight.t(), out=out)
        logits = tensor_model_parallel_all_gather(F.linear(hidden, self.weight), dim=-1)
        logits = logits[..., :self.num_embeddings]
        return logits if out is None else out.copy_(logits)
