"""PCR look-ahead on the request path: a request queued behind another has its chunk KV brought
from disk into host RAM and protected from eviction until it finishes; the service drives it."""

from __future__ import annotations

import time

from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.store import KVStore
from daser_rag.types import ChunkRef, Document

DOCS = [Document(f"d{i}", f"Note {i}. The signal lamp on tower {i} shows colour number {i * 7}.") for i in range(6)]


def _wait_idle(gen: CacheAwareGenerator, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    pf = gen.lookahead._prefetcher
    while pf is not None and not pf.idle() and time.monotonic() - t0 < timeout:
        time.sleep(0.02)


def test_queued_request_is_prefetched_into_ram_and_protected_until_finished(lm, tmp_path):
    probe = KVStore(tmp_path / "probe", codec="fp32")
    gen0 = CacheAwareGenerator(lm, store=probe)
    gen0.add_documents(DOCS[:1])
    one = probe.get_encoded(gen0.chunk_keys(DOCS[0].text)[0]).nbytes
    store = KVStore(tmp_path / "cache", codec="fp32", host_bytes=int(one * 2.5))  # RAM holds 2 of 6 chunks
    gen = CacheAwareGenerator(lm, store=store, prefetch_window=2)
    gen.add_documents(DOCS)
    wanted = [k for d in DOCS[:2] for k in gen.chunk_keys(d.text)]
    for d in DOCS[2:]:  # evict the wanted entries from RAM (they stay on disk)
        store.get(gen.chunk_keys(d.text)[0])
    assert not any(store.in_host(k) for k in wanted)
    gen.queued("r1", [ChunkRef(doc_id="d0"), ChunkRef(doc_id="d1")])
    _wait_idle(gen)
    assert all(store.in_host(k) for k in wanted)
    assert all(store.is_protected(k) for k in wanted)
    for d in DOCS[2:]:  # a burst of other reads cannot evict the queued request's KV
        store.get(gen.chunk_keys(d.text)[0])
    assert all(store.in_host(k) for k in wanted)
    gen.started("r1")
    res = gen.generate("Which colour does tower 1 show?", [ChunkRef(doc_id="d0"), ChunkRef(doc_id="d1")],
                       max_new_tokens=4)
    assert res.cache_hits == 2
    gen.finished("r1")
    assert not any(store.is_protected(k) for k in wanted)
    assert gen.health().detail["prefetch"]["loaded"] == 2
    gen.queued("bad", ["   "])  # bad input is the request's to report, never the look-ahead's
    gen.finished("bad")
    gen.close()


def test_prefetch_window_zero_turns_look_ahead_off(lm, tmp_path):
    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "c", codec="fp32"), prefetch_window=0)
    gen.add_documents(DOCS[:1])
    gen.queued("r", [ChunkRef(doc_id="d0")])
    assert gen.lookahead._prefetcher is None and not gen.store.protected_keys()
    gen.finished("r")
