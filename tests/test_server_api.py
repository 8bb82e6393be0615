"""The HTTP API in-process (real model, no Redis): completions, streaming, documents, tenancy,
API keys, metrics, and a clear 4xx for every kind of bad input on every endpoint."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from daser_rag.server.app import Limits, create_app

PASS_DOC = "The pass statement is a null operation; when it is executed, nothing happens."
BREAK_DOC = "A break statement terminates the nearest enclosing loop, skipping the optional else clause."
Q = "What happens when pass is executed?"


@pytest.fixture
def client(generator):
    app = create_app(generator, limits=Limits(max_body_bytes=64_000, max_new_tokens=64, max_pending=4))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def keyed(generator):
    app = create_app(generator, api_keys=["key-one", "key-two"])
    with TestClient(app) as c:
        yield c


def _err(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["message"]
    return body["message"]


def test_completion_with_document_refs_hits_the_cache(client):
    r = client.post("/v1/documents", json={"documents": [{"id": "pass", "text": PASS_DOC}]})
    assert r.status_code == 200, r.text
    rec = r.json()["documents"][0]
    assert rec["num_chunks"] == 1 and rec["version"] == 1 and r.json()["report"]["computed_chunks"] == 1
    r = client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "pass"}], "max_tokens": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and "nothing" in out["choices"][0]["text"].lower()
    assert out["daser"]["cache_hits"] == 1 and out["daser"]["cache_misses"] == 0
    assert out["daser"]["chunk_keys"] == rec["chunk_keys"]
    assert out["usage"]["completion_tokens"] == len(out["daser"]["token_ids"])
    # inline texts and chunk refs work beside ids
    r = client.post("/v1/completions", json={"prompt": Q, "max_tokens": 2, "documents": [
        BREAK_DOC, {"kind": "chunk", "text": PASS_DOC, "id": "pass"}]})
    assert r.status_code == 200 and r.json()["daser"]["cache_hits"] == 1 and r.json()["daser"]["cache_misses"] == 1


def test_chat_and_streaming_match_the_plain_completion(client):
    client.post("/v1/documents", json={"documents": [{"id": "pass", "text": PASS_DOC}]})
    plain = client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "pass"}], "max_tokens": 6}).json()
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}],
                                                      "documents": [{"id": "pass"}], "max_tokens": 6}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"prompt": Q, "documents": [{"id": "pass"}],
                                                         "max_tokens": 6, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["daser"]["cache_hits"] == 1


def test_document_lifecycle(client):
    assert client.post("/v1/documents", json={"documents": [{"id": "a/b", "text": PASS_DOC}]}).status_code == 200
    assert client.get("/v1/documents").json()["data"] == ["a/b"]
    info = client.get("/v1/documents/a/b").json()
    assert info["version"] == 1 and info["num_chunks"] == 1
    up = client.put("/v1/documents/a/b", json={"text": BREAK_DOC}).json()
    assert up["document"]["version"] == 2 and up["report"]["dropped_chunks"] == 1
    assert up["document"]["chunk_keys"] != info["chunk_keys"]
    d = client.delete("/v1/documents/a/b").json()
    assert d["found"] and d["dropped_keys"] == up["document"]["chunk_keys"]
    again = client.delete("/v1/documents/a/b").json()  # idempotent
    assert not again["found"] and again["dropped_chunks"] == 0
    msg = _err(client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "a/b"}]}), 404)
    assert "a/b" in msg
    _err(client.get("/v1/documents/a/b"), 404)
    assert client.post("/v1/split", json={"text": PASS_DOC}).json()["chunks"] == [PASS_DOC]


def test_tenants_are_isolated(client):
    r = client.post("/v1/documents", json={"documents": [{"id": "p", "text": PASS_DOC}], "tenant": "acme"})
    assert r.status_code == 200
    assert client.get("/v1/documents", headers={"X-Daser-Tenant": "acme"}).json()["data"] == ["p"]
    assert client.get("/v1/documents").json()["data"] == []
    _err(client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "p"}], "tenant": "globex"}), 404)
    # the same text under another tenant is a miss: no cross-tenant hit, so nothing to time either
    r = client.post("/v1/completions", json={"prompt": Q, "documents": [PASS_DOC], "tenant": "globex",
                                             "max_tokens": 1}).json()
    assert r["daser"]["cache_hits"] == 0 and r["daser"]["cache_misses"] == 1
    acme = client.post("/v1/completions", json={"prompt": Q, "documents": [PASS_DOC], "tenant": "acme",
                                                "max_tokens": 1}).json()
    assert acme["daser"]["cache_hits"] == 1 and acme["daser"]["chunk_keys"] != r["daser"]["chunk_keys"]
    _err(client.get("/v1/documents", params={"tenant": "a"}, headers={"X-Daser-Tenant": "b"}), 400)


def test_api_keys(keyed):
    body = {"documents": [{"id": "p", "text": PASS_DOC}]}
    assert "API key" in _err(keyed.post("/v1/documents", json=body), 401)
    _err(keyed.post("/v1/documents", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert keyed.get("/health").status_code == 200  # probes need no key
    one = {"Authorization": "Bearer key-one"}
    two = {"X-API-Key": "key-two"}
    assert keyed.post("/v1/documents", json=body, headers=one).status_code == 200
    assert keyed.get("/v1/documents", headers=one).json()["data"] == ["p"]
    # another key naming the same (empty) tenant still lives in its own namespace
    assert keyed.get("/v1/documents", headers=two).json()["data"] == []
    _err(keyed.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "p"}]}, headers=two), 404)


def test_health_and_metrics(client):
    client.post("/v1/documents", json={"documents": [{"id": "pass", "text": PASS_DOC}]})
    client.post("/v1/completions", json={"prompt": Q, "documents": [{"id": "pass"}], "max_tokens": 2})
    client.delete("/v1/documents/pass")
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["redis"] == "disabled" and h["fingerprint"]
    text = client.get("/metrics").text
    for name in ("daser_ttft_seconds_bucket", "daser_store_hits_total", "daser_store_misses_total",
                 "daser_tier_bytes", "daser_recompute_share_bucket", "daser_evictions_total",
                 "daser_invalidations_total", "daser_chunk_hits_total"):
        assert name in text, name
    assert 'daser_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert "daser_invalidations_total 1.0" in text
    assert "daser_ttft_seconds_count 1.0" in text


BAD_COMPLETIONS = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": Q, "max_tokens": 0}, "max_tokens"),
    ({"prompt": Q, "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": Q, "temperature": -1}, "temperature"),
    ({"prompt": Q, "top_p": 0}, "top_p"),
    ({"prompt": Q, "n": 2}, "n"),
    ({"prompt": Q, "recompute_ratio": 1.5}, "recompute_ratio"),
    ({"prompt": Q, "documents": [{}]}, "documents"),
    ({"prompt": Q, "documents": [{"text": "   "}]}, "empty"),
    ({"prompt": Q, "documents": [{"id": "x\u0000y"}]}, "control"),
    ({"prompt": Q, "documents": [{"id": "x" * 300}]}, "id"),
    ({"prompt": Q, "documents": [{"kind": "chunk", "id": "x"}]}, "chunk"),
    ({"prompt": Q, "documents": [PASS_DOC] * 65}, "documents"),
    ({"prompt": Q, "tenant": "../etc"}, "tenant"),
    ({"prompt": Q, "stop": ["a"] * 10}, "stop"),
    ({"prompt": Q, "logit_bias": {"1": 5}}, "logit_bias"),
    ({"prompt": "word " * 6000, "documents": [PASS_DOC * 60] * 3}, "context window"),
]


@pytest.mark.parametrize("body,needle", BAD_COMPLETIONS)
def test_bad_completion_requests_get_a_clear_400(client, body, needle):
    msg = _err(client.post("/v1/completions", json=body), 400)
    assert needle in msg, msg


def test_bad_requests_on_every_endpoint(client):
    def post_raw(path, data, ctype="application/json"):
        return client.post(path, content=data, headers={"Content-Type": ctype})

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/documents", "/v1/split"):
        assert "malformed JSON" in _err(post_raw(path, b'{"prompt": "x",'), 400)
        _err(post_raw(path, b"[1, 2]"), 400)
        _err(post_raw(path, b"\xff\xfe garbage"), 400)
        assert "exceeds the limit" in _err(post_raw(path, b"x" * 70_000), 413)
    # chat
    for body, needle in [({"messages": []}, "messages"),
                         ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
                         ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
                         ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
                         ({"messages": [{"role": "user", "content": " "}]}, "empty")]:
        assert needle in _err(client.post("/v1/chat/completions", json=body), 400)
    # documents
    for body, needle in [({"documents": []}, "documents"),
                         ({"documents": [{"id": "", "text": "x"}]}, "id"),
                         ({"documents": [{"id": "a"}]}, "text"),
                         ({"documents": [{"id": "a", "text": " \n "}]}, "empty"),
                         ({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "unique"),
                         ({"documents": [{"id": "a", "text": "x"}], "precompute": "maybe"}, "precompute")]:
        assert needle in _err(client.post("/v1/documents", json=body), 400)
    assert "text" in _err(client.put("/v1/documents/a", json={}), 400)
    _err(client.put("/v1/documents/a", json={"text": "x", "tenant": "no spaces"}), 400)
    _err(client.delete("/v1/documents/a", params={"tenant": "bad tenant!"}), 400)
    _err(client.get("/v1/documents/" + "x" * 300), 400)
    _err(client.post("/v1/split", json={"text": ""}), 400)
    # routing
    assert "no route" in _err(client.get("/v1/nothing"), 404)
    _err(client.get("/v1/completions"), 405)
    # nothing stored was lost along the way
    assert client.post("/v1/documents", json={"documents": [{"id": "ok", "text": PASS_DOC}]}).status_code == 200
    assert client.get("/v1/documents/ok").status_code == 200


def test_admission_limit_answers_429(generator):
    app = create_app(generator, limits=Limits(max_pending=0))
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": Q})
        assert "busy" in _err(r, 429) and r.headers["retry-after"] == "1"
        assert c.get("/health").status_code == 200
