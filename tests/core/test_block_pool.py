from batchllm.core.block_pool import BlockPool, FreeBlockQueue, KVBlock


def test_free_queue_is_fifo_and_removes_from_the_middle():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert q.block_ids() == [0, 1, 3, 4] and q.num_free == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 2, 0]


def test_freed_block_keeps_its_hash_until_reused():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_block(a, 111)
    pool.free_blocks([a, b])
    assert pool.num_free_blocks == 3 and pool.get_cached_block(111) is a
    # a cache hit takes the free block back out of the middle of the queue
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.free_queue.block_ids() == [2, 1]
    pool.free_blocks([a])
    # new blocks come from the head: 2, 1, then a (whose hash is then forgotten)
    assert [x.block_id for x in pool.get_new_blocks(3)] == [2, 1, 0]
    assert pool.get_cached_block(111) is None and a.block_hash is None


def test_shared_blocks_are_freed_only_by_the_last_holder():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.touch([a])
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free_blocks([a])
    assert pool.num_free_blocks == 2


def test_first_block_registered_under_a_hash_wins():
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_block(a, 7)
    pool.cache_full_block(b, 7)
    assert pool.get_cached_block(7) is a and b.block_hash is None
    assert BlockPool(2, enable_caching=False).get_cached_block(7) is None
