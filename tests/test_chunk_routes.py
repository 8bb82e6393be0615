"""The index-time chunk routes (/v1/chunks*) that DaserClient speaks for the adapters: the same
hardening as the document routes (key first, strict bodies and ids, per-request token limit, the
key's token budget, nothing written on refusal), and the engine protocol's semantics through HTTP
(keys as the engine computes them, refs added or replaced, exactly the stale KV dropped)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from daser_rag.context import SHARED_TENANT
from daser_rag.errors import InvalidInputError
from daser_rag.server.app import Limits, create_app
from daser_rag.server.client import DaserClient, ServiceError

A = "The lighthouse on Corran Island was built in 1871."
B = "Copper wire carries current with little loss over short runs."
C = "The orchard grows forty varieties of apple."


def _client(http: TestClient, **kw) -> DaserClient:
    client = DaserClient("http://testserver", **kw)
    client._http.close()
    client._http = http
    return client


def test_chunk_routes_compute_tie_and_replace_like_the_engine(generator):
    with TestClient(create_app(generator, limits=Limits(key_tokens_per_minute=10**6))) as http:
        client = _client(http)
        info = client.chunk_info([A, B])
        assert [i.key for i in info] == [generator.chunk_key_for(A), generator.chunk_key_for(B)]
        assert [i.tokens for i in info] == [c.tokens for c in generator.chunk_info([A, B])]
        assert client.stored([i.key for i in info]) == [False, False]

        report = client.add_chunks({"doc": [A, B]})
        assert (report.chunks, report.computed, report.reused) == (2, 2, 0)
        assert report.keys == {"doc": [i.key for i in info]}
        assert client.stored(report.keys["doc"]) == [True, True]  # computed at index time, before any query
        assert client.document_keys("doc") == generator.store.document_chunk_keys("doc", SHARED_TENANT)
        assert sorted(client.document_keys("doc")) == sorted(report.keys["doc"])

        again = client.add_chunks({"doc": [A], "other": [A, C]})  # A is shared now, C new
        assert (again.computed, again.reused) == (1, 2)
        dropped = client.replace_refs("doc", [B])  # A still referenced by "other": kept
        assert dropped == [] and client.stored([info[0].key]) == [True]
        replaced = client.add_chunks({"other": [C]}, replace=True)  # A: no document references it now
        assert replaced.dropped == 1 and client.stored([info[0].key]) == [False]
        assert client.document_keys("nobody") == []
        with pytest.raises(InvalidInputError, match="fit the model's window"):  # checked before anything is written
            client.add_chunks({"big": [A, "word " * generator.context_window]})
        assert client.document_keys("big") == []
        assert client.split("one. two. three. four.", max_tokens=8) == generator.split("one. two. three. four.", 8)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_chunk_routes_are_hardened_like_the_document_routes(generator):
    with TestClient(create_app(generator, api_keys=["k1"], limits=Limits(key_tokens_per_minute=400))) as http:
        assert http.post("/v1/chunks", json={"documents": [{"id": "d", "texts": [A]}]}).status_code == 401
        client = _client(http, api_key="k1")
        with pytest.raises(InvalidInputError):  # an id the service refuses, before anything is sent
            client.add_chunks({"a/../b": [A]})
        bad = http.post("/v1/chunks", headers={"Authorization": "Bearer k1"},
                        json={"documents": [{"id": "d", "texts": [A], "extra": 1}]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        bad = http.post("/v1/chunks/stored", headers={"Authorization": "Bearer k1"}, json={"keys": ["../etc"]})
        assert bad.status_code == 400
        # the token budget is charged by the texts' tokens (refused once spent: 429, nothing written)
        n = generator.count_tokens([A])
        for _ in range(400 // n):
            client.chunk_info([A])
        with pytest.raises(ServiceError) as spent:
            client.add_chunks({"late": [A]})
        assert spent.value.status == 429 and spent.value.code == "token_budget"
