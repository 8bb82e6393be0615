"""/health asks the store how its remote tier is (`KVStore.remote_health`), a typed method, instead
of reaching into `store.remote.link` with getattr."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from daser_rag.kv.store import KVStore
from daser_rag.kv.tiers.redis import RedisLink, RedisTier
from daser_rag.server.testing import RedisServer, redis_server_path


def test_remote_health_reports_none_up_and_down(tmp_path):
    assert KVStore(tmp_path / "local", codec="fp32").remote_health() is None  # no remote tier
    if redis_server_path() is None:
        pytest.skip("redis-server not installed")
    srv = RedisServer().start()
    try:
        store = KVStore(tmp_path / "r", codec="fp32", remote=RedisTier(RedisLink(srv.url, namespace="health",
                                                                                retry_s=0.1)))
        assert store.remote_health() is True and store.remote_health(probe=False) is True
        srv.kill()
        assert store.remote_health() is False  # the PING fails ...
        assert store.remote_health(probe=False) is False  # ... and the breaker now holds it down
    finally:
        srv.stop()
