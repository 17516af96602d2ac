"""batchllm.layers.embedding: plain embedding and LM head at size 1; each rank's vocabulary slice at size N."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from batchllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding

VOCAB, DIM = 10, 6
gen = torch.Generator().manual_seed(0)
TABLE = torch.randn(VOCAB, DIM, generator=gen)
IDS = torch.tensor([0, 3, 9, 4, 7, 9, 1])
HIDDEN = torch.randn(4, DIM, generator=gen)


def test_single_rank_embedding_and_head_are_a_lookup_and_a_linear():
    emb = VocabParallelEmbedding(VOCAB, DIM)
    emb.weight_loader(emb.weight, TABLE)
    assert torch.equal(emb(IDS), F.embedding(IDS, TABLE))
    head = ParallelLMHead(VOCAB, DIM)
    head.weight_loader(head.weight, TABLE)
    torch.testing.assert_close(head(HIDDEN), HIDDEN @ TABLE.T)
    out = torch.empty(4, VOCAB)
    with torch.inference_mode():  # as the engine runs it
        assert head(HIDDEN, out=out) is out  # the CUDA-graph path writes into its buffer
    torch.testing.assert_close(out, HIDDEN @ TABLE.T)


def test_a_tied_head_shares_the_embedding_weight():
    emb = VocabParallelEmbedding(VOCAB, DIM)
    emb.weight_loader(emb.weight, TABLE)
    head = ParallelLMHead(VOCAB, DIM, tied=True)
    assert head.weight is None and not list(head.parameters())
    head.tie_to(emb)
    assert head.weight is emb.weight
    torch.testing.assert_close(head(HIDDEN), HIDDEN @ TABLE.T)


def test_each_rank_holds_a_contiguous_vocab_slice_and_the_last_is_zero_padded():
    # 10 rows over 3 ranks: 4, 4, 2 (+ 2 zero rows)
    ranks = [VocabParallelEmbedding(VOCAB, DIM, tp_rank=r, tp_size=3) for r in range(3)]
    for emb in ranks:
        emb.weight_loader(emb.weight, TABLE)
        assert emb.weight.shape == (4, DIM)
    assert torch.equal(torch.cat([e.weight for e in ranks])[:VOCAB], TABLE)
    assert torch.equal(ranks[2].weight[2:], torch.zeros(2, DIM))
    # an id outside a rank's slice gives zeros there, so the sum over ranks (the all-reduce; the
    # identity in this single process) is the full lookup
    partials = [emb(IDS) for emb in ranks]
    assert torch.equal(partials[0][2], torch.zeros(DIM))  # id 9 lives on rank 2
    torch.testing.assert_close(sum(partials), F.embedding(IDS, TABLE))


def test_lm_head_slices_concatenate_to_the_full_logits():
    heads = [ParallelLMHead(VOCAB, DIM, tp_rank=r, tp_size=3) for r in range(3)]
    for head in heads:
        head.weight_loader(head.weight, TABLE)
    # the all-gather (the identity in this single process) concatenates the ranks' logits
    logits = torch.cat([head(HIDDEN) for head in heads], dim=-1)[:, :VOCAB]
    torch.testing.assert_close(logits, HIDDEN @ TABLE.T)
