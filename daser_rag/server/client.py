"""DaserClient: the remote service behind the same interface as the in-process generator.

It satisfies `daser_rag.api.KVGenerator` and the engine protocol's index-time side
(`daser_rag.engine.protocol.IndexingEngine`: chunk keys, chunk KV computed at index time and tied
to its document, refs replaced), so the LlamaIndex and LangChain adapters switch from
`CacheAwareGenerator(...)` to `DaserClient("http://host:port")` with one setting and still
precompute chunk KV when they index. Service errors
come back as the library's own exception types (unknown document -> UnknownDocumentError, bad
input -> InvalidInputError, ...), so callers handle both the same way. Needs httpx, not torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from daser_rag.errors import (
    ContextTooLongError,
    DaserError,
    EngineUnavailableError,
    InvalidInputError,
    UnknownDocumentError,
)
from daser_rag.engine.chunk_index import ChunkInfo, ChunkReport, progress_bar
from daser_rag.engine.protocol import IndexingEngine, Progress
from daser_rag.params import GenerationParams
from daser_rag.server.ids import normalize_id
from daser_rag.server.schemas import MAX_CHUNKS_PER_CALL, MAX_KEYS_PER_CALL
from daser_rag.settings import HOST, PORT, TENANT
from daser_rag.types import ChunkRef, Document, GenerationResult, IngestReport, Timings


class ServiceError(DaserError):
    """The service answered with an error that is not the caller's input (5xx, 401, 429, ...)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"daser service error {status}: {message}")
        self.status, self.message, self.code = status, message, code


def error_from(status: int, err: dict[str, Any]) -> DaserError:
    """The taxonomy exception (daser_rag/errors.py) for a service error body, chosen by its
    structured `code` and fields (server/errors.py), never by its message text, which is for
    people and may be reworded: an unknown document keeps its id (`doc_id`), a context that does
    not fit its numbers (`needed`, `limit`). A code this client does not know falls back on the
    HTTP status: the caller's input (400/413/422) or the service (ServiceError)."""
    message = str(err.get("message", ""))
    code = err.get("code")
    if code == "unknown_document":
        return UnknownDocumentError(str(err.get("doc_id", "")))
    if code == "context_length_exceeded":
        exc = ContextTooLongError(_int(err.get("needed")), _int(err.get("limit")))
        return exc
    if code == "engine_unavailable":
        retry = err.get("retry_after_s")
        return EngineUnavailableError(message, float(retry) if isinstance(retry, (int, float)) else 2.0)
    if code in _INPUT_CODES or status in (400, 413, 422):
        return InvalidInputError(message)
    return ServiceError(status, message, code if isinstance(code, str) else None)


_INPUT_CODES = frozenset({
    "invalid_request", "invalid_json", "invalid_document_id", "invalid_tenant", "duplicate_tenant",
    "conflicting_tenant", "max_tokens_exceeded", "too_many_tokens", "body_too_large", "body_too_complex",
    "unsupported_parameter"})
"""Codes that mean the caller's input was refused (InvalidInputError)."""


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class RemoteIngestReport(IngestReport):
    records: list[dict[str, Any]] | None = None  # per document: id, digest, version, chunk_keys


def _id(doc_id: Any) -> str:
    """The id as the service stores it (NFC), or InvalidInputError before anything is sent for
    an id the service would refuse (daser_rag/server/ids.py): ids such as ".." or "a/../b"
    cannot even be put in a URL that reaches the document."""
    try:
        return normalize_id(doc_id)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def _context_item(item: Any) -> Any:
    if isinstance(item, str):
        return item
    if isinstance(item, Document):
        return {"id": _id(item.doc_id), "text": item.text}
    if isinstance(item, ChunkRef):
        if item.text is None:
            if not item.doc_id:
                raise InvalidInputError("a ChunkRef needs text, doc_id, or both")
            return {"id": _id(item.doc_id)}
        return {"kind": "chunk", "text": item.text, **({"id": _id(item.doc_id)} if item.doc_id else {})}
    raise InvalidInputError(f"context items must be str, ChunkRef or Document, got {type(item).__name__}")


def _result(text: str, daser: dict[str, Any]) -> GenerationResult:
    d = dict(daser)
    d.pop("recompute_share", None)
    d["timings"] = Timings(**d.get("timings", {}))
    d["text"] = text
    fields = GenerationResult.__dataclass_fields__
    return GenerationResult(**{k: v for k, v in d.items() if k in fields})


class RemoteTokenStream:
    """Iterate for text deltas; `.result` holds the GenerationResult once the stream ended."""

    def __init__(self, client: DaserClient, body: dict[str, Any], cancel: Any = None) -> None:
        self._client, self._body, self._cancel = client, body, cancel
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        parts: list[str] = []
        with self._client._http.stream("POST", "/v1/completions", json=self._body,
                                       headers=self._client._headers()) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._client._raise(resp)
            for line in resp.iter_lines():
                if self._cancel is not None and self._cancel():
                    return  # leaving the block closes the connection: the service stops generating
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    raise error_from(500, {"message": "stream failed", **err})
                delta = event["choices"][0].get("text") or ""
                if delta:
                    parts.append(delta)
                    yield delta
                if "daser" in event:
                    self.result = _result("".join(parts), event["daser"])


class DaserClient:
    """HTTP client for `daser-rag serve` / `python -m daser_rag.server`."""

    def __init__(
        self,
        base_url: str = f"http://{HOST.default}:{PORT.default}",  # where `serve` listens by default
        *,
        api_key: str | None = None,
        tenant: str = TENANT.default,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        keepalive_expiry: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.tenant = tenant
        # An idle pooled connection is dropped by the client before the server's keep-alive timeout
        # (5 s by default) can close it: when both sides time out at the same instant, the next
        # request goes out on a socket the server is closing and fails with "connection reset".
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                  limits=httpx.Limits(keepalive_expiry=keepalive_expiry))
        self._model_card: dict[str, Any] | None = None

    # -- plumbing ------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def _raise(resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error", {})
            if not isinstance(err, dict):
                raise ValueError
        except ValueError:
            err = {"message": resp.text}
        raise error_from(resp.status_code, err)

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, headers=self._headers(), **kw)
        if resp.status_code >= 400:
            self._raise(resp)
        return resp.json()

    def _tenant(self, tenant: str | None) -> str:
        return self.tenant if tenant is None else tenant

    def _completion_body(self, question: str, contexts: Sequence[Any] | None, params: GenerationParams | None,
                         kwargs: dict[str, Any]) -> dict[str, Any]:
        explicit_tenant = "tenant" in kwargs or (params is not None and params.tenant)
        p = GenerationParams.from_kwargs(params, **kwargs)  # validated here, the same way as in-process
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        body: dict[str, Any] = {"prompt": question, "documents": [_context_item(c) for c in contexts or []],
                                "max_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                                "top_k": p.top_k, "use_cache": p.use_cache}
        for name in ("seed", "recompute_ratio", "selector", "calibration"):
            if getattr(p, name) is not None:
                body[name] = getattr(p, name)
        if p.stop:
            body["stop"] = list(p.stop)
        tenant = p.tenant if explicit_tenant else self.tenant
        if tenant:
            body["tenant"] = tenant
        return body

    # -- KVGenerator ---------------------------------------------------------------------------
    def generate(self, question: str, contexts: Sequence[Any] | None = None, params: GenerationParams | None = None,
                 *, cancel: Any = None, **kwargs: Any) -> GenerationResult:
        """`cancel` is accepted for interface parity; a blocking HTTP call cannot poll it (closing
        the client's connection cancels the request on the service)."""
        body = self._completion_body(question, contexts, params, dict(kwargs))
        out = self._request("POST", "/v1/completions", json=body)
        return _result(out["choices"][0]["text"], out["daser"])

    def stream(self, question: str, contexts: Sequence[Any] | None = None, params: GenerationParams | None = None,
               *, cancel: Any = None, **kwargs: Any) -> RemoteTokenStream:
        """`cancel()` is polled between deltas; True closes the stream (the service stops too)."""
        body = self._completion_body(question, contexts, params, dict(kwargs))
        body["stream"] = True
        return RemoteTokenStream(self, body, cancel)

    def add_documents(self, documents: Iterable[Document], *, tenant: str | None = None, precompute: bool = True,
                      progress: Any = False) -> RemoteIngestReport:
        docs = list(documents)
        for d in docs:
            if not isinstance(d, Document):
                raise InvalidInputError(f"add_documents expects Document objects, got {type(d).__name__}")
        if not docs:
            return RemoteIngestReport(records=[])
        body: dict[str, Any] = {"documents": [{"id": _id(d.doc_id), "text": d.text, "metadata": _jsonable(d.metadata)}
                                              for d in docs], "precompute": precompute}
        if self._tenant(tenant):
            body["tenant"] = self._tenant(tenant)
        out = self._request("POST", "/v1/documents", json=body)
        return RemoteIngestReport(**out["report"], records=out["documents"])

    def update_document(self, doc_id: str, text: str, *, tenant: str | None = None,
                        precompute: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "precompute": precompute}
        if self._tenant(tenant):
            body["tenant"] = self._tenant(tenant)
        out: dict[str, Any] = self._request("PUT", f"/v1/documents/{_quote(_id(doc_id))}", json=body)
        return out

    def invalidate(self, doc_id: str, tenant: str | None = None) -> list[str]:
        params = {"tenant": self._tenant(tenant)} if self._tenant(tenant) else None
        dropped: list[str] = self._request("DELETE", f"/v1/documents/{_quote(_id(doc_id))}",
                                           params=params)["dropped_keys"]
        return dropped

    def split(self, text: str, max_tokens: int | None = None) -> list[str]:
        body: dict[str, Any] = {"text": text}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        chunks: list[str] = self._request("POST", "/v1/split", json=body)["chunks"]
        return chunks

    # -- IndexingEngine: index-time chunks (routes /v1/chunks*, server/chunk_routes.py) ----------
    # An empty tenant here means the client's own tenant (as for the adapters' default tenant).
    def _chunk_tenant(self, body: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        t = self._tenant(tenant or None)
        if t:
            body["tenant"] = t
        return body

    def chunk_info(self, texts: Sequence[str], *, tenant: str | None = None) -> list[ChunkInfo]:
        texts = _texts(texts)
        out: list[ChunkInfo] = []
        for i in range(0, len(texts), MAX_CHUNKS_PER_CALL):
            body = self._chunk_tenant({"texts": texts[i:i + MAX_CHUNKS_PER_CALL]}, tenant)
            out += [ChunkInfo(str(c["key"]), int(c["tokens"]))
                    for c in self._request("POST", "/v1/chunks/info", json=body)["chunks"]]
        return out

    def add_chunks(self, chunks: Mapping[str, Sequence[str]], *, tenant: str | None = None, progress: Progress = False,
                   precompute: bool = True, replace: bool = False) -> ChunkReport:
        """Sent in requests of whole documents, about `CHUNKS_PER_REQUEST` chunks each, so that
        progress (in chunks) advances as the service computes them."""
        if not isinstance(chunks, Mapping):
            raise InvalidInputError(f"chunks must map document ids to lists of texts, got {type(chunks).__name__}")
        docs = [(_id(d), _texts(t)) for d, t in chunks.items()]
        batches: list[list[tuple[str, list[str]]]] = [[]]
        for doc in docs:
            if batches[-1] and sum(len(t) for _, t in batches[-1]) + len(doc[1]) > CHUNKS_PER_REQUEST:
                batches.append([])
            batches[-1].append(doc)
        report = ChunkReport()
        with progress_bar(sum(len(t) for _, t in docs), progress, "precomputing chunk KV (service)") as step:
            for batch in batches:
                if not batch:
                    continue
                body = self._chunk_tenant({"documents": [{"id": d, "texts": t} for d, t in batch],
                                           "precompute": precompute, "replace": replace}, tenant)
                out = self._request("POST", "/v1/chunks", json=body)
                for rec in out["documents"]:
                    report.keys[str(rec["id"])] = [str(k) for k in rec["keys"]]
                r = out["report"]
                report.chunks += int(r["chunks"])
                report.computed += int(r["computed"])
                report.reused += int(r["reused"])
                report.dropped += int(r["dropped"])
                report.mapped += int(r.get("mapped", 0))  # a service older than the field sends none
                report.seconds += float(r["seconds"])
                for _ in range(sum(len(t) for _, t in batch)):
                    step()
        return report

    def replace_refs(self, doc_id: str, texts: Sequence[str], *, tenant: str | None = None) -> list[str]:
        body = self._chunk_tenant({"id": _id(doc_id), "texts": _texts(texts)}, tenant)
        dropped: list[str] = self._request("POST", "/v1/chunks/refs", json=body)["dropped_keys"]
        return dropped

    def document_keys(self, doc_id: str, *, tenant: str | None = None) -> list[str]:
        try:
            keys: list[str] = self.document(doc_id, tenant or None)["chunk_keys"]
        except UnknownDocumentError:
            return []
        return keys

    def stored(self, keys: Sequence[str]) -> list[bool]:
        keys = list(keys)
        out: list[bool] = []
        for i in range(0, len(keys), MAX_KEYS_PER_CALL):
            out += [bool(b) for b in
                    self._request("POST", "/v1/chunks/stored", json={"keys": keys[i:i + MAX_KEYS_PER_CALL]})["stored"]]
        return out

    def _model(self) -> dict[str, Any]:
        if self._model_card is None:
            self._model_card = dict(self._request("GET", "/v1/models")["data"][0])
        return self._model_card

    @property
    def model_name(self) -> str:
        """The model the service serves (its OpenAI `model` id)."""
        return str(self._model()["id"])

    @property
    def context_window(self) -> int:
        """Positions the service's engine attends over (prompt + answer)."""
        return int(self._model()["context_window"])

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the texts take in a prompt, counted by the service's own tokenizer."""
        return sum(int(self._request("POST", "/v1/tokenize", json={"text": t})["tokens"]) for t in texts if t)

    def token_ids(self, text: str) -> list[int]:
        """The ids the service's own tokenizer gives `text` (one `/v1/tokenize`, charged like a split)."""
        if not text:
            return []
        return [int(i) for i in self._request("POST", "/v1/tokenize", json={"text": text})["token_ids"]]

    # -- extras ----------------------------------------------------------------------------------
    def list_documents(self, tenant: str | None = None) -> list[str]:
        params = {"tenant": self._tenant(tenant)} if self._tenant(tenant) else None
        ids: list[str] = self._request("GET", "/v1/documents", params=params)["data"]
        return ids

    def document(self, doc_id: str, tenant: str | None = None) -> dict[str, Any]:
        params = {"tenant": self._tenant(tenant)} if self._tenant(tenant) else None
        out: dict[str, Any] = self._request("GET", f"/v1/documents/{_quote(_id(doc_id))}", params=params)
        return out

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = self._request("GET", "/health")
        return out

    def metrics(self) -> str:
        resp = self._http.get("/metrics")
        resp.raise_for_status()
        return resp.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CHUNKS_PER_REQUEST = 16
"""Chunk texts per /v1/chunks request from `add_chunks` (a document is never split across two)."""


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of chunk texts, not a single string")
    out = list(texts)
    if any(not isinstance(t, str) or not t.strip() for t in out):
        raise InvalidInputError("a chunk text must be a non-empty string")
    return out


def _quote(doc_id: str) -> str:
    from urllib.parse import quote

    return quote(doc_id, safe="")


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in (meta or {}).items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = str(v)
    return out


if TYPE_CHECKING:  # mypy proves the client is an engine for the adapters' index-time side
    def _is_indexing_engine(client: DaserClient) -> IndexingEngine:
        return client
