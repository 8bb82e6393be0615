"""Results and counters are typed and built by keyword; their JSON shapes did not change."""

from __future__ import annotations

import pytest
import torch

from daser_rag.engine.lookahead import LookAhead
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.store import KVStore, StoreStats
from daser_rag.types import GenerationResult, IngestReport, Timings

RESULT_FIELDS = dict(text="hi", token_ids=[1, 2], prompt_tokens=10, context_tokens=7, query_tokens=3, exact_tokens=4,
                     reused_tokens=2, recomputed_tokens=1, cache_hits=2, cache_misses=1, mode="blend",
                     recompute_ratio=0.15, finish_reason="length", timings=Timings())


def test_generation_result_is_built_by_keyword_only():
    with pytest.raises(TypeError):
        GenerationResult("hi", [1, 2], 10, 7, 3, 4, 2, 1, 2, 1, "blend", 0.15, "length", Timings())  # type: ignore[misc]
    with pytest.raises(TypeError):
        IngestReport(1, 0, 3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Timings(0.1)  # type: ignore[misc]
    r = GenerationResult(**RESULT_FIELDS)
    d = r.to_dict()
    # the service's `daser` block: every field it always had, same values
    for k, v in RESULT_FIELDS.items():
        assert d[k] == (vars(v) if k == "timings" else v)
    assert d["chunk_keys"] == [] and d["selector"] == "none" and d["recompute_share"] == pytest.approx(1 / 3)


def _kv(key: str) -> ChunkKV:
    return ChunkKV(key=key, token_ids=torch.arange(4), start_pos=0, keys=torch.zeros(2, 1, 4, 8),
                   values=torch.zeros(2, 1, 4, 8))


def test_store_snapshot_is_typed_and_stats_keeps_its_flat_json(tmp_path):
    store = KVStore(tmp_path, codec="fp32")
    store.put(_kv("c" + "ab" * 16))
    assert store.get("c" + "ab" * 16) is not None and store.get("c" + "cd" * 16) is None
    snap = store.snapshot()
    assert isinstance(snap, StoreStats)
    assert snap.hits == {"host": 1} and snap.counters["miss"] == 1 and snap.hit_rate == 0.5
    assert snap.bytes["host"] > 0 and snap.entries == {"host": 1, "disk": 1} and snap.errors == {}
    flat = store.stats()
    assert flat == snap.to_dict()
    assert {"codec", "documents", "bytes", "entries", "host_capacity_bytes", "evictions_host", "corrupt_dropped",
            "hit_host", "miss", "put", "hit_rate"} <= set(flat)
    assert flat["hit_host"] == 1 and flat["put"] == 1 and flat["hit_rate"] == 0.5 and flat["documents"] == 0


def test_lookahead_stats_are_typed(tmp_path):
    la = LookAhead(KVStore(tmp_path, codec="fp32"), window=2)
    try:
        assert la.stats() == {"window": 2, "queued": 0}
        la.queued("r1", ["c" + "ef" * 16])
        st = la.stats()
        assert st["queued"] == 1 and set(st) == {"window", "queued", "loaded", "already_in_ram", "missing",
                                                 "claimed_waits", "dropped", "bytes"}
        la.finished("r1")
    finally:
        la.close()
