"""Fault test: kill -9 the service while it writes KV; restart; every entry passes its checksum,
planted corruption is dropped (never served), and every registered document still answers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
redis = pytest.importorskip("redis")

from daser_rag.corpus import DEMO_TOPICS, python_reference_corpus
from daser_rag.errors import CorruptEntryError
from daser_rag.kv.codecs import from_bytes
from daser_rag.server.testing import RedisServer, ServiceProcess, redis_server_path

pytestmark = [pytest.mark.slow, pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed")]


def _check_all(cache: Path, r: redis.Redis) -> tuple[int, int]:
    disk = 0
    for f in (cache / "kv").glob("*/*.kv"):
        from_bytes(f.read_bytes(), expect_key=f.stem)  # raises CorruptEntryError on any damage
        disk += 1
    remote = 0
    for name in r.scan_iter(match="*:kv:*"):
        key = name.decode().rsplit(":", 1)[1]
        from_bytes(r.get(name), expect_key=key)
        remote += 1
    return disk, remote


def test_kill9_during_writes_leaves_no_corrupt_entry(tmp_path):
    docs = python_reference_corpus(DEMO_TOPICS[:10])
    with RedisServer(workdir=tmp_path / "redis") as rs:
        r = redis.Redis.from_url(rs.url)
        svc = ServiceProcess(tmp_path / "svc", redis_url=rs.url).start().wait_healthy()
        acked: list[str] = []

        def writer():
            with httpx.Client(timeout=600) as c:
                for d in docs:
                    try:
                        resp = c.post(svc.url + "/v1/documents",
                                      json={"documents": [{"id": d.doc_id, "text": d.text[:1500]}]})
                    except httpx.HTTPError:
                        return  # the process was killed under us
                    if resp.status_code == 200:
                        acked.append(d.doc_id)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 300
        while len(acked) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # land somewhere inside the next document's precompute/writes
        svc.kill9()
        t.join()
        assert 2 <= len(acked) < len(docs), acked

        disk, remote = _check_all(svc.cache_dir, r)
        assert disk >= 2 and remote >= 2

        # plant damage on one acknowledged document's entry, in both tiers
        in_redis = {n.decode().rsplit(":", 1)[1] for n in r.scan_iter(match="*:kv:*")}
        victim = next(f for f in (svc.cache_dir / "kv").glob("*/*.kv") if f.stem in in_redis)
        blob = bytearray(victim.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        victim.write_bytes(bytes(blob))
        rname = next(n for n in r.scan_iter(match="*:kv:" + victim.stem))
        r.set(rname, r.get(rname)[:-100])
        with pytest.raises(CorruptEntryError):
            _check_all(svc.cache_dir, r)

        svc2 = ServiceProcess(svc.cache_dir, redis_url=rs.url).start().wait_healthy()
        try:
            with httpx.Client(base_url=svc2.url, timeout=600) as c:
                registered = c.get("/v1/documents").json()["data"]
                assert set(acked) <= set(registered)
                served_keys = set()
                for doc_id in registered:
                    resp = c.post("/v1/completions", json={"prompt": "What is this about?", "max_tokens": 1,
                                                           "documents": [{"id": doc_id}]})
                    assert resp.status_code == 200, resp.text
                    served_keys.update(resp.json()["daser"]["chunk_keys"])
                assert victim.stem in served_keys  # the damaged entry was requested ...
                metrics = c.get("/metrics").text
            assert 'daser_corrupt_dropped_total{tier="disk"} 1.0' in metrics  # ... dropped, not served
            assert 'daser_corrupt_dropped_total{tier="redis"} 1.0' in metrics
            disk, remote = _check_all(svc.cache_dir, r)  # and everything stored now verifies
            assert disk >= len(served_keys) and remote >= len(served_keys)
            assert not list((svc.cache_dir / "kv").glob("*/.tmp-*"))  # crash leftovers swept
        finally:
            svc2.stop()
