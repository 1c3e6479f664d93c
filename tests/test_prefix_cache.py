"""The engine's prefix cache and batch layout: LRU within a token budget, block-aligned heads,
shared runs and batch order (seecl.serving.prefix_cache), on hand-made KV."""

import torch

from seecl.serving.prefix_cache import PrefixCache


def _kv(length: int, value: float = 0.0):
    """One layer's (k, v) for `length` positions, position i holding value + i."""
    k = (value + torch.arange(length, dtype=torch.float32)).view(1, 1, length, 1)
    return [(k, k.clone())]


def test_prefix_cache_evicts_least_recently_used_within_budget():
    cache = PrefixCache(max_tokens=10, block=2)
    cache.store("a", [1, 2, 3, 4], _kv(4))
    cache.store("a", [5, 6, 7, 8], _kv(4))
    assert cache.lookup("a", [1, 2, 3, 4, 9])[0] == 4  # touch the first: the second is now oldest
    cache.store("b", [1, 2, 3, 4], _kv(4))
    assert cache.tokens <= 10
    assert cache.lookup("a", [5, 6, 7, 8])[0] == 0
    assert cache.lookup("a", [1, 2, 3, 4])[0] == 4
    assert cache.lookup("b", [1, 9])[0] == 0  # owners never share entries
    cache.store("c", list(range(20)), _kv(20))  # larger than the whole budget: not kept
    assert cache.lookup("c", list(range(20)))[0] == 0


def test_prefix_cache_serves_every_block_aligned_head_of_an_entry():
    cache = PrefixCache(max_tokens=100, block=2)
    cache.store("a", [1, 2, 3, 4, 5, 6, 7], _kv(7))  # kept as its aligned part [1..6]
    assert cache.tokens == 6
    length, layers = cache.lookup("a", [1, 2, 3, 9, 9])  # shares one block and a half
    assert length == 2
    assert layers[0][0].flatten().tolist() == [0.0, 1.0]
    assert cache.lookup("a", [1, 2, 3, 4, 5, 6, 8])[0] == 6
    assert cache.lookup("a", [2, 1])[0] == 0


def test_prefix_cache_heads_stay_reachable_after_their_entry_is_evicted():
    cache = PrefixCache(max_tokens=8, block=2)
    cache.store("a", [1, 2, 3, 4], _kv(4, 10.0))
    cache.store("a", [1, 2, 5, 6], _kv(4, 20.0))
    cache.store("a", [7, 8, 9, 10], _kv(4))  # evicts [1, 2, 3, 4], whose head [1, 2] lives on
    length, layers = cache.lookup("a", [1, 2, 3, 4])  # served by [1, 2, 5, 6], now the newest
    assert length == 2 and layers[0][0].flatten().tolist() == [20.0, 21.0]
    cache.store("a", [11, 12], _kv(2))  # evicts [7, 8, 9, 10]
    cache.store("a", [13, 14, 15, 16], _kv(4))  # evicts [1, 2, 5, 6]: nothing starts with [1, 2] any more
    assert cache.lookup("a", [1, 2, 5, 6])[0] == 0
    assert set(cache.heads.values()) <= set(cache.entries)


def test_shared_runs_split_a_batch_where_its_rows_stop_sharing_more_than_all():
    from seecl.serving.prefix_cache import shared_runs

    prompts = [[1, 2, 3, 4, 9], [1, 2, 3, 4, 8], [1, 2, 5, 6, 7], [1, 2, 5, 6, 0], [1, 2, 7]]
    assert shared_runs(prompts, 2) == [[0, 1], [2, 3], [4]]
    assert shared_runs(prompts[:2], 2) == [[0, 1]]
    assert shared_runs([[1, 2, 3], [4, 5, 6], [7]], 2) == [[0, 1, 2]]  # nothing shared: one pass
    assert shared_runs([[9], [8]] + prompts[:2] + [[7]], 2) == [[0, 1], [2, 3], [4]]


def test_batch_order_keeps_shared_prefixes_together_and_sorts_by_length():
    from seecl.serving.prefix_cache import batch_order

    shared_a, shared_b = list(range(100, 140)), list(range(200, 240))
    prompts = [
        shared_a + [1] * 9,
        [7, 3],
        shared_b + [2] * 3,
        shared_a + [5] * 2,
        [9] * 5,
        shared_b + [1] * 7,
        shared_a + [3] * 4,
        [8],
    ]
    order = batch_order(prompts, block=32)
    assert sorted(order) == list(range(len(prompts))), "a permutation"
    assert order == [3, 6, 0, 2, 5, 7, 1, 4], "groups by shared block, then loners; shortest first in each"
    assert batch_order(prompts, block=32) == order, "deterministic"
    header = list(range(300, 340))  # a system prompt every prompt starts with: groups form behind it
    assert batch_order([header + p for p in prompts], block=32) == order
    assert batch_order([header + p for p in prompts], block=8) == order
