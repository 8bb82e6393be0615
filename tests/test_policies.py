"""Eviction policies: ordering rules, and look-ahead protection on a real byte-budgeted store."""

from __future__ import annotations

import torch

from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.policies import (
    CostAwarePolicy,
    LookAheadLRUPolicy,
    LRUPolicy,
    make_policy,
)
from daser_rag.kv.store import KVStore


def _kv(key: str, tokens: int = 8) -> ChunkKV:
    g = torch.Generator().manual_seed(hash(key) % 1000)
    return ChunkKV(key=key, token_ids=torch.arange(tokens), start_pos=4,
                   keys=torch.randn(2, 1, tokens, 4, generator=g), values=torch.randn(2, 1, tokens, 4, generator=g))


ENTRY = 2 * 2 * 1 * 8 * 4 * 4  # bytes of one fp32 entry above (k + v)


def test_lru_order():
    p = LRUPolicy()
    for k in "abc":
        p.on_insert(k, 1)
    p.on_access("a")
    assert list(p.victims()) == ["b", "c", "a"]
    p.on_remove("c")
    assert list(p.victims()) == ["b", "a"]


def test_lookahead_orders_queued_last_furthest_first():
    queue = {"a": 0, "b": 3}
    p = LookAheadLRUPolicy(lambda: queue)
    for k in "abcd":
        p.on_insert(k, 1)
    assert list(p.victims()) == ["c", "d", "b", "a"]  # unneeded in LRU order, then b (needed later) before a


def test_protected_entries_never_evicted_while_queued(tmp_path):
    queue: dict[str, int] = {}
    store = KVStore(tmp_path, codec="fp32", host_bytes=4 * ENTRY, policy=LookAheadLRUPolicy(lambda: queue))
    for k in ("q1", "q2"):
        store.put(_kv(k))
    store.protect(["q1", "q2"])  # what the scheduler does for a queued request
    queue.update({"q1": 0, "q2": 1})
    for i in range(40):  # churn far beyond capacity, touching nothing protected
        store.put(_kv(f"x{i}"))
        assert store.in_host("q1") and store.in_host("q2"), f"protected entry evicted at put {i}"
    assert store.host.nbytes() <= store.host.capacity_bytes
    assert store.host.evictions >= 35
    store.unprotect(["q1", "q2"])
    queue.clear()
    for i in range(40, 45):
        store.put(_kv(f"x{i}"))
    assert not store.in_host("q1") and not store.in_host("q2")  # once released, ordinary LRU again
    assert store.get("q1") is not None  # still on disk: eviction never loses data


def test_all_protected_skips_caching_but_keeps_data(tmp_path):
    store = KVStore(tmp_path, codec="fp32", host_bytes=2 * ENTRY, policy=LookAheadLRUPolicy())
    store.put(_kv("a"))
    store.put(_kv("b"))
    store.protect(["a", "b"])
    store.put(_kv("c"))
    assert store.in_host("a") and store.in_host("b") and not store.in_host("c")
    assert store.get("c") is not None  # served from disk


def test_cost_aware_keeps_frequent_and_costly():
    p = CostAwarePolicy()
    p.on_insert("hot", 100)
    p.on_insert("cold", 100)
    for _ in range(5):
        p.on_access("hot")
    assert list(p.victims())[0] == "cold"
    p.on_insert("big_cheap", 1000)  # same cost per byte by default, once seen
    p.set_cost("big_cheap", 1e-9)
    p.set_cost("cold", 10.0)  # measured: expensive to get back
    order = list(p.victims())
    assert order[0] == "big_cheap" and order.index("cold") > order.index("big_cheap")


def test_cost_aware_clock_ages_old_popularity(tmp_path):
    store = KVStore(tmp_path, codec="fp32", host_bytes=3 * ENTRY, policy=CostAwarePolicy())
    store.put(_kv("old"))
    for _ in range(3):
        store.get("old")
    clock0 = store.host.policy.clock
    for i in range(30):
        store.put(_kv(f"n{i}"))
        store.get(f"n{i}")
    assert store.host.policy.clock > clock0  # evictions raised the floor
    assert not store.in_host("old")  # past popularity does not pin an entry forever


def test_make_policy_rejects_unknown():
    import pytest

    assert isinstance(make_policy("lookahead-lru"), LookAheadLRUPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo")
