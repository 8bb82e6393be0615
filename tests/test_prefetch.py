"""Queue-driven prefetch: a queued request's KV reaches RAM before it runs."""

from __future__ import annotations

import time

import pytest
import torch

from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.prefetch import Prefetcher
from daser_rag.kv.store import KVStore
from daser_rag.types import ChunkRef


def _kv(key: str, tokens: int = 16) -> ChunkKV:
    return ChunkKV(key=key, token_ids=torch.arange(tokens), start_pos=4,
                   keys=torch.randn(4, 2, tokens, 8), values=torch.randn(4, 2, tokens, 8))


def _wait_idle(pf: Prefetcher, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pf.idle():
        assert time.monotonic() < end, "prefetcher never went idle"
        time.sleep(0.01)


def test_loads_queued_keys_from_disk_within_window(tmp_path):
    store = KVStore(tmp_path, codec="bf16")
    keys = [f"k{i}" for i in range(6)]
    for k in keys:
        store.put(_kv(k))
    store.host.clear()  # everything on disk only
    with Prefetcher(store, window=2) as pf:
        pf.enqueue("r1", keys[:2])
        pf.enqueue("r2", keys[2:4])
        pf.enqueue("r3", keys[4:] + ["absent"])  # third in queue: outside the window
        _wait_idle(pf)
        assert all(store.in_host(k) for k in keys[:4])
        assert not any(store.in_host(k) for k in keys[4:])
        pf.claim("r1", keys[:2])  # r1 starts: r3 moves into the window
        _wait_idle(pf)
        assert all(store.in_host(k) for k in keys[4:])
        assert pf.stats.loaded == 6 and pf.stats.missing == 1


def test_claim_drops_loads_not_started(tmp_path):
    store = KVStore(tmp_path, codec="bf16")
    store.put(_kv("a"))
    store.host.clear()
    pf = Prefetcher(store, window=1)
    try:
        pf.enqueue("busy", [])  # occupies the window...
        pf.enqueue("r", ["a"])  # ...so "a" is queued but not started
        pf.claim("r", ["a"])  # the request starts first and reads "a" itself
        pf.claim("busy", [])
        _wait_idle(pf)
        assert not store.in_host("a") and pf.stats.loaded == 0 and pf.stats.dropped == 1
    finally:
        pf.close()


def test_rejects_bad_window(tmp_path):
    with pytest.raises(ValueError, match="window"):
        Prefetcher(KVStore(tmp_path), window=0)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_queued_request_kv_in_ram_before_it_runs(generator, corpus):
    """End to end with the scheduler: while request 1 computes, request 2's KV is loaded."""
    from daser_rag.scheduler import RequestScheduler

    generator.chunk_tokens = 40
    ctx1 = [ChunkRef(text=generator.split(corpus[0].text)[0])]
    ctx2 = [ChunkRef(text=generator.split(corpus[i].text)[0]) for i in (1, 2)]
    generator.prefill("warm up", ctx1 + ctx2)  # computes and stores every chunk
    store = generator.store
    keys2 = generator.plan_keys(ctx2)
    store.host.clear()
    pf = Prefetcher(store, window=2)
    sched = RequestScheduler(generator, concurrency=1, prefetcher=pf)
    try:
        with generator.lock:  # request 1 "runs" until we let go
            f1 = sched.submit("What is this?", ctx1, max_new_tokens=1)
            f2 = sched.submit("And this?", ctx2, max_new_tokens=1)
            _wait_idle(pf)
            assert all(store.in_host(k) for k in keys2)
            assert all(store.is_protected(k) for k in keys2)
        r2 = f2.result(timeout=300)
        r1 = f1.result(timeout=300)
        assert r2.ram_misses == 0 and r2.ram_hits == len(keys2)
        assert r1.ram_misses == 0  # it waited on the lock too, so it was prefetched as well
        assert not any(store.is_protected(k) for k in keys2)
    finally:
        sched.close()
        pf.close()
