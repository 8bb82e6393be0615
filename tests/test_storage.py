"""Codecs, tiers, doc index and crash safety: a torn or flipped entry is never served."""

import os

import pytest
import torch

from daser_rag.errors import CorruptEntryError
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import decode, encode, from_bytes, to_bytes
from daser_rag.kv.store import KVStore
from daser_rag.kv.tiers.disk import DiskTier
from daser_rag.kv.tiers.host import HostTier
from daser_rag.context import SHARED_TENANT


def _kv(key="c" + "ab" * 16, t=20, layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(key=key, token_ids=torch.arange(t), start_pos=9,
                   keys=torch.randn(layers, 3, t, 64, generator=g) * 3,
                   values=torch.randn(layers, 3, t, 64, generator=g))


@pytest.mark.parametrize("codec,tol,ratio", [("fp32", 0, 1.0), ("fp16", 5e-3, 0.5), ("bf16", 5e-2, 0.5),
                                             ("int8", 0.15, 0.25), ("fp8", 0.6, 0.25)])
def test_codec_round_trip(codec, tol, ratio):
    kv = _kv(t=256)
    enc = encode(kv, codec)
    back = decode(from_bytes(to_bytes(enc)))
    assert back.start_pos == 9 and back.token_ids.tolist() == kv.token_ids.tolist()
    assert (back.keys - kv.keys).abs().max().item() <= tol
    assert (back.values - kv.values).abs().max().item() <= tol
    assert enc.codec == codec
    # payload size relative to fp32 (scales add a little for the quantized codecs)
    assert enc.nbytes <= kv.nbytes * ratio * 1.1


def test_bad_codec_name():
    with pytest.raises(ValueError, match="unknown KV codec"):
        encode(_kv(), "int3")


def test_truncated_and_bitflipped_entries_are_never_served(tmp_path):
    tier = DiskTier(tmp_path)
    kv = _kv()
    tier.put(encode(kv, "fp16"))
    path = tier._path(kv.key)
    good = path.read_bytes()
    assert tier.get(kv.key) is not None

    path.write_bytes(good[: len(good) // 2])  # torn write
    assert tier.get(kv.key) is None
    assert not path.exists(), "a corrupt entry must be dropped"

    for pos in (5, 50, len(good) // 2, len(good) - 1):  # header and payload bit flips
        flipped = bytearray(good)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        assert tier.get(kv.key) is None, f"bit flip at {pos} was served"
    assert tier.corrupt_dropped == 5

    with pytest.raises(CorruptEntryError):
        from_bytes(good, expect_key="c" + "00" * 16)  # renamed file holding another key


def test_crash_leftover_tmp_is_cleaned_and_ignored(tmp_path):
    tier = DiskTier(tmp_path)
    kv = _kv()
    tier.put(encode(kv, "fp32"))
    stray = tier._path(kv.key).parent / f".tmp-{kv.key}-99999999-1"  # no such process
    stray.write_bytes(b"partial")
    live = stray.parent / f".tmp-{kv.key}-{os.getppid()}-1"  # a live process mid-write
    live.write_bytes(b"partial")
    tier2 = DiskTier(tmp_path)  # restart
    assert not stray.exists()
    assert live.exists(), "another live process's in-flight write must not be removed"
    assert tier2.get(kv.key) is not None


def test_store_recomputes_after_corruption(generator):
    chunk = "The pass statement is a null operation."
    q = "What is pass?"
    generator.generate(q, [chunk], max_new_tokens=1)
    key = generator.chunk_key_for(chunk)
    path = generator.store.disk._path(key)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    generator.store.host.clear()  # force a read from disk
    res = generator.generate(q, [chunk], max_new_tokens=1)
    assert res.cache_misses == 1 and res.cache_hits == 0
    assert generator.store.stats()["corrupt_dropped"] == 1
    assert generator.store.disk.get(key) is not None  # rewritten, valid


def test_host_tier_lru_budget():
    one = encode(_kv("c" + "01" * 16), "fp32").nbytes
    host = HostTier(capacity_bytes=int(one * 2.5))
    keys = ["c" + f"{i:02d}" * 16 for i in range(4)]
    for k in keys[:2]:
        host.put(encode(_kv(k), "fp32"))
    host.get(keys[0])  # keys[1] becomes least recent
    host.put(encode(_kv(keys[2]), "fp32"))
    assert host.contains(keys[0]) and host.contains(keys[2]) and not host.contains(keys[1])
    assert host.nbytes() <= host.capacity_bytes
    host.is_protected = lambda k: True  # everything protected: new entry is not admitted
    host.put(encode(_kv(keys[3]), "fp32"))
    assert not host.contains(keys[3]) and host.contains(keys[0])


def test_doc_index_refcounts_and_invalidation(tmp_path):
    store = KVStore(tmp_path, codec="fp32")
    a, b, shared = "c" + "aa" * 16, "c" + "bb" * 16, "c" + "cc" * 16
    for k in (a, b, shared):
        store.put(_kv(k))
    store.index.set_document("doc1", ["x", "s"], "d1", SHARED_TENANT)
    store.index.set_document("doc2", ["y", "s"], "d2", SHARED_TENANT)
    store.index.add_refs("doc1", [a, shared], SHARED_TENANT)
    store.index.add_refs("doc2", [b, shared], SHARED_TENANT)
    assert store.index.refcount(shared) == 2
    dropped = store.invalidate("doc1", SHARED_TENANT)
    assert dropped == [a]
    assert not store.contains(a) and store.contains(shared) and store.contains(b)
    assert store.invalidate("doc1", SHARED_TENANT) == []  # idempotent
    assert sorted(store.invalidate("doc2", SHARED_TENANT)) == sorted([b, shared])
    assert not store.contains(shared)
    assert store.stats()["bytes"]["disk"] == 0


def test_disk_survives_restart(tmp_path):
    s1 = KVStore(tmp_path, codec="fp16")
    kv = _kv()
    s1.put(kv)
    s1.index.set_document("d", ["t"], "x", SHARED_TENANT)
    s1.index.add_refs("d", [kv.key], SHARED_TENANT)
    s2 = KVStore(tmp_path)
    got = s2.get(kv.key)
    assert got is not None and s2.counters["hit_disk"] == 1
    assert s2.index.chunk_keys("d", SHARED_TENANT) == [kv.key]
    assert os.path.exists(tmp_path / "index.sqlite")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_device_tier_serves_from_gpu_and_invalidates(tmp_path):
    store = KVStore(tmp_path, codec="bf16", device="cuda", device_bytes=1 << 30)
    kv = _kv()
    store.put(kv)
    got = store.get(kv.key, device="cuda")
    assert got is not None and got.keys.is_cuda and store.counters["hit_device"] == 1
    store.index.set_document("d", ["t"], "x", SHARED_TENANT)
    store.index.add_refs("d", [kv.key], SHARED_TENANT)
    store.invalidate("d", SHARED_TENANT)
    assert not store.device.contains(kv.key) and store.get(kv.key) is None


def test_device_tier_is_off_on_cpu(tmp_path):
    store = KVStore(tmp_path, device="cpu", device_bytes=1 << 30)
    assert store.device is None and [t.name for t in store.tiers] == ["host", "disk"]


def _kv_for(key: str) -> ChunkKV:
    return ChunkKV(key=key, token_ids=torch.arange(4), start_pos=3, keys=torch.randn(2, 1, 4, 8),
                   values=torch.randn(2, 1, 4, 8))


def test_an_update_killed_between_text_and_refs_leaves_the_old_version_or_is_repaired_at_start(tmp_path):
    store = KVStore(tmp_path / "c", codec="fp32")
    store.put(_kv_for("k_old"))
    store.register_document("d", ["old"], "d1", SHARED_TENANT)
    store.replace_document_refs("d", ["k_old"], SHARED_TENANT)
    assert store.index.pending_documents() == []
    store.register_document("d", ["new"], "d2", SHARED_TENANT)  # ... and the process dies before the refs switch:
    reopened = KVStore(tmp_path / "c", codec="fp32")
    # text and refs are committed together, so nothing of the unfinished update was written
    assert reopened.document_chunk_texts("d", SHARED_TENANT) == ["old"] and reopened.document_chunk_keys("d", SHARED_TENANT) == ["k_old"]
    assert reopened.index.pending_documents() == []
    # a two-step writer (the index's own set_document) killed between its steps is repaired
    reopened.index.set_document("d", ["new"], "d2", SHARED_TENANT)
    assert reopened.index.pending_documents() == [("", "d")]
    assert reopened.document_chunk_keys("d", SHARED_TENANT) == ["k_old"]  # the old KV still referenced
    assert reopened.repair_documents(lambda text, tenant: f"k_{text}") == [("", "d")]
    assert reopened.document_chunk_keys("d", SHARED_TENANT) == ["k_new"] and reopened.index.pending_documents() == []
    assert not reopened.contains("k_old")  # the old version's KV is gone with the switch
    assert reopened.repair_documents(lambda text, tenant: f"k_{text}") == []  # nothing left to do


def test_disk_cap_holds_and_garbage_collection_drops_idle_unreferenced_kv(tmp_path):
    one = len(to_bytes(encode(_kv_for("a"), "fp32")))
    store = KVStore(tmp_path / "c", codec="fp32", disk_bytes=3 * one + 10)
    for i in range(6):
        store.put(_kv_for(f"k{i}"))
    assert store.disk.nbytes() <= 3 * one + 10 and store.disk.evictions == 3
    store.register_document("d", ["t"], "dg", SHARED_TENANT)
    store.replace_document_refs("d", ["k5"], SHARED_TENANT)
    old = os.path.getmtime(next((tmp_path / "c" / "kv").rglob("k5.kv"))) - 7200
    for p in (tmp_path / "c" / "kv").rglob("*.kv"):
        os.utime(p, (old, old))
    dropped = store.collect_garbage(max_idle_s=3600)
    assert sorted(dropped) == ["k3", "k4"] and store.contains("k5")  # referenced KV stays
    assert not store.contains("k3") and store.stats()["gc_dropped"] == 2
