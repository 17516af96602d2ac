from batchllm.core.kv_cache_manager import KVCacheManager
from tests.core.driver import req


def computed(kv: KVCacheManager, r, n: int) -> None:
    """Pretend the runner computed the request's first n tokens."""
    r.num_computed_tokens = n
    kv.cache_computed_blocks(r, n)


def test_prefix_hit_exact_blocks_and_eviction_order():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = req("a", list(range(10)))
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 10) == []
    assert kv.block_ids("a") == [0, 1, 2]
    computed(kv, a, 10)
    kv.free(a)
    # freed tail first: the partial block 2 is evicted before the prefix blocks 1, 0
    assert kv.pool.free_queue.block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]

    b = req("b", list(range(8)) + [99, 98, 97])  # shares 2 full blocks with a
    hits, n = kv.get_computed_blocks(b)
    assert [x.block_id for x in hits] == [0, 1] and n == 8
    b.num_computed_tokens = 0
    assert kv.allocate_slots(b, 3, hits) == []
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 3)] == [1, 1, 1]

    c = req("c", list(range(8)))  # whole prompt cached, but its last token is always computed
    hits, n = kv.get_computed_blocks(c)
    assert [x.block_id for x in hits] == [0] and n == 4
    assert kv.allocate_slots(c, 4, hits) == []
    assert kv.block_ids("c") == [0, 4] and kv.pool.blocks[0].ref_cnt == 2

    d = req("d", [5] * 6)  # a miss: reuses free blocks in LRU order, evicting hashes
    assert kv.get_computed_blocks(d) == ([], 0)
    assert kv.allocate_slots(d, 6) == []
    assert kv.block_ids("d") == [5, 6]


def test_extra_keys_separate_prefixes():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = req("a", list(range(9)), extra_keys=("lora-1",))
    kv.allocate_slots(a, 9)
    computed(kv, a, 9)
    assert kv.get_computed_blocks(req("b", list(range(9)), extra_keys=("lora-2",)))[1] == 0
    assert kv.get_computed_blocks(req("c", list(range(9)), extra_keys=("lora-1",)))[1] == 8


def test_no_room_returns_none_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_caching=False)
    a = req("a", list(range(8)))
    assert kv.allocate_slots(a, 8) == []
    b = req("b", list(range(9)))
    assert kv.allocate_slots(b, 9) is None
    assert kv.num_free_blocks == 1 and kv.block_ids("b") == []
    assert kv.allocate_slots(b, 4) == []


def test_fork_shares_blocks_and_copy_on_write_of_partial_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    prompt = list(range(7))
    leader, sib = req("l", prompt), req("s", prompt)
    kv.allocate_slots(leader, 6)
    computed(kv, leader, 6)
    kv.fork(leader, sib, 6)
    assert kv.block_ids("s") == kv.block_ids("l") == [0, 1]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    sib.num_computed_tokens = 6
    # the sibling writes position 6 into shared partial block 1: it gets its own copy
    assert kv.allocate_slots(sib, 1) == [(1, 2)]
    assert kv.block_ids("s") == [0, 2] and kv.pool.blocks[1].ref_cnt == 1
    # the leader is now the only holder of block 1 and writes in place
    assert kv.allocate_slots(leader, 1) == []
    assert kv.block_ids("l") == [0, 1]
    kv.free(sib)
    kv.free(leader)
    assert kv.num_free_blocks == 8 and all(b.ref_cnt == 0 for b in kv.pool.blocks)
