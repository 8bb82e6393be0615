"""The Redis tier and the Redis-held document index against a real redis-server (no model)."""

from __future__ import annotations

import logging

import pytest
import torch

redis = pytest.importorskip("redis")

from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import encode, to_bytes
from daser_rag.kv.store import KVStore
from daser_rag.kv.tiers.redis import RedisLink, RedisTier
from daser_rag.kv.redis_index import RedisDocIndex
from daser_rag.kv.shared import default_namespace, open_store
from daser_rag.server.testing import RedisServer, free_port, redis_server_path
from daser_rag.context import SHARED_TENANT

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def link(redis_server, request):
    ns = f"t{abs(hash(request.node.name)) % 10**8}"
    return RedisLink(redis_server.url, namespace=ns)


def _kv(key: str, n: int = 5, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(key=key, token_ids=torch.arange(n), start_pos=7,
                   keys=torch.randn(3, 2, n, 8, generator=g), values=torch.randn(3, 2, n, 8, generator=g))


def test_roundtrip_is_checksum_verified(link):
    tier = RedisTier(link)
    kv = _kv("cabc")
    assert tier.get("cabc") is None
    tier.put(encode(kv, "fp32"))
    got = tier.get("cabc")
    assert got is not None and got.start_pos == 7
    assert torch.equal(got.tensors["k"], kv.keys) and torch.equal(got.tensors["v"], kv.values)
    assert tier.contains("cabc") and tier.is_live("cabc")
    assert list(tier.keys()) == ["cabc"]
    assert tier.nbytes() == len(to_bytes(encode(kv, "fp32")))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "wrong_key"])
def test_corrupt_values_are_dropped_never_served(link, damage):
    tier = RedisTier(link)
    blob = bytearray(to_bytes(encode(_kv("cgood"), "fp16")))
    if damage == "flip":
        blob[-3] ^= 0x40
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = bytearray(b"not a kv entry")
    else:
        blob = bytearray(to_bytes(encode(_kv("cother"), "fp16")))
    link.client.set(link.key("kv", "cgood"), bytes(blob))
    assert tier.get("cgood") is None
    assert tier.corrupt_dropped == 1
    assert not link.client.exists(link.key("kv", "cgood"))  # deleted, so no one else reads it either


def test_put_is_fenced_against_a_concurrent_invalidation(link):
    writer, other = RedisTier(link), RedisTier(RedisLink(link.url, namespace=link.namespace))
    assert writer.get("cx") is None  # writer sees a miss and starts computing
    other.put(encode(_kv("cx"), "fp32"))
    assert other.delete("cx")  # ... meanwhile another process stores and invalidates it
    writer.put(encode(_kv("cx"), "fp32"))  # the late write must not resurrect it
    assert writer.fenced_puts == 1
    assert other.get("cx") is None
    assert writer.get("cx") is None  # a fresh miss observes the new generation ...
    writer.put(encode(_kv("cx"), "fp32"))
    assert other.get("cx") is not None  # ... and the next write lands


def test_doc_index_refcounts_and_removal(link):
    idx, tier = RedisDocIndex(link), RedisTier(link)
    for k in ("k1", "k2", "k3"):
        tier.put(encode(_kv(k), "fp16"))
    assert idx.set_document("a", ["t1", "t2"], "dA", SHARED_TENANT) is True
    assert idx.set_document("a", ["t1", "t2"], "dA", SHARED_TENANT) is False
    assert idx.replace_refs("a", ["k1", "k2"], SHARED_TENANT) == []
    assert idx.set_document("b", ["t2"], "dB", SHARED_TENANT)
    assert idx.replace_refs("b", ["k2", "k3"], SHARED_TENANT) == []
    assert idx.refcount("k2") == 2 and idx.documents(SHARED_TENANT) == ["a", "b"]
    assert idx.info("a", SHARED_TENANT).version == 1 and idx.chunk_texts("a", SHARED_TENANT) == ["t1", "t2"]
    assert sorted(idx.remove_document("a", SHARED_TENANT)) == ["k1"]  # k2 still used by b
    assert tier.get("k1") is None and tier.get("k2") is not None
    assert idx.remove_document("a", SHARED_TENANT) is None  # idempotent
    assert sorted(idx.replace_refs("b", ["k3"], SHARED_TENANT)) == ["k2"]
    assert tier.get("k2") is None
    assert idx.set_document("a", ["t9"], "dA2", SHARED_TENANT) and idx.info("a", SHARED_TENANT).version == 2  # versions never repeat
    # tenants never see each other's documents
    assert idx.documents("other") == [] and idx.info("b", "other") is None


def test_removal_wins_over_a_concurrent_add(link):
    idx, tier = RedisDocIndex(link), RedisTier(link)
    idx.set_document("d", ["t"], "dig", SHARED_TENANT)
    tier.put(encode(_kv("kd"), "fp16"))
    assert idx.remove_document("d", SHARED_TENANT) == []  # removed while the adder was computing
    assert idx.replace_refs("d", ["kd"], SHARED_TENANT) == ["kd"]  # the adder's refs are orphans: dropped
    assert tier.get("kd") is None and idx.info("d", SHARED_TENANT) is None and idx.documents(SHARED_TENANT) == []


def test_two_stores_share_kv_and_see_each_others_invalidations(link, tmp_path):
    def make(name):  # the recipe every process of a deployment uses (service, vLLM connector)
        return open_store(tmp_path / name, redis_url=link.url, namespace=link.namespace, codec="fp32")

    a, b = make("a"), make("b")
    a.index.set_document("doc", ["x"], "dx", SHARED_TENANT)
    a.put(_kv("ck"))
    a.replace_document_refs("doc", ["ck"], SHARED_TENANT)
    assert b.get("ck") is not None and b.counters["hit_redis"] == 1
    assert b.get("ck") is not None and b.counters["hit_host"] == 1  # now cached locally on b
    assert a.invalidate("doc", SHARED_TENANT) == ["ck"]
    assert b.get("ck") is None  # b's local copy is not served: Redis no longer holds it
    assert b.counters["stale_dropped"] == 1
    assert not b.contains("ck") and not list((tmp_path / "b" / "kv").rglob("ck.kv"))


def test_outage_degrades_and_replays_invalidations(tmp_path, caplog):
    srv = RedisServer(port=free_port(), workdir=tmp_path / "r", persistent=True).start()
    try:
        link = RedisLink(srv.url, namespace="outage", retry_s=0.2)
        tier = RedisTier(link)
        store = KVStore(tmp_path / "s", codec="fp32", remote=tier, validate=tier.is_live)
        store.put(_kv("c1"))
        store.put(_kv("c2"))
        srv.kill()
        with caplog.at_level(logging.WARNING):
            assert store.get("c1") is not None  # local tiers keep serving
            assert store.delete("c2")  # applied locally, queued for Redis
            store.put(_kv("c3"))  # no error
            assert store.get("c3") is not None
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1, "one warning per outage, not one per call"
        assert link.pending == 1 and not link.up
        srv.start()
        import time

        time.sleep(0.25)
        assert link.ping() and link.up and link.pending == 0
        raw = redis.Redis.from_url(srv.url)
        assert raw.exists(link.key("kv", "c1")) and not raw.exists(link.key("kv", "c2"))
    finally:
        srv.stop()


def test_index_writes_are_refused_while_redis_is_away_and_the_mirror_never_goes_back(tmp_path):
    from daser_rag.kv.doc_index import DocIndex
    from daser_rag.kv.tiers.redis import RedisUnavailable

    srv = RedisServer(port=free_port(), workdir=tmp_path / "r").start()
    try:
        link = RedisLink(srv.url, namespace="mirror", retry_s=0.2)
        idx = RedisDocIndex(link, local=DocIndex(tmp_path / "idx.sqlite"))
        assert idx.set_document("d", ["v1"], "d1", SHARED_TENANT) and idx.set_document("d", ["v2"], "d2", SHARED_TENANT)
        assert idx.local.info("d", SHARED_TENANT).version == 2  # the mirror keeps Redis's version numbers
        # Redis goes back to an older record (a restored snapshot, a lagging replica): reads
        # follow Redis, but the newer local record is not overwritten by the older one ...
        link.client.hset(idx._doc("", "d"), mapping={"digest": "d1", "version": 1, "texts": '["v1"]'})
        assert idx.info("d", SHARED_TENANT).version == 1
        assert idx.local.info("d", SHARED_TENANT).content_digest == "d2" and idx.local.info("d", SHARED_TENANT).version == 2
        # ... and the next write gets a version above anything this process has seen
        idx.set_document("d", ["v3"], "d3", SHARED_TENANT)
        assert idx.info("d", SHARED_TENANT).version == 3 and idx.local.info("d", SHARED_TENANT).version == 3
        srv.kill()
        with pytest.raises(RedisUnavailable):
            idx.set_document("d", ["v4"], "d4", SHARED_TENANT)
        with pytest.raises(RedisUnavailable):
            idx.remove_document("d", SHARED_TENANT)
        with pytest.raises(RedisUnavailable):
            idx.replace_refs("d", ["k"], SHARED_TENANT)
        assert idx.info("d", SHARED_TENANT).version == 3 and idx.chunk_texts("d", SHARED_TENANT) == ["v3"]  # degraded reads: the mirror
    finally:
        srv.stop()


def test_a_hung_redis_is_marked_up_only_after_a_short_ping(tmp_path):
    import time

    from daser_rag.kv.tiers.redis import RedisUnavailable

    srv = RedisServer(port=free_port(), workdir=tmp_path / "r").start()
    try:
        link = RedisLink(srv.url, namespace="hang", retry_s=0.3)
        link.client.set("x", b"1")
        srv.pause()  # SIGSTOP: the socket stays open, nothing answers
        try:
            t0 = time.perf_counter()
            with pytest.raises(RedisUnavailable):
                link.run(lambda c: c.get("x"))
            first = time.perf_counter() - t0
            assert not link.up
            t0 = time.perf_counter()
            with pytest.raises(RedisUnavailable):
                link.run(lambda c: c.get("x"))  # within retry_s: fails without touching Redis
            fast = time.perf_counter() - t0
            time.sleep(0.35)
            t0 = time.perf_counter()
            with pytest.raises(RedisUnavailable):
                link.run(lambda c: c.get("x"))  # probe due: a 0.25 s PING, not the 1 s op timeout
            probe = time.perf_counter() - t0
            assert not link.up  # not marked up without an answer
            t0 = time.perf_counter()
            assert link.ping() is False
            ping = time.perf_counter() - t0
        finally:
            srv.resume()
        time.sleep(0.35)
        assert link.run(lambda c: c.get("x")) == b"1" and link.up
    finally:
        srv.stop()
    print(f"hung Redis: first call {first:.2f}s, breaker {fast * 1000:.1f}ms, probe {probe:.2f}s, ping {ping:.2f}s")
    assert first < 2.0 and fast < 0.05 and probe < 0.6 and ping < 0.6


def test_redis_index_lists_half_switched_documents_for_repair(link, tmp_path):
    tier = RedisTier(link)
    store = KVStore(tmp_path / "s", codec="fp32", remote=tier, validate=tier.is_live, index=RedisDocIndex(link))
    store.put(_kv("k_old"))
    store.register_document("d", ["old"], "d1", "acme")
    store.replace_document_refs("d", ["k_old"], "acme")
    assert store.index.pending_documents() == []
    store.register_document("d", ["new"], "d2", "acme")  # killed here, before the refs switch:
    other = KVStore(tmp_path / "o", codec="fp32", remote=RedisTier(link), index=RedisDocIndex(link))
    # the store commits text and refs together, so nothing was written: the old version is whole
    assert other.index.pending_documents() == [] and other.document_chunk_texts("d", "acme") == ["old"]
    assert other.document_chunk_keys("d", "acme") == ["k_old"]
    # a two-step writer (the index's own set_document) killed between its steps is repaired
    store.index.set_document("d", ["new"], "d2", "acme")
    assert other.index.pending_documents() == [("acme", "d")]  # any process can finish it
    assert other.repair_documents(lambda text, tenant: f"k_{text}") == [("acme", "d")]
    assert other.document_chunk_keys("d", "acme") == ["k_new"] and other.index.pending_documents() == []
    assert tier.get("k_old") is None


def test_every_kv_entry_expires_the_registry_never_and_the_memory_policy_is_checked(link):
    """KV carries a TTL (shorter while unreferenced), so volatile-lru can always make room by
    evicting recomputable KV; the registry has none, so it is never evicted."""
    tier = RedisTier(link, ttl_s=3600, doc_ttl_s=7200)
    idx = RedisDocIndex(link, doc_ttl_s=7200)
    tier.put(encode(_kv("plain"), "fp16"))  # plain-text context: no document uses it
    tier.put(encode(_kv("doc"), "fp16"))
    assert 0 < link.client.pttl(link.key("kv", "plain")) <= 3_600_000
    idx.set_document("d", ["t"], "dg", SHARED_TENANT)
    idx.replace_refs("d", ["doc"], SHARED_TENANT)
    assert 3_600_000 < link.client.pttl(link.key("kv", "doc")) <= 7_200_000  # referenced: the longer TTL
    tier.put(encode(_kv("doc"), "fp16"))  # rewritten while referenced: still the longer one
    assert 3_600_000 < link.client.pttl(link.key("kv", "doc")) <= 7_200_000
    idx.add_refs("d", ["plain"], SHARED_TENANT)  # a chunk read as part of a document: the longer TTL too
    assert 3_600_000 < link.client.pttl(link.key("kv", "plain")) <= 7_200_000
    for name in (idx._doc("", "d"), idx._refs("", "d"), idx._docs(""), idx._users_prefix() + "doc"):
        assert link.client.pttl(name) == -1, name  # the registry never expires
    policy = link.memory_policy()
    assert policy["maxmemory"] == 0 and any("maxmemory is 0" in p for p in policy["problems"])
    assert policy["fatal"] == []


def test_open_store_needs_a_namespace_and_derives_it_from_the_model(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        open_store(tmp_path, redis_url="redis://127.0.0.1:1/0")
    assert default_namespace("0123456789abcdef0123") == "daser:0123456789abcdef"
    local = open_store(tmp_path / "local", codec="fp32")
    assert local.remote is None and local.validate is None
