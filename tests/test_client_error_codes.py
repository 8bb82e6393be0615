"""DaserClient maps the service's structured error codes and fields to the library's exceptions,
never its message text: a reworded message changes nothing on the client."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from daser_rag import errors
from daser_rag.errors import ContextTooLongError, InvalidInputError, UnknownDocumentError
from daser_rag.server.app import Limits, create_app
from daser_rag.server.client import DaserClient, ServiceError, error_from


def _client(http: TestClient, **kw) -> DaserClient:
    client = DaserClient("http://testserver", **kw)
    client._http.close()
    client._http = http
    return client


def test_client_maps_codes_and_fields_not_message_text(generator, monkeypatch):
    # Messages reworded on the service (quotes and numbers in odd places): the client must not care.
    monkeypatch.setattr(errors.UnknownDocumentError, "__str__", lambda self: "it's 'gone' (no 'such' thing)")
    monkeypatch.setattr(errors.ContextTooLongError, "__init__", _reworded_too_long)
    with TestClient(create_app(generator, api_keys=["k1"], limits=Limits(key_tokens_per_minute=10**6))) as http:
        client = _client(http, api_key="k1")
        with pytest.raises(UnknownDocumentError) as unknown:
            client.document("alpha/beta")
        assert unknown.value.doc_id == "alpha/beta"
        body = http.get("/v1/documents/alpha%2Fbeta", headers={"Authorization": "Bearer k1"}).json()["error"]
        assert body["code"] == "unknown_document" and body["doc_id"] == "alpha/beta"

        window = generator.context_window
        with pytest.raises(ContextTooLongError) as too_long:
            client.generate("What is it?", ["word " * (window + 10)], max_new_tokens=4)
        assert too_long.value.limit == window and too_long.value.needed > window

        with pytest.raises(InvalidInputError):
            client.generate("q", None, max_new_tokens=4, recompute_ratio=0.5, selector="nope")
        with pytest.raises(ServiceError) as denied:
            _client(http, api_key="wrong").list_documents()
        assert denied.value.status == 401 and denied.value.code == "invalid_api_key"


def _reworded_too_long(self, needed: int, limit: int) -> None:
    ValueError.__init__(self, f"too long: {limit} is the 'limit', you sent '{needed}'")
    self.needed, self.limit = needed, limit


def test_error_from_uses_code_first_then_status():
    assert isinstance(error_from(400, {"code": "whatever_new", "message": "x"}), InvalidInputError)
    assert isinstance(error_from(503, {"code": "whatever_new", "message": "x"}), ServiceError)
    exc = error_from(404, {"code": "unknown_document", "message": "reworded 'x'", "doc_id": "d1"})
    assert isinstance(exc, UnknownDocumentError) and exc.doc_id == "d1"
    exc = error_from(400, {"code": "context_length_exceeded", "message": "m", "needed": 9000, "limit": 8192})
    assert isinstance(exc, ContextTooLongError) and (exc.needed, exc.limit) == (9000, 8192)
    busy = error_from(429, {"code": "overloaded", "message": "busy"})
    assert isinstance(busy, ServiceError) and busy.code == "overloaded"
