"""The bounded load test (benchmarks/load_test.py) as a test: two service processes + a real
redis-server, concurrent streamed completions with updates and delete/re-add cycles mixed in.
Zero errors, zero stale answers, zero inconsistent answers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("redis")

from daser_rag.server.testing import redis_server_path

pytestmark = [pytest.mark.slow, pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed")]



def _load_main():
    from benchmarks.load_test import main  # benchmarks/ is a package of the project

    return main


@pytest.mark.parametrize("requests,concurrency", [(200, 8)])
def test_bounded_load_with_invalidations(tmp_path, requests, concurrency):
    out = tmp_path / "load.json"
    rc = _load_main()(["--requests", str(requests), "--concurrency", str(concurrency), "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0, res
    assert res["errors"] == 0 and res["stale"] == 0 and res["inconsistent_answers"] == 0
    assert res["completions"] > requests // 2 and res["ops"].get("update", 0) + res["ops"].get("delete", 0) > 0
    assert res["ttft_p50_s"] > 0 and res["throughput_rps"] > 0
