"""The client never sends on a pooled connection the server is closing: it drops idle connections
before the server's keep-alive timeout does. Before this, a request issued just as both sides timed
out failed with "connection reset by peer" (seen once in CI, test_server_multi)."""

from __future__ import annotations

import time

import pytest

fastapi = pytest.importorskip("fastapi")

from daser_rag.server.client import DaserClient
from daser_rag.server.testing import AppThread


def _app():
    app = fastapi.FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


def test_default_expiry_is_below_the_server_default():
    with DaserClient("http://127.0.0.1:1") as c:
        assert c._http._transport._pool._keepalive_expiry < 5.0  # the server's --timeout-keep-alive default


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_requests_at_the_server_keepalive_boundary_do_not_reset():
    with AppThread(_app(), timeout_keep_alive=1) as srv, DaserClient(srv.url, keepalive_expiry=0.5) as c:
        for pause in (0.95, 1.0, 1.02, 0.98, 1.0):
            time.sleep(pause)  # right where the server drops the idle connection
            assert c.health()["status"] == "ok"
