"""batchllm.layers.linear: plain linears at tensor parallel size 1, and the exact checkpoint slice each rank of N loads."""
from __future__ import annotations

import pytest
import torch

from batchllm.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                    ReplicatedLinear, RowParallelLinear)

IN, OUT = 12, 8
gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def load(layer, **parts: torch.Tensor) -> None:
    """Load `weight` / `bias` (or fused parts given as weight_<id> / bias_<id>) into `layer`."""
    for key, tensor in parts.items():
        name, _, shard = key.partition("_")
        shard_id = int(shard) if shard.isdigit() else (shard or None)
        layer.weight_loader(getattr(layer, name), tensor, shard_id)


@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear])
def test_single_rank_layers_are_plain_linears(cls):
    w, b, x = rand(OUT, IN), rand(OUT), rand(5, IN)
    layer = cls(IN, OUT, bias=True)
    load(layer, weight=w, bias=b)
    torch.testing.assert_close(layer(x), x @ w.T + b)
    assert layer.tp_rank == 0 and layer.tp_size == 1


def test_single_rank_merged_and_qkv_are_the_stacked_products():
    x = rand(5, IN)
    gate, up = rand(OUT, IN), rand(OUT, IN)
    merged = MergedColumnParallelLinear(IN, [OUT, OUT])
    load(merged, weight_0=gate, weight_1=up)
    torch.testing.assert_close(merged(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))

    q, k, v, bq, bk, bv = rand(4 * 3, IN), rand(2 * 3, IN), rand(2 * 3, IN), rand(12), rand(6), rand(6)
    qkv = QKVParallelLinear(IN, head_dim=3, num_heads=4, num_kv_heads=2, bias=True)
    rows = [qkv.weight_loader(qkv.weight, t, s) for t, s in ((q, "q"), (k, "k"), (v, "v"))]
    assert rows == [(0, 12), (12, 18), (18, 24)]  # what check_all_loaded reads
    load(qkv, bias_q=bq, bias_k=bk, bias_v=bv)
    expected = torch.cat([x @ q.T + bq, x @ k.T + bk, x @ v.T + bv], dim=-1)
    torch.testing.assert_close(qkv(x), expected)

    # a checkpoint that stores q, k and v already fused loads the same
    fused = QKVParallelLinear(IN, head_dim=3, num_heads=4, num_kv_heads=2)
    assert fused.weight_loader(fused.weight, torch.cat([q, k, v])) is None
    torch.testing.assert_close(fused.weight, qkv.weight)


def test_column_parallel_shards_concatenate_to_the_full_weight():
    w, b, x = rand(OUT, IN), rand(OUT), rand(5, IN)
    shards = []
    for r in range(4):
        layer = ColumnParallelLinear(IN, OUT, bias=True, tp_rank=r, tp_size=4)
        load(layer, weight=w, bias=b)
        assert layer.weight.shape == (OUT // 4, IN)
        shards.append(layer)
    assert torch.equal(torch.cat([s.weight for s in shards]), w)
    assert torch.equal(torch.cat([s.bias for s in shards]), b)
    torch.testing.assert_close(torch.cat([s(x) for s in shards], dim=-1), x @ w.T + b)


def test_merged_column_parallel_rank_holds_its_slice_of_each_part():
    gate, up = rand(OUT, IN), rand(OUT, IN)
    for r in range(2):
        layer = MergedColumnParallelLinear(IN, [OUT, OUT], tp_rank=r, tp_size=2)
        rows = [layer.weight_loader(layer.weight, t, i) for i, t in enumerate((gate, up))]
        assert rows == [(0, 4), (4, 8)]
        half = slice(4 * r, 4 * r + 4)
        assert torch.equal(layer.weight, torch.cat([gate[half], up[half]]))


def test_row_parallel_partial_products_sum_to_the_full_product():
    w, b, x = rand(OUT, IN), rand(OUT), rand(5, IN)
    partials = []
    for r in range(3):
        layer = RowParallelLinear(IN, OUT, bias=True, tp_rank=r, tp_size=3, reduce_results=False)
        load(layer, weight=w, bias=b)
        assert torch.equal(layer.weight, w[:, 4 * r:4 * r + 4])
        partials.append(layer(x[:, 4 * r:4 * r + 4]))
    torch.testing.assert_close(sum(partials), x @ w.T + b)  # the bias is added once


def test_qkv_with_fewer_kv_heads_than_ranks_replicates_them():
    head_dim, heads, kv_heads = 2, 8, 2
    q, k, v = rand(heads * head_dim, IN), rand(kv_heads * head_dim, IN), rand(kv_heads * head_dim, IN)

    def head(t: torch.Tensor, i: int) -> torch.Tensor:
        return t[i * head_dim:(i + 1) * head_dim]

    for r in range(4):
        layer = QKVParallelLinear(IN, head_dim, heads, kv_heads, tp_rank=r, tp_size=4)
        load(layer, weight_q=q, weight_k=k, weight_v=v)
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        my_q = [2 * r, 2 * r + 1]
        kv = my_q[0] // (heads // kv_heads)  # the KV head these query heads read (GQA groups of 4)
        assert kv == r // 2
        expected = torch.cat([head(q, my_q[0]), head(q, my_q[1]), head(k, kv), head(v, kv)])
        assert torch.equal(layer.weight, expected)


def test_qkv_splits_kv_heads_when_there_are_enough():
    q, k, v = rand(8, IN), rand(4, IN), rand(4, IN)  # 4 heads, 2 KV heads of size 2
    layers = [QKVParallelLinear(IN, 2, 4, 2, tp_rank=r, tp_size=2) for r in range(2)]
    for layer in layers:
        load(layer, weight_q=q, weight_k=k, weight_v=v)
    assert torch.equal(torch.cat([l.weight[:4] for l in layers]), q)
    assert torch.equal(torch.cat([l.weight[4:6] for l in layers]), k)
    assert torch.equal(torch.cat([l.weight[6:] for l in layers]), v)


def test_head_counts_the_size_does_not_divide_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"attention heads 9 .* size 2"):
        QKVParallelLinear(IN, 4, 9, 3, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match=r"size 4 .* key/value heads 3"):
        QKVParallelLinear(IN, 4, 12, 3, tp_rank=0, tp_size=4)
    with pytest.raises(ValueError, match=r"input size 12 .* size 5"):
        RowParallelLinear(IN, OUT, tp_rank=0, tp_size=5)


def test_a_checkpoint_tensor_of_the_wrong_shape_or_part_is_refused():
    layer = ColumnParallelLinear(IN, OUT, tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"has shape \(4, 12\), expected \(8, 12\)"):
        layer.weight_loader(layer.weight, rand(4, IN))  # already a shard: not what a checkpoint holds
    merged = MergedColumnParallelLinear(IN, [OUT, OUT])
    with pytest.raises(ValueError, match="part 2 does not exist"):
        merged.weight_loader(merged.weight, rand(OUT, IN), 2)
    qkv = QKVParallelLinear(IN, 2, 4, 2)
    with pytest.raises(ValueError, match=r"has shape \(8, 12\), expected \(4, 12\)"):
        qkv.weight_loader(qkv.weight, rand(8, IN), "k")  # k: 2 heads of 2 rows
    with pytest.raises(ValueError, match="parts 'q', 'k', 'v'"):
        qkv.weight_loader(qkv.weight, rand(4, IN), "x")
