"""The HTTP service: OpenAI-compatible completions with document refs, a document API,
/health and /metrics.

One model, one lock: the generator serializes model work, so generation runs in worker threads
while the event loop stays free for /health and /metrics. An admission counter bounds how many
generation requests may wait (beyond it: 429), which also keeps worker threads available.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daser_rag.errors import (
    ContextTooLongError,
    DaserError,
    InvalidInputError,
    UnknownDocumentError,
)
from daser_rag.kv.keys import text_digest
from daser_rag.server.metrics import CONTENT_TYPE, ServiceMetrics
from daser_rag.server.schemas import (
    AddDocumentsRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContextItem,
    SplitRequest,
    UpdateDocumentRequest,
    _GenParams,
    check_id,
    check_tenant,
)
from daser_rag.types import ChunkRef, Document

log = logging.getLogger("daser_rag.server")


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    max_new_tokens: int = 512
    max_pending: int = 16  # generation/ingest requests admitted at once (waiting included)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status,
                        headers=headers)


# -- request body size ---------------------------------------------------------------------------
class _BodyLimit:
    """Reject oversized bodies before they are read (413) and bodies of unknown length (411)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"content-length")
            resp = None
            if raw is None:
                if headers.get(b"transfer-encoding"):
                    resp = _error(411, "request bodies must carry a Content-Length header", code="length_required")
            else:
                try:
                    size = int(raw)
                except ValueError:
                    size = -1
                if size < 0:
                    resp = _error(400, "invalid Content-Length header")
                elif size > self.limit:
                    resp = _error(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes",
                                  code="body_too_large")
            if resp is not None:
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- admission ------------------------------------------------------------------------------------
class _Admission:
    def __init__(self, limit: int, gauge: Any) -> None:
        self.limit, self.gauge = limit, gauge
        self._n = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._n >= self.limit:
                raise ApiError(429, f"server busy: {self._n} requests in progress (limit {self.limit}); retry later",
                               type_="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
            self._n += 1
            self.gauge.inc()

    def release(self) -> None:
        with self._lock:
            self._n -= 1
            self.gauge.dec()

    @property
    def inflight(self) -> int:
        return self._n


def _contexts(items: Sequence[ContextItem | str]) -> list[Any]:
    out: list[Any] = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif it.kind == "chunk":
            out.append(ChunkRef(text=it.text, doc_id=it.id))
        elif it.id is not None and it.text is not None:
            out.append(Document(doc_id=it.id, text=it.text))
        elif it.id is not None:
            out.append(ChunkRef(doc_id=it.id))
        else:
            out.append(it.text)
    return out


def chat_question(messages: Sequence[ChatMessage]) -> str:
    """Fold a chat into the generator's single question. The system prompt that prefixes every
    cached chunk is fixed per service (it is part of the cache key), so request-level system
    messages travel with the question instead."""
    instructions = [m.text().strip() for m in messages if m.role in ("system", "developer") and m.text().strip()]
    turns = [m for m in messages[:-1] if m.role in ("user", "assistant")]
    parts = []
    if instructions:
        parts.append("Instructions: " + " ".join(instructions))
    if turns:
        parts.append("Conversation so far:\n" + "\n".join(f"{m.role.capitalize()}: {m.text().strip()}" for m in turns))
    parts.append(messages[-1].text().strip())
    return "\n\n".join(parts)


def create_app(
    generator: Any,
    *,
    api_keys: Sequence[str] | None = None,
    limits: Limits | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """An ASGI app around one generator (in-process `CacheAwareGenerator`)."""
    limits = limits or Limits()
    keys = [k for k in (api_keys or []) if k]
    store = generator.store
    metrics = ServiceMetrics(store)
    admission = _Admission(limits.max_pending, metrics.inflight)
    served_model = model_name or Path(str(getattr(generator.lm, "source", "daser"))).stem or "daser"
    max_new_cap = min(limits.max_new_tokens, int(generator.runner.max_positions) - 1)

    app = FastAPI(title="daser-rag", version="0.1.0", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.state.generator = generator
    app.state.metrics = metrics
    app.state.admission = admission

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                return _error(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}",
                              code="invalid_json")
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        return _error(400, "invalid request: " + "; ".join(problems[:5]), code="invalid_request")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(UnknownDocumentError)
    async def _unknown(request: Request, exc: UnknownDocumentError) -> JSONResponse:
        return _error(404, str(exc), "not_found_error", "unknown_document")

    @app.exception_handler(ContextTooLongError)
    async def _too_long(request: Request, exc: ContextTooLongError) -> JSONResponse:
        return _error(400, str(exc), code="context_length_exceeded")

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(400, str(exc), code="invalid_request")

    @app.exception_handler(DaserError)
    async def _daser(request: Request, exc: DaserError) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
        return _error(exc.status_code, msg, code=str(exc.status_code), headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = _error(500, "internal server error (see the service log)", "server_error")
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    # -- auth & tenancy -------------------------------------------------------------------
    def auth(request: Request) -> str:
        """Returns the key's tenant namespace ("" when no keys are configured)."""
        if not keys:
            return ""
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        for k in keys:
            if given and hmac.compare_digest(given.encode(), k.encode()):
                return "k" + hashlib.blake2b(k.encode(), digest_size=6).hexdigest()
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")

    def tenant_of(request: Request, key_ns: str, body_tenant: str | None) -> str:
        header = request.headers.get("x-daser-tenant")
        query = request.query_params.get("tenant")
        given = [t for t in (body_tenant, header, query) if t]
        if len(set(given)) > 1:
            raise ApiError(400, "conflicting tenant ids in body, X-Daser-Tenant header and query")
        try:
            tenant = check_tenant(given[0] if given else "")
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        # With API keys, a tenant lives inside its key's namespace: one key can never reach
        # (or time) another key's cache by naming its tenant.
        return f"{key_ns}/{tenant}" if key_ns else tenant

    def doc_id_param(doc_id: str) -> str:
        try:
            return check_id(doc_id)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc

    # -- generation -----------------------------------------------------------------------
    def gen_kwargs(req: _GenParams, tenant: str) -> dict[str, Any]:
        if req.max_tokens > max_new_cap:
            raise ApiError(400, f"max_tokens={req.max_tokens} exceeds this service's limit of {max_new_cap}")
        return dict(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    seed=req.seed, stop=req.stop, recompute_ratio=req.recompute_ratio, use_cache=req.use_cache,
                    tenant=tenant)

    def daser_block(result: Any) -> dict[str, Any]:
        d = result.to_dict()
        d.pop("text", None)
        return d

    def usage(result: Any) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    async def run_generation(request: Request, req: _GenParams, question: str, chat: bool, key_ns: str) -> Response:
        tenant = tenant_of(request, key_ns, req.tenant)
        kwargs = gen_kwargs(req, tenant)
        contexts = _contexts(req.documents)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        t0 = time.perf_counter()
        admission.acquire()
        if req.stream:
            return await stream_generation(question, contexts, kwargs, rid, created, chat, t0)
        try:
            result = await run_in_threadpool(generator.generate, question, contexts, **kwargs)
        finally:
            admission.release()
        total = time.perf_counter() - t0
        metrics.observe_result(result, total - (result.timings.total_s - result.timings.ttft_s), total)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": served_model,
                             "choices": [choice], "usage": usage(result), "daser": daser_block(result)})

    async def stream_generation(question: str, contexts: list[Any], kwargs: dict[str, Any], rid: str,
                                created: int, chat: bool, t0: float) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        first: dict[str, float] = {}

        def emit(kind: str, val: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, val))

        def produce() -> None:
            # The whole generation runs in this one thread: the generator's lock is taken and
            # released by the same thread, and a disconnect closes the generator here too.
            try:
                stream = generator.stream(question, contexts, **kwargs)
                it = iter(stream)
                for delta in it:
                    first.setdefault("t", time.perf_counter())
                    emit("delta", delta)
                    if cancel.is_set():
                        it.close()  # type: ignore[attr-defined]
                        return
                emit("done", stream.result)
            except BaseException as exc:  # delivered to the client (4xx/5xx or an SSE error event)
                emit("error", exc)
            finally:
                admission.release()

        threading.Thread(target=produce, name=f"daser-stream-{rid}", daemon=True).start()
        head = await events.get()
        if head[0] == "error":  # failed before the first token: a proper HTTP error
            cancel.set()
            raise head[1]

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": served_model, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def body() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk("")  # role announcement, as OpenAI does
                event = head
                while True:
                    kind, val = event
                    if kind == "delta":
                        yield chunk(val)
                    elif kind == "done":
                        total = time.perf_counter() - t0
                        ttft = first.get("t", time.perf_counter()) - t0
                        if val is not None:
                            metrics.observe_result(val, ttft, total)
                            yield chunk(None, val.finish_reason, usage=usage(val), daser=daser_block(val))
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        msg = f"{type(val).__name__}: {val}"
                        yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                        return
                    event = await events.get()
            finally:
                cancel.set()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request, key_ns: str = Depends(auth)) -> Response:
        return await run_generation(request, req, req.prompt, False, key_ns)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request,
                               key_ns: str = Depends(auth)) -> Response:
        return await run_generation(request, req, chat_question(req.messages), True, key_ns)

    @app.get("/v1/models")
    async def models(key_ns: str = Depends(auth)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "daser-rag",
                                            "created": 0}]}

    # -- documents ------------------------------------------------------------------------
    def doc_record(doc: Document, tenant: str) -> dict[str, Any]:
        info = store.index.info(doc.doc_id, tenant)
        keys = [generator.chunk_key_for(t, tenant) for t in generator.split(doc.text)]
        return {"id": doc.doc_id, "digest": text_digest(doc.text), "version": info.version if info else None,
                "num_chunks": len(keys), "chunk_keys": keys}

    async def ingest(docs: list[Document], precompute: bool, tenant: str) -> dict[str, Any]:
        admission.acquire()
        try:
            def work() -> dict[str, Any]:
                report = generator.add_documents(docs, tenant=tenant, precompute=precompute)
                return {"documents": [doc_record(d, tenant) for d in docs], "report": vars(report)}

            return await run_in_threadpool(work)
        finally:
            admission.release()

    @app.post("/v1/documents")
    async def add_documents(req: AddDocumentsRequest, request: Request,
                            key_ns: str = Depends(auth)) -> dict[str, Any]:
        tenant = tenant_of(request, key_ns, req.tenant)
        docs = [Document(d.id, d.text, d.metadata) for d in req.documents]
        return await ingest(docs, req.precompute, tenant)

    @app.put("/v1/documents/{doc_id:path}")
    async def update_document(doc_id: str, req: UpdateDocumentRequest, request: Request,
                              key_ns: str = Depends(auth)) -> dict[str, Any]:
        tenant = tenant_of(request, key_ns, req.tenant)
        out = await ingest([Document(doc_id_param(doc_id), req.text, req.metadata)], req.precompute, tenant)
        return {"document": out["documents"][0], "report": out["report"]}

    @app.delete("/v1/documents/{doc_id:path}")
    async def delete_document(doc_id: str, request: Request, key_ns: str = Depends(auth)) -> dict[str, Any]:
        tenant = tenant_of(request, key_ns, None)
        doc_id = doc_id_param(doc_id)

        def work() -> dict[str, Any]:
            known = store.index.info(doc_id, tenant) is not None or bool(store.index.chunk_keys(doc_id, tenant))
            dropped = generator.invalidate(doc_id, tenant)
            return {"id": doc_id, "found": known, "dropped_chunks": len(dropped), "dropped_keys": dropped}

        return await run_in_threadpool(work)

    @app.get("/v1/documents")
    async def list_documents(request: Request, key_ns: str = Depends(auth)) -> dict[str, Any]:
        tenant = tenant_of(request, key_ns, None)
        ids = await run_in_threadpool(store.index.documents, tenant)
        return {"object": "list", "data": ids}

    @app.get("/v1/documents/{doc_id:path}")
    async def get_document(doc_id: str, request: Request, key_ns: str = Depends(auth)) -> dict[str, Any]:
        tenant = tenant_of(request, key_ns, None)
        doc_id = doc_id_param(doc_id)
        info = await run_in_threadpool(store.index.info, doc_id, tenant)
        if info is None:
            raise UnknownDocumentError(doc_id)
        keys = await run_in_threadpool(store.index.chunk_keys, doc_id, tenant)
        return {"id": doc_id, "digest": info.content_digest, "version": info.version,
                "num_chunks": info.num_chunks, "chunk_keys": keys}

    @app.post("/v1/split")
    async def split(req: SplitRequest, key_ns: str = Depends(auth)) -> dict[str, Any]:
        return {"chunks": await run_in_threadpool(generator.split, req.text)}

    # -- operations -----------------------------------------------------------------------
    link = getattr(store.remote, "link", None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        redis_state = "disabled"
        if link is not None:
            redis_state = "up" if await run_in_threadpool(link.ping) else "down"
        return {"status": "degraded" if redis_state == "down" else "ok", "redis": redis_state,
                "model": served_model, "fingerprint": generator.fingerprint, "inflight": admission.inflight}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE)

    return app


def build_generator(
    model: str | None = None,
    cache_dir: str | None = None,
    redis_url: str | None = None,
    *,
    codec: str = "fp16",
    namespace: str | None = None,
    host_bytes: int | None = None,
    **generator_kw: Any,
) -> Any:
    """A CacheAwareGenerator whose store adds the shared Redis tier and document index."""
    from daser_rag.generate import CacheAwareGenerator
    from daser_rag.kv.doc_index import DocIndex
    from daser_rag.kv.store import DEFAULT_HOST_BYTES, KVStore, default_cache_dir
    from daser_rag.model.loader import load_model

    lm = load_model(model)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    kw: dict[str, Any] = {"codec": codec, "host_bytes": host_bytes or DEFAULT_HOST_BYTES}
    if redis_url:
        from daser_rag.kv.tiers.redis import RedisLink, RedisTier
        from daser_rag.kv.redis_index import RedisDocIndex

        link = RedisLink(redis_url, namespace=namespace or f"daser:{lm.fingerprint[:16]}")
        remote = RedisTier(link)
        kw.update(remote=remote, validate=remote.is_live,
                  index=RedisDocIndex(link, local=DocIndex(root / "index.sqlite")))
        if not link.ping():
            log.warning("Redis at %s is not reachable now; starting on local tiers", redis_url)
    store = KVStore(root, **kw)
    return CacheAwareGenerator(lm, store=store, **generator_kw)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model: str | None = None,
    cache_dir: str | None = None,
    redis_url: str | None = None,
    api_keys: list[str] | None = None,
    codec: str = "fp16",
    recompute_ratio: float = 0.15,
    chunk_tokens: int = 512,
    limits: Limits | None = None,
    log_level: str = "info",
    **kw: Any,
) -> None:
    """Run the service until interrupted (the `daser-rag serve` entry point)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    generator = build_generator(model, cache_dir, redis_url, codec=codec, recompute_ratio=recompute_ratio,
                                chunk_tokens=chunk_tokens, **kw)
    app = create_app(generator, api_keys=api_keys, limits=limits)
    log.info("daser-rag service on http://%s:%d (redis: %s, cache: %s)", host, port, redis_url or "off",
             generator.store.root)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
