"""Storage under faults, against a real redis-server and a real full filesystem (issue 20, items
1-4, 8, 9; no model here, see test_server_storage_faults.py for the service):

* Redis at maxmemory (OOM): a write is refused whole (RedisRefused, nothing left behind), reads
  keep working and never write what they cannot lose, deletes still go through, the refusal is
  counted and reported; under the documented volatile-lru policy KV is evicted, the registry never.
* Start-up refuses an allkeys-* policy.
* Two processes updating one document: text, version and chunk list switch together.
* Refs added for a document removed meanwhile are refused (no ghost).
* Bookkeeping keys expire; a metrics scrape costs Redis the same at any keyspace size.
* Local disk full (a small tmpfs): writes Redis acknowledged still succeed, no temp file is
  left behind, the problem is reported, and a stale mirror is never served.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

redis = pytest.importorskip("redis")

from daser_rag.errors import DaserError
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import encode
from daser_rag.kv.doc_index import DocIndex
from daser_rag.kv.redis_index import RedisDocIndex
from daser_rag.kv.shared import open_store
from daser_rag.kv.store import KVStore
from daser_rag.kv.tiers.redis import RedisLink, RedisRefused, RedisTier, RedisUnavailable
from daser_rag.server.testing import RedisServer, free_port, redis_server_path
from daser_rag.context import SHARED_TENANT

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed")


def _kv(key: str, n: int = 5, dim: int = 8, seed: int = 0) -> ChunkKV:
    g = torch.Generator().manual_seed(seed)
    return ChunkKV(key=key, token_ids=torch.arange(n), start_pos=7,
                   keys=torch.randn(3, 2, n, dim, generator=g), values=torch.randn(3, 2, n, dim, generator=g))


@pytest.fixture
def srv(tmp_path):
    with RedisServer(port=free_port(), workdir=tmp_path / "redis") as s:
        yield s


def _store(root: Path, url: str, ns: str = "f", **kw) -> KVStore:
    link = RedisLink(url, namespace=ns, retry_s=0.2)
    tier = RedisTier(link, **kw)
    return KVStore(root, codec="fp32", remote=tier, validate=tier.is_live,
                   index=RedisDocIndex(link, local=DocIndex(root / "index.sqlite")))


def _update(store: KVStore, doc: str, texts: list[str], keys: list[str], tenant: str = "") -> bool:
    """What the ingestor does: register (stage), compute and put, switch the refs."""
    changed = store.register_document(doc, texts, "digest:" + "|".join(texts), tenant)
    for k in keys:
        store.put(_kv(k))
    store.replace_document_refs(doc, keys, tenant)
    return changed


def _config(url: str, **cfg: str) -> None:
    c = redis.Redis.from_url(url)
    for k, v in cfg.items():
        c.config_set(k.replace("_", "-"), v)


# -- item 2: Redis at maxmemory ------------------------------------------------------------------
def test_redis_full_refuses_writes_whole_reads_work_deletes_free(srv, tmp_path):
    store = _store(tmp_path / "a", srv.url)
    _update(store, "d", ["t1"], ["k1"])
    _update(store, "e", ["t2"], ["k2"])
    link = store.remote.link
    raw = redis.Redis.from_url(srv.url)
    _config(srv.url, maxmemory="1", maxmemory_policy="noeviction")  # every write that adds data: OOM
    try:
        with pytest.raises(RedisRefused) as err:
            _update(store, "d", ["t1 changed"], ["k9"])
        assert err.value.reason == "OOM"
        # nothing of the refused update was written: the old version is whole, nothing pending
        assert store.document_chunk_texts("d", SHARED_TENANT) == ["t1"] and store.document_chunk_keys("d", SHARED_TENANT) == ["k1"]
        assert store.document_info("d", SHARED_TENANT).version == 1 and store.index.pending_documents() == []
        # a read's bookkeeping (refs) and a computed entry's put are skipped, never raised
        store.add_refs("d", ["k7"], SHARED_TENANT)
        store.put(_kv("k8"))
        assert store.remote.refused_puts >= 1
        assert store.get("k1") is not None  # reads work
        assert link.refusals.get("OOM", 0) >= 2 and link.up  # counted; the breaker stays closed
        problems = store.problems()
        assert any("Redis is full" in p for p in problems), problems
        # a delete frees memory, so Redis lets it through even when full
        assert store.invalidate("e", SHARED_TENANT) == ["k2"]
        assert store.documents(SHARED_TENANT) == ["d"] and not raw.exists(link.key("kv", "k2"))
    finally:
        _config(srv.url, maxmemory="0")
    _update(store, "d", ["t1 changed"], ["k9"])  # room again: the same write lands
    assert store.document_chunk_texts("d", SHARED_TENANT) == ["t1 changed"] and store.document_info("d", SHARED_TENANT).version == 2


def test_volatile_lru_evicts_kv_and_never_the_registry(srv, tmp_path):
    """The documented setup: maxmemory + volatile-lru. Every KV entry carries a TTL, so Redis
    makes room by evicting KV (recomputable) and every document write is acknowledged and kept."""
    raw = redis.Redis.from_url(srv.url)
    base = int(raw.info("memory")["used_memory"])
    _config(srv.url, maxmemory=str(base + 3 * 1024 * 1024), maxmemory_policy="volatile-lru")
    store = _store(tmp_path / "a", srv.url, ns="lru")
    # ~130 KB per KV entry in fp32 (48 bytes x 4 tokens x 680): 60 of them need ~8 MB, more than the room
    written = []
    for i in range(60):
        texts = [f"document {i}"]
        changed = store.register_document(f"d{i}", texts, f"dg{i}", SHARED_TENANT)
        store.put(_kv(f"k{i}", n=4, dim=680, seed=i))
        store.replace_document_refs(f"d{i}", [f"k{i}"], SHARED_TENANT)
        assert changed
        written.append(i)
    assert int(raw.info("stats")["evicted_keys"]) > 0  # Redis did evict ...
    assert store.remote.link.refusals == {}  # ... and never refused a write
    assert store.documents(SHARED_TENANT) == sorted(f"d{i}" for i in written)  # every document kept
    for i in written:
        assert store.document_chunk_texts(f"d{i}", SHARED_TENANT) == [f"document {i}"]
        assert store.document_chunk_keys(f"d{i}", SHARED_TENANT) == [f"k{i}"]


def test_start_up_refuses_a_policy_that_evicts_the_registry(srv, tmp_path):
    _config(srv.url, maxmemory="100mb", maxmemory_policy="allkeys-lru")
    with pytest.raises(DaserError, match="allkeys-lru"):
        open_store(tmp_path / "a", redis_url=srv.url, namespace="p")
    _config(srv.url, maxmemory_policy="volatile-lru")
    assert open_store(tmp_path / "b", redis_url=srv.url, namespace="p").remote is not None


def test_error_replies_are_refusals_not_crashes(srv):
    link = RedisLink(srv.url, namespace="e")
    with pytest.raises(RedisRefused) as err:
        link.run(lambda c: c.execute_command("EVAL", "return redis.error_reply('READONLY You cannot write')", 0))
    assert err.value.reason == "READONLY" and link.refusals == {"READONLY": 1} and link.errors == 1
    assert isinstance(err.value, RedisUnavailable)  # every caller that degrades on an outage degrades here
    with pytest.raises(redis.ResponseError):  # a real bug stays a bug (500), not a silent 503
        link.run(lambda c: c.execute_command("NOSUCHCOMMAND"))


# -- item 3: concurrent updates ------------------------------------------------------------------
def test_concurrent_updates_commit_whole_in_order_and_report_their_own_version(srv, tmp_path):
    a = _store(tmp_path / "a", srv.url, ns="cas")
    b = _store(tmp_path / "b", srv.url, ns="cas")
    _update(a, "d", ["v1"], ["k_v1"])
    # A and B register (stage) at once; B finishes first, then A (the interleaving)
    assert a.register_document("d", ["a1", "a2"], "dA", SHARED_TENANT)
    assert b.register_document("d", ["b1"], "dB", SHARED_TENANT)
    for k in ("k_a1", "k_a2"):
        a.put(_kv(k))
    b.put(_kv("k_b1"))
    b.replace_document_refs("d", ["k_b1"], SHARED_TENANT)
    a.replace_document_refs("d", ["k_a1", "k_a2"], SHARED_TENANT)
    va, vb = a.written_version("d", SHARED_TENANT), b.written_version("d", SHARED_TENANT)
    assert (vb, va) == (2, 3)  # each reports the version it wrote, in commit order
    for s in (a, b):  # the text and its chunk list belong together, on every process
        assert s.document_info("d", SHARED_TENANT).version == 3 and s.document_chunk_texts("d", SHARED_TENANT) == ["a1", "a2"]
        assert s.document_chunk_keys("d", SHARED_TENANT) == ["k_a1", "k_a2"]
    raw = redis.Redis.from_url(srv.url)
    link = a.remote.link
    # the loser's and the old version's KV are dropped; the winner's is referenced (with a TTL)
    assert not raw.exists(link.key("kv", "k_b1")) and not raw.exists(link.key("kv", "k_v1"))
    assert raw.exists(link.key("kv", "k_a1")) and raw.pttl(link.key("kv", "k_a1")) > 0


def test_concurrent_updates_from_threads_never_mix_text_and_chunks(srv, tmp_path):
    stores = [_store(tmp_path / f"s{i}", srv.url, ns="race") for i in range(2)]
    _update(stores[0], "d", ["base"], ["k_base"])
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        s = stores[i]
        for n in range(15):
            text = f"w{i}-{n}"
            s.register_document("d", [text], "dg-" + text, SHARED_TENANT)
            s.put(_kv("k_" + text))
            time.sleep(0.001 * ((n + i) % 3))
            s.replace_document_refs("d", ["k_" + text], SHARED_TENANT)
            with lock:
                seen.append((s.written_version("d", SHARED_TENANT), text))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = [v for v, _ in seen]
    assert len(set(versions)) == len(versions) == 30  # no two writes report one version
    final = stores[1].document_info("d", SHARED_TENANT)
    text = dict(seen)[final.version]
    assert final.version == max(versions)
    assert stores[1].document_chunk_texts("d", SHARED_TENANT) == [text] and stores[1].document_chunk_keys("d", SHARED_TENANT) == ["k_" + text]


# -- item 4: ghosts ------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_refs_for_a_document_removed_meanwhile_are_refused(srv, tmp_path, shared):
    store = _store(tmp_path / "a", srv.url, ns="ghost") if shared else KVStore(tmp_path / "a", codec="fp32")
    _update(store, "d", ["t"], ["k1"])
    assert store.invalidate("d", SHARED_TENANT) == ["k1"]
    store.put(_kv("k2"))
    store.add_refs("d", ["k2"], SHARED_TENANT)  # a request that resolved d before the removal, finishing now
    assert store.documents(SHARED_TENANT) == [] and store.document_info("d", SHARED_TENANT) is None
    assert store.document_chunk_keys("d", SHARED_TENANT) == []
    _update(store, "d", ["t again"], ["k3"])  # a real re-add is a write like any other
    assert store.documents(SHARED_TENANT) == ["d"] and store.document_info("d", SHARED_TENANT).version == 2  # numbering continues
    store.add_refs("d", ["k2"], SHARED_TENANT)
    assert store.document_chunk_keys("d", SHARED_TENANT) == ["k2", "k3"]


# -- item 8: bookkeeping expires -----------------------------------------------------------------
def test_bookkeeping_keys_expire_or_go_with_their_document(srv, tmp_path):
    store = _store(tmp_path / "a", srv.url, ns="bk")
    for i in range(40):  # updates
        _update(store, "u", [f"text {i}"], [f"ku{i}"])
    for i in range(40):  # add/delete cycles
        _update(store, f"c{i}", ["t"], [f"kc{i}"])
        store.invalidate(f"c{i}", SHARED_TENANT)
    raw = redis.Redis.from_url(srv.url)
    forever = []
    for name in raw.scan_iter(match="bk:*", count=1000):
        if raw.pttl(name) == -1:
            forever.append(name.decode())
    # only the registry of the one document left (and the tenant's list) has no TTL
    doc = store.index
    allowed = {doc._doc("", "u"), doc._refs("", "u"), doc._docs(""), doc._users_prefix() + "ku39"}
    assert set(forever) <= allowed, sorted(set(forever) - allowed)[:10]
    assert any(n.startswith(b"bk:gen:") for n in raw.scan_iter(match="bk:gen:*"))  # fences exist, with TTLs


# -- item 9: metrics cost ------------------------------------------------------------------------
def _scan_calls(raw) -> int:
    return int(raw.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def _due(store: KVStore) -> None:
    """Make the next scrape sample Redis (as if the sampling interval had passed)."""
    sampler = getattr(store.remote, "_stats", None)
    if hasattr(sampler, "_next"):
        sampler._next = 0.0


def test_a_metrics_scrape_costs_the_same_at_any_keyspace_size(srv, tmp_path):
    from daser_rag.server.metrics import ServiceMetrics

    store = _store(tmp_path / "a", srv.url, ns="m")
    raw = redis.Redis.from_url(srv.url)
    metrics = ServiceMetrics(store)
    costs = {}
    for total in (100, 30_000):
        pipe = raw.pipeline(transaction=False)
        for i in range(total - raw.dbsize()):
            pipe.set(f"m:kv:x{total}-{i}", b"0123456789", px=3_600_000)
        pipe.execute()
        _due(store)
        before = _scan_calls(raw)
        t0 = time.perf_counter()
        metrics.render()
        costs[total] = (_scan_calls(raw) - before, time.perf_counter() - t0)
        # concurrent scrapers within the sampling interval cost Redis nothing more
        before = _scan_calls(raw)
        threads = [threading.Thread(target=metrics.render) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _scan_calls(raw) - before == 0
    print(f"SCAN calls per scrape: {costs}")
    assert costs[30_000][0] <= 4
    # the sampled totals converge to the truth over successive scrapes
    for _ in range(200):
        _due(store)
        if store.remote.num_entries() == raw.dbsize():
            break
    assert store.remote.num_entries() == raw.dbsize() and store.remote.nbytes() == 10 * raw.dbsize()


# -- item 1: local disk full ---------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 4 MiB tmpfs (real ENOSPC), mounted for the test; skipped where mount is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> Path:
    """Fill the filesystem holding `path` to the last byte; returns the filler (unlink it to free)."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        except OSError:
            pass
    return filler


def test_local_disk_full_never_fails_a_write_redis_acknowledged(tmp_path, full_disk):
    srv = RedisServer(port=free_port(), workdir=tmp_path / "r", persistent=True).start()
    try:
        _disk_full_scenario(srv, full_disk)
    finally:
        srv.stop()


def _disk_full_scenario(srv: RedisServer, full_disk: Path) -> None:
    store = _store(full_disk / "cache", srv.url, ns="disk")
    _update(store, "d", ["t0"], ["k0"])
    filler = fill(full_disk)
    for i in range(1, 6):  # updates and adds: acknowledged by Redis, whatever the local disk says
        _update(store, "d", [f"t{i}"], [f"k{i}"])
        _update(store, f"n{i}", [f"n{i}"], [f"kn{i}"])
    other = _store(full_disk.parent / "other", srv.url, ns="disk")  # another process: Redis is the truth
    assert other.document_chunk_texts("d", SHARED_TENANT) == ["t5"] and other.document_chunk_keys("d", SHARED_TENANT) == ["k5"]
    assert other.documents(SHARED_TENANT) == ["d", "n1", "n2", "n3", "n4", "n5"]
    assert other.get("k5") is not None  # the KV reached Redis though the local disk refused it
    assert store.counters["error_disk"] >= 1 and store.index.mirror_errors >= 1
    assert not list((full_disk / "cache").rglob(".tmp-*"))  # no temp file left behind
    problems = store.problems()
    assert any("local disk" in p and "full" in p for p in problems), problems
    # reads and a read's bookkeeping keep working
    store.add_refs("d", ["k5"], SHARED_TENANT)
    assert store.document_chunk_texts("d", SHARED_TENANT) == ["t5"]
    # Redis goes away: a degraded read is never served from a mirror that missed the update
    srv.kill()
    try:
        with pytest.raises(RedisUnavailable):
            store.document_chunk_texts("n5", SHARED_TENANT)
    finally:
        srv.start()
    filler.unlink()
    time.sleep(0.3)
    assert store.document_chunk_texts("n5", SHARED_TENANT) == ["n5"]  # a read refreshes the mirror once there is room
    srv.kill()
    try:
        assert store.document_chunk_texts("n5", SHARED_TENANT) == ["n5"]  # ... and it is trusted again
    finally:
        srv.start()


def test_a_failed_disk_write_leaves_no_temp_file(full_disk):
    from daser_rag.kv.tiers.disk import DiskTier

    tier = DiskTier(full_disk / "kv")
    fill(full_disk)
    with pytest.raises(OSError):
        tier.put(encode(_kv("big", n=64, dim=256), "fp32"))
    assert not list((full_disk / "kv").rglob(".tmp-*")) and not tier.contains("big")


def test_an_unchanged_registration_never_pairs_its_chunks_with_a_newer_text(srv, tmp_path):
    """A re-sends the current text (unchanged) while B commits a new one: A's refs switch is a
    compare-and-set on the version A saw, so B's text keeps B's chunks."""
    a = _store(tmp_path / "a", srv.url, ns="unch")
    b = _store(tmp_path / "b", srv.url, ns="unch")
    _update(a, "d", ["v1"], ["k_v1"])
    assert a.register_document("d", ["v1"], "digest:v1", SHARED_TENANT) is False  # unchanged, version 1
    _update(b, "d", ["v2"], ["k_v2"])  # B commits version 2 meanwhile
    a.replace_document_refs("d", ["k_v1"], SHARED_TENANT)  # A's switch of the old text's chunks: refused
    assert a.written_version("d", SHARED_TENANT) == 1 and b.written_version("d", SHARED_TENANT) == 2
    assert a.document_chunk_texts("d", SHARED_TENANT) == ["v2"] and a.document_chunk_keys("d", SHARED_TENANT) == ["k_v2"]
