"""The prefix cache's radix tree on its own: what a lookup finds, where edges split, LRU by bytes, and the
metrics it reports; and where a prefill stops to keep states."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine.prefix_cache import NODE_BYTES, TOKEN_BYTES, CacheMetrics, PrefixCache, prefill_stops
from server.metrics import Metrics

STATE_BYTES = 2 * 4 * 4  # two tensors of [1, 4] float32


def state(value: float):
    return (np.full((1, 4), value, dtype=np.float32), np.full((1, 4), -value, dtype=np.float32))


def measured(capacity: int, stride: int = 64):
    registry = CollectorRegistry()
    m = Metrics(registry).for_model("m")
    cache = PrefixCache(capacity, stride, CacheMetrics(m.prefix_cache_hit_tokens_total, m.prefix_cache_hits,
                                                       m.prefix_cache_misses, m.prefix_cache_bytes,
                                                       m.prefix_cache_evictions_total))

    def value(name: str, **labels) -> float:
        return registry.get_sample_value(name, {"model": "m", **labels}) or 0.0

    return cache, value


def test_a_lookup_finds_the_deepest_state_it_may_use():
    cache, value = measured(1 << 20)
    cache.insert((1, 5, 6), state(3))
    cache.insert((1, 5, 6, 7, 8), state(5))
    hit = cache.lookup((1, 5, 6, 7, 8, 9), max_depth=5)
    assert (hit.depth, hit.shared) == (5, 5) and hit.state[0][0, 0] == 5
    # A prompt equal to a cached path, that must feed its last token: the state before it.
    hit = cache.lookup((1, 5, 6, 7, 8), max_depth=4)
    assert hit.depth == 3 and hit.state[0][0, 0] == 3 and hit.shared == 5
    # Parting inside an edge: `shared` says how far the prompt ran along the tree.
    hit = cache.lookup((1, 5, 6, 7, 2, 2), max_depth=5)
    assert (hit.depth, hit.shared) == (3, 4)
    miss = cache.lookup((2, 5), max_depth=2)
    assert (miss.depth, miss.state, miss.shared) == (0, None, 0)
    assert value("seqserve_prefix_cache_lookups_total", result="hit") == 3
    assert value("seqserve_prefix_cache_lookups_total", result="miss") == 1
    assert value("seqserve_prefix_cache_hit_tokens_total") == 5 + 3 + 3


def test_edges_split_where_paths_part_and_merge_back_when_states_leave():
    cache, value = measured(1 << 20)
    cache.insert((1, 2, 3, 4), state(1))
    alone = cache.bytes
    assert alone == NODE_BYTES + 4 * TOKEN_BYTES + STATE_BYTES
    cache.insert((1, 2, 9), state(2))  # splits (1, 2, 3, 4) at (1, 2): a middle node without a state
    assert cache.bytes == alone + 2 * NODE_BYTES + 1 * TOKEN_BYTES + STATE_BYTES
    cache.insert((1, 2), state(3))  # the middle node gets a state
    assert cache.lookup((1, 2, 7), max_depth=3).depth == 2
    assert cache.states == 3 and value("seqserve_prefix_cache_bytes") == cache.bytes
    cache.clear()
    assert cache.bytes == 0 and cache.states == 0 and value("seqserve_prefix_cache_bytes") == 0
    assert cache.lookup((1, 2, 3, 4), max_depth=4).state is None


def test_the_least_recently_used_states_leave_first_within_the_bytes():
    one = NODE_BYTES + 2 * TOKEN_BYTES + STATE_BYTES  # a state on its own two-token branch
    cache, value = measured(3 * one)
    for first in (10, 11, 12):
        cache.insert((first, 1), state(first))
    assert cache.bytes == 3 * one
    cache.lookup((10, 1, 5), max_depth=2)  # 10 is now the most recently used; 11 the least
    cache.insert((13, 1), state(13))
    assert cache.lookup((11, 1), max_depth=2).state is None
    assert all(cache.lookup((k, 1), max_depth=2).state is not None for k in (10, 12, 13))
    assert cache.bytes <= 3 * one and value("seqserve_prefix_cache_evictions_total") == 1
    # A state bigger than the whole cache is not kept, and leaves nothing behind.
    small, _ = measured(10)
    small.insert((1, 2), state(1))
    assert small.states == 0 and small.bytes == 0


def test_evicting_an_inner_state_keeps_the_paths_below_it():
    cache, _ = measured(1 << 20)
    cache.insert((1, 2), state(2))
    cache.insert((1, 2, 3, 4), state(4))
    cache.insert((1, 2, 5), state(5))
    cache.lookup((1, 2, 3, 4, 0), max_depth=4)
    cache.lookup((1, 2, 5, 0), max_depth=3)
    cache._shrink_to(cache.bytes - 1)  # one state leaves: the least recently used, (1, 2)
    assert cache.lookup((1, 2, 9), max_depth=2).state is None
    assert cache.lookup((1, 2, 3, 4), max_depth=4).depth == 4 and cache.lookup((1, 2, 5), max_depth=3).depth == 3
    cache._shrink_to(0)
    assert cache.bytes == 0 and not cache._root.children


def test_an_existing_state_is_kept_not_replaced():
    cache, _ = measured(1 << 20)
    cache.insert((1, 2), state(1))
    before = cache.bytes
    cache.insert((1, 2), state(9))
    assert cache.bytes == before and cache.lookup((1, 2), max_depth=2).state[0][0, 0] == 1


def test_inserted_states_are_copies():
    cache, _ = measured(1 << 20)
    mine = state(1)
    cache.insert([1, 2], mine)  # a list is taken as its tuple
    mine[0][:] = 7
    assert cache.lookup([1, 2, 3], max_depth=2).state[0][0, 0] == 1


@pytest.mark.parametrize(("length", "start", "extra", "stops"), [
    (10, 0, (), [10]),
    (200, 0, (), [64, 128, 192, 200]),
    (200, 70, (199, 150), [128, 150, 192, 199, 200]),
    (128, 64, (127, 64, 3), [127, 128]),  # the extra depths outside (start, length) are dropped
    (5, 5, (), []),  # already at the end: nothing to feed
])
def test_prefill_stops(length, start, extra, stops):
    assert prefill_stops(length, start, 64, extra) == stops


def test_settings_are_checked():
    with pytest.raises(ValueError, match="capacity_bytes >= 0 and stride >= 1"):
        PrefixCache(-1)
    with pytest.raises(ValueError):
        PrefixCache(10, stride=0)
    assert not PrefixCache(0).enabled
