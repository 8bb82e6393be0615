"""Two real service processes sharing one real redis-server (separate cache dirs, so Redis is
the only thing they share): precompute on one, hit on the other; invalidate or update on one,
and the other can no longer serve the dropped KV; Redis going away degrades, not errors."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("redis")

from daser_rag.errors import UnknownDocumentError
from daser_rag.server.client import DaserClient
from daser_rag.server.testing import RedisServer, ServiceProcess, redis_server_path
from daser_rag.types import ChunkRef, Document

pytestmark = [pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed"),
              pytest.mark.slow]  # two service processes per test (5-8 s each): CI's slow step runs them

PASS_DOC = "The pass statement is a null operation; when it is executed, nothing happens."
BREAK_DOC = "A break statement terminates the nearest enclosing loop, skipping the optional else clause."
Q = "What happens when pass is executed?"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(workdir=base / "redis").start()
    a = ServiceProcess(base / "a", redis_url=redis.url).start()
    b = ServiceProcess(base / "b", redis_url=redis.url).start()
    try:
        a.wait_healthy()
        b.wait_healthy()
        with DaserClient(a.url) as ca, DaserClient(b.url) as cb:
            yield {"redis": redis, "a": a, "b": b, "ca": ca, "cb": cb}
    finally:
        a.stop()
        b.stop()
        redis.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_precompute_on_one_hit_on_the_other(cluster):
    ca, cb = cluster["ca"], cluster["cb"]
    rep = ca.add_documents([Document("mp:pass", PASS_DOC)])
    assert rep.computed_chunks == 1
    keys = rep.records[0]["chunk_keys"]
    assert "mp:pass" in cb.list_documents()  # one registry for both processes
    rb = cb.generate(Q, [ChunkRef(doc_id="mp:pass")], max_new_tokens=6)
    assert rb.cache_hits == 1 and rb.cache_misses == 0 and rb.chunk_keys == keys
    assert "nothing" in rb.text.lower()
    ra = ca.generate(Q, [ChunkRef(doc_id="mp:pass")], max_new_tokens=6)
    assert ra.text == rb.text  # the same bytes served on both processes
    assert _metric(cb.metrics(), 'daser_store_hits_total{tier="redis"}') >= 1


def test_invalidate_on_one_no_stale_hit_on_the_other(cluster):
    ca, cb = cluster["ca"], cluster["cb"]
    ca.add_documents([Document("mp:inv", BREAK_DOC)])
    first = cb.generate(Q, [ChunkRef(doc_id="mp:inv")], max_new_tokens=1)
    assert first.cache_hits == 1  # b now also holds the entry in its own RAM and disk tiers
    dropped = ca.invalidate("mp:inv")
    assert dropped == first.chunk_keys
    # the instant invalidate() returned on a, b can neither resolve the document ...
    with pytest.raises(UnknownDocumentError):
        cb.generate(Q, [ChunkRef(doc_id="mp:inv")], max_new_tokens=1)
    # ... nor hit the dropped KV, even when the same text is sent again
    again = cb.generate(Q, [Document("mp:inv", BREAK_DOC)], max_new_tokens=1)
    assert again.cache_hits == 0 and again.cache_misses == 1
    assert _metric(cb.metrics(), "daser_stale_local_dropped_total") >= 1


def test_update_on_one_is_seen_by_the_other(cluster):
    ca, cb = cluster["ca"], cluster["cb"]
    v1 = ca.add_documents([Document("mp:upd", PASS_DOC)]).records[0]
    assert cb.generate(Q, [ChunkRef(doc_id="mp:upd")], max_new_tokens=1).chunk_keys == v1["chunk_keys"]
    v2 = ca.update_document("mp:upd", BREAK_DOC)["document"]
    assert v2["version"] > v1["version"]
    r = cb.generate(Q, [ChunkRef(doc_id="mp:upd")], max_new_tokens=1)
    assert r.chunk_keys == v2["chunk_keys"] and r.cache_hits == 1  # a precomputed v2; b hits it
    assert cb.document("mp:upd")["digest"] == v2["digest"]


def test_concurrent_updates_from_two_processes_report_what_they_wrote(cluster):
    """Issue 20 item 3: both processes PUT one document at once. Each response reports the
    version it wrote (never the same one twice), and afterwards GET's chunk list is the one of
    GET's text, on both processes: the later commit wins whole."""
    import httpx

    from daser_rag.kv.keys import text_digest

    urls = [cluster["a"].url, cluster["b"].url]
    httpx.post(urls[0] + "/v1/documents", json={"documents": [{"id": "mp:race", "text": PASS_DOC}]}, timeout=120)
    texts = [PASS_DOC + " Variant A: it does nothing at all, by design.",
             BREAK_DOC + " Variant B: the loop ends here."]
    for round_ in range(5):
        barrier = threading.Barrier(2)
        out: list = [None, None]

        def put(i: int) -> None:
            text = texts[i] + f" Round {round_}."
            barrier.wait()
            r = httpx.put(urls[i] + "/v1/documents/mp:race", json={"text": text}, timeout=120)
            out[i] = (r.status_code, r.json(), text)

        threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [o[0] for o in out] == [200, 200], out
        docs = [o[1]["document"] for o in out]
        for d, o in zip(docs, out):
            assert d["digest"] == text_digest(o[2])  # each reports its own text ...
        versions = [d["version"] for d in docs]
        assert versions[0] != versions[1], versions  # ... and the version it wrote
        winner = docs[versions.index(max(versions))]
        for url in urls:
            got = httpx.get(url + "/v1/documents/mp:race", timeout=30).json()
            assert got["version"] == winner["version"] and got["digest"] == winner["digest"], (round_, got, docs)
            assert got["chunk_keys"] == sorted(winner["chunk_keys"]) and got["num_chunks"] == len(got["chunk_keys"])


def test_tenant_isolation_across_processes(cluster):
    ca, cb = cluster["ca"], cluster["cb"]
    ca.add_documents([Document("mp:t", PASS_DOC)], tenant="acme")
    assert cb.list_documents(tenant="acme") == ["mp:t"]
    with pytest.raises(UnknownDocumentError):
        cb.generate(Q, [ChunkRef(doc_id="mp:t")], max_new_tokens=1, tenant="globex")
    r = cb.generate(Q, [PASS_DOC], max_new_tokens=1, tenant="globex")
    assert r.cache_hits == 0


def test_health_and_metrics_stay_responsive_during_generation(cluster):
    ca = cluster["ca"]
    ca.add_documents([Document("mp:busy", PASS_DOC)])
    done = threading.Event()

    long_text = " ".join([PASS_DOC] * 150)  # ~2.5k tokens of uncached full prefill: seconds of work

    def long_request():
        try:
            ca.generate(Q, [long_text], max_new_tokens=8, use_cache=False)
        finally:
            done.set()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.2)
    import httpx

    lat = []
    while not done.is_set() and len(lat) < 10:
        t0 = time.perf_counter()
        assert httpx.get(cluster["a"].url + "/health", timeout=10).status_code == 200
        assert httpx.get(cluster["a"].url + "/metrics", timeout=10).status_code == 200
        lat.append(time.perf_counter() - t0)
    t.join()
    assert lat and max(lat) < 3.0, lat


def test_redis_outage_degrades_to_local_tiers(cluster):
    ca, cb, redis = cluster["ca"], cluster["cb"], cluster["redis"]
    ca.add_documents([Document("mp:out", PASS_DOC)])
    assert cb.generate(Q, [ChunkRef(doc_id="mp:out")], max_new_tokens=1).cache_hits == 1
    redis.kill()
    try:
        assert cb.health()["status"] == "degraded"
        r = cb.generate(Q, [ChunkRef(doc_id="mp:out")], max_new_tokens=1)  # local mirror + local tiers
        assert r.cache_hits == 1
        r = cb.generate(Q, ["A continue statement skips to the next cycle of the nearest enclosing loop."],
                        max_new_tokens=1)
        assert r.cache_misses == 1  # computed locally; the failed write to Redis is not an error
        assert "unavailable" in cluster["b"].log()
    finally:
        redis.start()
    deadline = time.monotonic() + 10
    while cb.health()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert cb.health()["redis"] == "up"
