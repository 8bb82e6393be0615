"""Service hardening (issue 13), each fault injected for real on 127.0.0.1: hostile strings and
types, ghost documents, oversize requests, token budgets, tenant bounds, queue and request
deadlines, a client that disconnects, /health during a flood of deletes, per-key fair share."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
import httpx
from fastapi.testclient import TestClient

from daser_rag.server.app import Limits, create_app
from daser_rag.server.testing import AppThread

PASS_DOC = "The pass statement is a null operation; when it is executed, nothing happens."
Q = "What happens when pass is executed?"
STORY = "Write a very long, detailed story about a dragon who learns to program computers, chapter by chapter."


def _err(resp, status, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["message"] and isinstance(body["code"], str) and body["code"], body
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.fixture
def client(generator):
    app = create_app(generator, limits=Limits(max_body_bytes=2_000_000, max_new_tokens=64, max_pending=4))
    with TestClient(app) as c:
        yield c


def _raw(client, path, text, method="POST"):
    return client.request(method, path, content=text.encode(), headers={"Content-Type": "application/json"})


# -- strings and types ------------------------------------------------------------------------
HOSTILE = [
    ("/v1/documents", '{"documents": [{"id": "a\\ud800", "text": "x"}]}', "surrogate"),
    ("/v1/documents", '{"documents": [{"id": "a", "text": "bad \\udfff text"}]}', "surrogate"),
    ("/v1/completions", '{"prompt": "q", "documents": ["plain \\ud800 text"]}', "surrogate"),
    ("/v1/completions", '{"prompt": "q", "documents": [{"id": "\\ud800"}]}', "surrogate"),
    ("/v1/completions", '{"prompt": "q", "documents": [{"kind": "chunk", "text": "t", "id": "x\\ud800"}]}',
     "surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "surrogate"),
    ("/v1/completions", '{"prompt": "q\\u0007"}', "control"),
    ("/v1/documents", '{"documents": [{"id": "a", "text": "x", "metadata": {"k\\u0000": 1}}]}', "control"),
    ("/v1/split", '{"text": "\\ud800"}', "surrogate"),
    ("/v1/completions", '{"prompt": "q", "max_tokens": "3"}', "max_tokens"),
    ("/v1/completions", '{"prompt": "q", "max_tokens": true}', "max_tokens"),
    ("/v1/completions", '{"prompt": "q", "temperature": "0.5"}', "temperature"),
    ("/v1/completions", '{"prompt": "q", "stream": 1}', "stream"),
    ("/v1/completions", '{"prompt": "q", "seed": 1.5}', "seed"),
    ("/v1/completions", '{"prompt": "q", "recompute_ratio": "0.3"}', "recompute_ratio"),
    ("/v1/completions", '{"prompt": "q", "selector": "nonsense"}', "selector"),
    ("/v1/completions", '{"prompt": "q", "calibration": "yes"}', "calibration: Input should be a valid boolean"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "q"}], "calibration": 1}',
     "calibration: Input should be a valid boolean"),
    ("/v1/documents", '{"documents": [{"id": "a", "text": "x"}], "precompute": 1}', "precompute"),
    ("/v1/completions", '{"prompt": "q", "tenant": "t1\\n"}', "tenant"),
]


@pytest.mark.parametrize("path,body,needle", HOSTILE)
def test_hostile_strings_and_loose_types_get_a_400_with_a_code(client, path, body, needle):
    err = _err(_raw(client, path, body), 400)
    assert needle in err["message"], err
    assert client.get("/v1/documents").json()["data"] == []  # nothing registered on the way


def test_tenant_headers_and_model_names(client):
    r = client.get("/v1/documents", headers=[("X-Daser-Tenant", "a"), ("X-Daser-Tenant", "b")])
    _err(r, 400, "duplicate_tenant")
    r = client.get("/v1/documents", headers=[("X-Daser-Tenant", "a"), ("X-Daser-Tenant", "a")])
    _err(r, 400, "duplicate_tenant")
    _err(client.get("/v1/documents", params={"tenant": "t1\n"}), 400, "invalid_tenant")
    _err(client.get("/v1/documents/%ED%A0%80"), 404, "unknown_document")  # not UTF-8: decoded as U+FFFD
    _err(client.post("/v1/completions", json={"prompt": Q, "model": "gpt-4"}), 404, "model_not_found")
    served = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/completions", json={"prompt": Q, "model": served, "max_tokens": 1, "recompute_ratio": 0.3,
                                             "documents": [PASS_DOC, "A break statement ends a loop."]})
    assert r.status_code == 200, r.text
    assert r.json()["daser"]["recompute_ratio"] == 0.3  # passed through per request
    _err(client.get("/v1/nothing"), 404, "not_found")
    _err(client.get("/v1/completions"), 405, "method_not_allowed")


def test_recompute_ratio_auto_and_selector_pass_through_per_request(client):
    docs = [PASS_DOC, "A break statement terminates the nearest enclosing loop."]
    r = client.post("/v1/completions", json={"prompt": Q, "documents": docs, "max_tokens": 1,
                                             "recompute_ratio": "auto", "selector": "query"})
    assert r.status_code == 200, r.text
    d = r.json()["daser"]
    assert d["recompute_ratio"] == "auto" and d["selector"] in ("query", "none")
    r = client.post("/v1/completions", json={"prompt": Q, "documents": docs, "max_tokens": 1,
                                             "recompute_ratio": 0.5, "selector": "deviation"})
    assert r.json()["daser"]["selector"] == "deviation" and r.json()["daser"]["recompute_ratio"] == 0.5


def test_recompute_ratio_auto_and_selector_reach_the_generation_params(generator):
    from daser_rag.server.schemas import CompletionRequest
    from daser_rag.server.service import Service

    svc = Service(generator)
    p = svc.params(CompletionRequest(prompt="q", recompute_ratio="auto", selector="query"), "t")
    assert (p.recompute_ratio, p.selector, p.tenant, p.max_new_tokens) == ("auto", "query", "t", 256)
    with pytest.raises(Exception, match="selector"):
        svc.params(CompletionRequest(prompt="q", selector="nonsense"), "")


def test_calibration_per_request_reaches_the_engine_and_the_answer_says_whether_it_was_used(client, generator):
    """`calibration`: null (default) uses the engine's when it has one, false never, true requires
    one: on an engine without a calibration that is a 400 naming calibration, streamed or not."""
    from daser_rag.server.schemas import CompletionRequest
    from daser_rag.server.service import Service

    svc = Service(generator)
    assert svc.params(CompletionRequest(prompt="q"), "").calibration is None
    assert svc.params(CompletionRequest(prompt="q", calibration=False), "").calibration is False
    assert svc.params(CompletionRequest(prompt="q", calibration=True), "").calibration is True
    docs = [PASS_DOC, "A break statement terminates the nearest enclosing loop."]
    for calibration in (False, None):
        r = client.post("/v1/completions", json={"prompt": Q, "documents": docs, "max_tokens": 1,
                                                 "calibration": calibration})
        assert r.status_code == 200, r.text
        assert r.json()["daser"]["calibrated"] is False
    for path, body in (("/v1/completions", {"prompt": Q}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": Q}]})):
        for stream in (False, True):
            r = client.post(path, json={**body, "documents": docs, "max_tokens": 1, "calibration": True,
                                        "stream": stream})
            err = _err(r, 400, "invalid_request")
            assert "calibration" in err["message"] and "no calibration loaded" in err["message"], err


def test_calibration_false_turns_an_engines_calibration_off_per_request(lm, store):
    """On an engine with a calibration (an identity one, fitted at r = 0): used by default and with
    true, not with false; `daser.calibrated` says which."""
    from daser_rag.calibration.adapter import Calibration
    from daser_rag.engine.generator import CacheAwareGenerator

    plain = CacheAwareGenerator(lm, store=store)
    spec = plain.runner.spec
    identity = Calibration.identity(plain.fingerprint, spec.num_layers, spec.num_kv_heads, spec.hidden_size)
    plain.close()
    gen = CacheAwareGenerator(lm, store=store, calibration=identity)
    try:
        docs = [PASS_DOC, "A break statement terminates the nearest enclosing loop."]
        with TestClient(create_app(gen, limits=Limits(max_new_tokens=8))) as http:
            used = {}
            for calibration in (None, True, False):
                r = http.post("/v1/completions", json={"prompt": Q, "documents": docs, "max_tokens": 1,
                                                       "recompute_ratio": 0.0, "calibration": calibration})
                assert r.status_code == 200, r.text
                used[calibration] = r.json()["daser"]["calibrated"]
        assert used == {None: True, True: True, False: False}
    finally:
        gen.close()


def test_client_forwards_calibration_and_reads_calibrated_back(client):
    from daser_rag.errors import InvalidInputError
    from daser_rag.server.client import DaserClient, _result
    from daser_rag.types import GenerationResult, Timings

    remote = DaserClient("http://testserver")
    remote._http.close()
    remote._http = client
    body = remote._completion_body("q", None, None, {"calibration": False})
    assert body["calibration"] is False and "calibration" not in remote._completion_body("q", None, None, {})
    docs = [PASS_DOC, "A break statement terminates the nearest enclosing loop."]
    with pytest.raises(InvalidInputError, match="calibration"):  # the service's 400, as the library's error
        remote.generate(Q, docs, max_new_tokens=1, calibration=True)
    with pytest.raises(InvalidInputError, match="calibration"):
        remote.generate(Q, docs, max_new_tokens=1, calibration="yes")  # refused before anything is sent
    answer = GenerationResult(text="t", token_ids=[1], prompt_tokens=3, context_tokens=2, query_tokens=1,
                              exact_tokens=1, reused_tokens=1, recomputed_tokens=0, cache_hits=2, cache_misses=0,
                              mode="blend", recompute_ratio=0.0, finish_reason="length", timings=Timings(),
                              calibrated=True)
    assert _result("t", answer.to_dict()).calibrated is True


def test_unknown_document_references_leave_no_ghost(client):
    body = {"prompt": Q, "max_tokens": 1, "documents": [{"kind": "chunk", "id": "ghost", "text": PASS_DOC}]}
    _err(client.post("/v1/completions", json=body), 404, "unknown_document")
    _err(client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "ghost2"}]}), 404,
         "unknown_document")
    assert client.get("/v1/documents").json()["data"] == []
    _err(client.get("/v1/documents/ghost"), 404, "unknown_document")
    assert client.delete("/v1/documents/ghost").json()["found"] is False
    # a chunk of a known document is fine
    client.post("/v1/documents", json={"documents": [{"id": "real", "text": PASS_DOC}]})
    body["documents"][0]["id"] = "real"
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.get("/v1/documents").json()["data"] == ["real"]


def test_oversize_requests_are_refused_before_any_write(generator):
    app = create_app(generator, limits=Limits(max_body_bytes=2_000_000, max_request_tokens=2000))
    store = generator.store
    with TestClient(app) as c:
        big = " ".join(["The pass statement is a null operation."] * 400)  # ~3.2k tokens
        puts = store.stats().get("put", 0)
        _err(c.post("/v1/documents", json={"documents": [{"id": "big", "text": big}]}), 413, "too_many_tokens")
        _err(c.put("/v1/documents/big", json={"text": big}), 413, "too_many_tokens")
        _err(c.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "big", "text": big}]}), 413,
             "too_many_tokens")
        huge = " ".join(["The pass statement is a null operation."] * 1500)  # > the 8k-token window
        app2 = create_app(generator, limits=Limits(max_body_bytes=2_000_000, max_request_tokens=100_000))
        with TestClient(app2) as c2:
            _err(c2.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "huge", "text": huge}]}), 400,
                 "context_length_exceeded")
            assert c2.get("/v1/documents").json()["data"] == []
        assert c.get("/v1/documents").json()["data"] == []
        assert store.stats().get("put", 0) == puts  # no KV written either


def test_token_budget_per_key(generator):
    app = create_app(generator, api_keys=["k1", "k2"], limits=Limits(key_tokens_per_minute=300))
    with TestClient(app) as c:
        one, two = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        doc = " ".join(["A break statement terminates the nearest enclosing loop."] * 12)  # ~130 tokens
        assert c.post("/v1/documents", json={"documents": [{"id": "d1", "text": doc}]}, headers=one).status_code == 200
        assert c.post("/v1/documents", json={"documents": [{"id": "d2", "text": doc}]}, headers=one).status_code == 200
        r = c.post("/v1/documents", json={"documents": [{"id": "d3", "text": doc}]}, headers=one)
        _err(r, 429, "token_budget")
        assert int(r.headers["retry-after"]) >= 1
        assert c.get("/v1/documents", headers=one).json()["data"] == ["d1", "d2"]  # d3 not registered
        # the other key has its own budget
        assert c.post("/v1/documents", json={"documents": [{"id": "d3", "text": doc}]}, headers=two).status_code == 200


def test_tenant_names_are_bounded_per_key(generator):
    app = create_app(generator, limits=Limits(max_tenants_per_key=3))
    with TestClient(app) as c:
        for t in ("t1", "t2", "t3"):
            assert c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1, "tenant": t}).status_code == 200
        _err(c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1, "tenant": "t4"}), 403, "tenant_limit")
        assert c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1, "tenant": "t2"}).status_code == 200
        assert "daser_tenants 3.0" in c.get("/metrics").text


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_forty_new_tenant_names_grow_rss_by_less_than_15_mb(generator):
    app = create_app(generator, limits=Limits(max_tenants_per_key=1000))
    with TestClient(app) as c:
        for i in range(5):  # warm-up: allocator pools, first compiled paths
            assert c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1, "tenant": f"warm{i}"}).status_code == 200
        before = _rss_mb()
        for i in range(40):
            r = c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1, "tenant": f"tenant-{i}"})
            assert r.status_code == 200
        grown = _rss_mb() - before
    print(f"RSS growth for 40 new tenants: {grown:.1f} MB")
    assert grown < 15, grown


def test_metrics_can_require_a_key(generator):
    app = create_app(generator, api_keys=["k1"], limits=Limits(protect_metrics=True))
    with TestClient(app) as c:
        _err(c.get("/metrics"), 401, "invalid_api_key")
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/health").status_code == 200


# -- deadlines -------------------------------------------------------------------------------
def test_queue_deadline_answers_503(generator):
    app = create_app(generator, limits=Limits(queue_timeout_s=0.5))
    with TestClient(app) as c:
        assert generator.lock.acquire(timeout=10)
        try:
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1})
            waited = time.perf_counter() - t0
        finally:
            generator.lock.release()
        _err(r, 503, "queue_timeout")
        assert r.headers["retry-after"] == "1" and waited < 3.0, waited
        assert c.post("/v1/completions", json={"prompt": Q, "max_tokens": 1}).status_code == 200


def test_request_deadline_answers_504(generator):
    app = create_app(generator, limits=Limits(request_timeout_s=0.5, max_new_tokens=512))
    with TestClient(app) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/completions", json={"prompt": STORY, "max_tokens": 400})
        took = time.perf_counter() - t0
        _err(r, 504, "deadline_exceeded")
        assert took < 5.0, took
        assert 'daser_cancelled_total{reason="deadline_exceeded"} 1.0' in c.get("/metrics").text


# -- live server: disconnects, floods, fairness ------------------------------------------------
def _busy(generator) -> bool:
    if generator.lock.acquire(blocking=False):
        generator.lock.release()
        return False
    return True


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_a_disconnected_non_streamed_client_frees_the_model_within_2s(generator):
    polls: list[float] = []
    real = generator.generate

    def generate(*args, cancel=None, **kw):  # observe the service's cancel callback being polled
        def polled() -> bool:
            polls.append(time.perf_counter())
            return cancel()

        return real(*args, cancel=polled, **kw)

    generator.generate = generate
    app = create_app(generator, limits=Limits(max_new_tokens=512))
    with AppThread(app) as live:
        body = json.dumps({"prompt": STORY, "max_tokens": 500}).encode()
        s = socket.create_connection(("127.0.0.1", live.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        # decoding (prefill is one uninterruptible step; under load it takes seconds)
        assert _wait(lambda: len(polls) >= 3, 120), "generation never started decoding"
        assert _busy(generator)
        s.close()
        t0 = time.perf_counter()
        assert _wait(lambda: not _busy(generator), 10)
        freed = time.perf_counter() - t0
        text = httpx.get(live.url + "/metrics").text
    print(f"model freed {freed:.2f} s after the client disconnected")
    assert 'daser_cancelled_total{reason="client_closed"} 1.0' in text  # stopped, not finished
    assert freed < 2.0, freed


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_health_stays_fast_under_40_deletes_during_an_ingest(generator):
    app = create_app(generator)
    long_doc = " ".join([PASS_DOC] * 220)  # ~3.5k tokens: seconds of precompute under the model lock
    with AppThread(app) as live:
        ingest = threading.Thread(target=lambda: httpx.post(
            live.url + "/v1/documents", json={"documents": [{"id": "long", "text": long_doc}]}, timeout=120))
        ingest.start()
        assert _wait(lambda: _busy(generator), 30)
        statuses: list[int] = []

        def delete(i: int) -> None:
            statuses.append(httpx.delete(f"{live.url}/v1/documents/d{i}", timeout=120).status_code)

        deleters = [threading.Thread(target=delete, args=(i,)) for i in range(40)]
        for t in deleters:
            t.start()
        lat = {"health": [], "metrics": [], "list": []}
        with httpx.Client(base_url=live.url, timeout=10) as c:
            for _ in range(8):
                for name, path in (("health", "/health"), ("metrics", "/metrics"), ("list", "/v1/documents")):
                    t0 = time.perf_counter()
                    assert c.get(path).status_code == 200
                    lat[name].append(time.perf_counter() - t0)
                time.sleep(0.1)
        still_busy = _busy(generator)
        for t in deleters + [ingest]:
            t.join(120)
    print({k: f"max {max(v) * 1000:.0f} ms" for k, v in lat.items()}, sorted(set(statuses)))
    assert still_busy, "the ingest ended before the probes: the test proved nothing"
    assert max(lat["health"]) < 1.0 and max(lat["metrics"]) < 1.0 and max(lat["list"]) < 1.0, lat
    assert len(statuses) == 40 and set(statuses) <= {200, 429}
    assert statuses.count(429) >= 30  # admission refused the flood instead of parking it in threads


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_a_second_key_is_admitted_while_the_first_floods(generator):
    app = create_app(generator, api_keys=["k1", "k2"], limits=Limits(max_pending=4, fair_share=0.5))
    filler = " ".join([PASS_DOC] * 60)  # ~1k tokens of uncached prefill each
    with AppThread(app) as live:
        statuses: list[int] = []

        def flood(i: int) -> None:
            r = httpx.post(live.url + "/v1/completions", headers={"Authorization": "Bearer k1"}, timeout=120,
                           json={"prompt": Q, "documents": [f"{i} {filler}"], "max_tokens": 4, "use_cache": False})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "fair_share"

        flooders = [threading.Thread(target=flood, args=(i,)) for i in range(6)]
        for t in flooders:
            t.start()
        assert _wait(lambda: httpx.get(live.url + "/health").json()["inflight"] == 2, 30)
        r = httpx.post(live.url + "/v1/completions", headers={"Authorization": "Bearer k2"}, timeout=120,
                       json={"prompt": Q, "max_tokens": 1})
        for t in flooders:
            t.join(120)
    assert r.status_code == 200, r.text
    assert statuses.count(429) == 4 and statuses.count(200) == 2, statuses


def test_idle_and_slow_header_connections_are_closed(generator):
    app = create_app(generator)
    with AppThread(app, header_timeout_s=1.0) as live:
        idle = socket.create_connection(("127.0.0.1", live.port))
        slow = socket.create_connection(("127.0.0.1", live.port))
        t0 = time.perf_counter()
        for part in (b"GET /health HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-Slow: 1\r\n"):
            slow.sendall(part)  # a header a piece at a time, never finished
            time.sleep(0.4)
        closed = {}
        for name, s in (("idle", idle), ("slow", slow)):
            s.settimeout(5)
            try:
                closed[name] = s.recv(1024) == b""
            except (ConnectionResetError, socket.timeout):
                closed[name] = False
            s.close()
        took = time.perf_counter() - t0
        # a normal request on a kept-alive connection still works
        with httpx.Client(base_url=live.url) as c:
            assert c.get("/health").status_code == 200
            time.sleep(1.3)
            assert c.get("/health").status_code == 200  # (a new connection if the old one was closed)
    assert closed == {"idle": True, "slow": True} and took < 4.0, (closed, took)


def test_the_model_gate_serves_waiters_in_arrival_order():
    from daser_rag.server.admission import ModelGate

    gate = ModelGate(threading.RLock(), workers=8, queue_timeout_s=10)
    order: list[int] = []
    release = threading.Event()

    def work(i: int):
        def fn():
            if i == 0:
                release.wait(5)
            order.append(i)
        return fn

    futs = []
    for i in range(8):
        futs.append(gate.submit(work(i), threading.Event()))
        time.sleep(0.03)  # arrive one after another
    release.set()
    for f in futs:
        f.result(10)
    assert order == list(range(8))
    gate.close()


def test_a_request_that_never_ran_is_not_charged(generator):
    """Admitted, charged, then timed out in the queue (503): its tokens go back to the key's budget."""
    app = create_app(generator, limits=Limits(queue_timeout_s=0.5, key_tokens_per_minute=60))
    body = {"prompt": "Count: " + " ".join(["one"] * 30), "max_tokens": 1}
    with TestClient(app) as c:
        assert generator.lock.acquire(timeout=10)
        try:
            for _ in range(3):  # each ~35 tokens; 3 charged would exceed 60 for good
                _err(c.post("/v1/completions", json=body), 503, "queue_timeout")
        finally:
            generator.lock.release()
        assert c.post("/v1/completions", json=body).status_code == 200
