"""The service's state and request logic, independent of HTTP routing: auth and tenancy, limits
checked before any write, and model work run through admission and the model gate."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from daser_rag.api import ContextItem
from daser_rag.context import SHARED_TENANT, RequestContext
from daser_rag.engine.protocol import Engine
from daser_rag.errors import ContextTooLongError, InvalidInputError, UnknownDocumentError
from daser_rag.kv.keys import text_digest
from daser_rag.params import GenerationParams
from daser_rag.server import openai
from daser_rag.server.admission import Admission, Cancelled, CpuSlots, ModelGate, TenantRegistry, TokenBudget
from daser_rag.server.errors import ApiError
from daser_rag.server.metrics import ServiceMetrics
from daser_rag.server.schemas import _GenParams, check_id, check_tenant
from daser_rag.server.settings import Limits
from daser_rag.types import ChunkRef, Document, GenerationResult


@dataclass(frozen=True)
class Caller:
    ns: str  # the key's namespace ("" without API keys)

    def share_key(self, tenant: str) -> str:
        """Whose fair share and token budget a request counts against: its API key, or without
        keys its tenant."""
        return self.ns or f"tenant:{tenant}"


class Service:
    def __init__(self, engine: Engine, *, api_keys: Sequence[str] | None = None, limits: Limits | None = None,
                 model_name: str | None = None, default_tenant: str = SHARED_TENANT) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"the service needs an engine (daser_rag.engine.protocol.Engine), got {type(engine).__name__}")
        self.engine = engine
        self.store = engine.store
        self.limits = limits = limits or Limits()
        self.keys = [k for k in (api_keys or []) if k]
        self.default_tenant = check_tenant(default_tenant)
        self.metrics = ServiceMetrics(self.store)
        self.completions = Admission("completion", limits.max_pending, limits.fair_share, self.metrics.inflight)
        self.writes = Admission("document", limits.max_pending_documents, limits.fair_share,
                                self.metrics.inflight_documents)
        self.gate = ModelGate(engine.model_lock, limits.max_pending + limits.max_pending_documents,
                              limits.queue_timeout_s)
        self.budget = TokenBudget(limits.key_tokens_per_minute)
        self.tenants = TenantRegistry(limits.max_tenants_per_key)
        self.metrics.tenants.set_function(lambda: self.tenants.count)
        self.served_model = model_name or engine.model_name
        self.max_new_cap = min(limits.max_new_tokens, engine.context_window - 1)

    # -- auth & tenancy ---------------------------------------------------------------------
    def auth(self, request: Request) -> Caller:
        if not self.keys:
            return Caller("")
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        for k in self.keys:
            if given and hmac.compare_digest(given.encode(), k.encode()):
                return Caller("k" + hashlib.blake2b(k.encode(), digest_size=6).hexdigest())
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")

    def tenant_of(self, request: Request, caller: Caller, body_tenant: str | None, *, new_ok: bool = False) -> str:
        """The request's tenant (namespaced by its key). Resolving registers nothing: `charge`
        registers a new tenant name once the request is accepted (`new_ok` is kept for callers
        written against the older signature and has no effect)."""
        headers = request.headers.getlist("x-daser-tenant")
        queries = request.query_params.getlist("tenant")
        if len(headers) > 1 or len(queries) > 1:
            raise ApiError(400, "the tenant was given more than once (repeated X-Daser-Tenant header or ?tenant=)",
                           code="duplicate_tenant", param="tenant")
        given = [t for t in (body_tenant, *headers, *queries) if t]
        if len(set(given)) > 1:
            raise ApiError(400, "conflicting tenant ids in body, X-Daser-Tenant header and query",
                           code="conflicting_tenant", param="tenant")
        try:
            tenant = check_tenant(given[0] if given else self.default_tenant)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_tenant", param="tenant") from exc
        # With API keys, a tenant lives inside its key's namespace: one key can never reach
        # (or time) another key's cache by naming its tenant.
        return f"{caller.ns}/{tenant}" if caller.ns else tenant

    def context(self, request: Request, caller: Caller, body_tenant: str | None, *, params: _GenParams | None = None,
                request_id: str | None = None) -> RequestContext:
        """The one `RequestContext` of a request: its tenant (`tenant_of`), and for a completion
        its generation parameters (checked against this service's limits) and id. Everything
        below the routes gets the tenant from it."""
        tenant = self.tenant_of(request, caller, body_tenant)
        if params is None:
            return RequestContext(tenant=tenant, request_id=request_id)
        return RequestContext(tenant=tenant, params=self.params(params, tenant), request_id=request_id)

    @staticmethod
    def doc_id(doc_id: str) -> str:
        try:
            return check_id(doc_id)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_document_id") from exc

    # -- limits checked before anything is written ---------------------------------------------
    def count_tokens(self, texts: Sequence[str], stop_above: int | None = None) -> int:
        """Tokens of `texts` as user text (control-token strings count as the tokens that spell
        them, daser_rag/prompt.py). With `stop_above`, counting stops once the total passes it
        (the result is then some number above it): a request over the limit costs at most the
        limit's worth of tokenizing plus one text, however large its body."""
        total = 0
        for t in texts:
            total += self.engine.count_tokens([t])
            if stop_above is not None and total > stop_above:
                break
        return total

    @functools.cached_property
    def lanes(self) -> CpuSlots:
        """CPU lanes for request preparation (large-body parsing, token counting, splitting)."""
        lim = self.limits
        return CpuSlots("request preparation", lim.max_preparing, math.ceil(lim.max_preparing * lim.fair_share),
                        lim.prepare_wait_s)

    async def charge(self, caller: Caller, tenant: str, texts: Sequence[str], *, window: bool,
                     register: bool = True) -> int:
        """The last check before an admitted request's work starts: count its new text (bounded
        work, in a CPU lane), refuse it over the per-request limit or the context window, then
        register its tenant name (`register`) and charge its key's token budget. Call it after
        admission and every other check: only accepted requests use up tenant names and budget."""
        share = caller.share_key(tenant)
        lim = self.limits.max_request_tokens
        window_size = self.engine.context_window
        tokens = await self.lanes.run(share, self.count_tokens, texts, lim)  # exact up to the limit
        if tokens > lim:
            raise ApiError(413, f"this request asks the model to compute more than {lim} tokens of new text (the "
                           f"limit per request; split it)", code="too_many_tokens")
        if window and tokens > window_size:
            raise ContextTooLongError(tokens, window_size)
        bare = tenant.split("/", 1)[1] if caller.ns else tenant
        new = register and self.tenants.admit(caller.ns, bare)
        try:
            self.budget.charge(share, tokens)
        except BaseException:
            if new:
                self.tenants.forget(caller.ns, bare)
            raise
        return tokens

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.served_model, "daser"):
            raise ApiError(404, f"unknown model {model!r}; this service serves {self.served_model!r} (see /v1/models)",
                           code="model_not_found", type_="not_found_error")

    def params(self, req: _GenParams, tenant: str) -> GenerationParams:
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.limits.default_max_tokens,
                                                                            self.max_new_cap)
        if max_tokens > self.max_new_cap:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this service's limit of {self.max_new_cap}",
                           code="max_tokens_exceeded", param="max_tokens")
        try:
            return GenerationParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed, stop=tuple(req.stop or ()),
                                    recompute_ratio=req.recompute_ratio, selector=req.selector,
                                    use_cache=req.use_cache, calibration=req.calibration, tenant=tenant)
        except InvalidInputError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from exc

    def _known_documents(self, ids: set[str], tenant: str) -> None:
        for doc_id in sorted(ids):
            if self.store.document_info(doc_id, tenant) is None:
                raise UnknownDocumentError(doc_id)

    # -- generation ----------------------------------------------------------------------------
    async def generate(self, request: Request, caller: Caller, req: _GenParams, question: str,
                       chat: bool) -> dict[str, Any] | AsyncIterator[str]:
        """The OpenAI-shaped answer (a dict), or with `stream` its server-sent events."""
        self.check_model(req.model)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        rc = self.context(request, caller, req.tenant, params=req, request_id=rid)
        tenant, params = rc.tenant, rc.params
        ctx = openai.contexts(req.documents)
        inline = [c if isinstance(c, str) else c.text for c in ctx
                  if isinstance(c, str) or getattr(c, "text", None) is not None]
        # A chunk naming a document must name a known one (no ghost documents), checked, like
        # the size of all new text, before anything is registered or computed.
        refs = {c.doc_id for c in ctx if isinstance(c, ChunkRef) and c.doc_id is not None and c.text is not None}
        share = caller.share_key(tenant)
        self.completions.acquire(share)  # admission before any expensive work (429 costs nothing)
        try:
            if refs:
                await run_in_threadpool(self._known_documents, refs, tenant)
            tokens = await self.charge(caller, tenant, [question, *inline], window=True)  # last: tenant + budget
        except BaseException:
            self.completions.release(share)
            raise
        created, t0 = int(time.time()), time.perf_counter()
        # PCR look-ahead: while this request waits for the model, its chunk KV is prefetched
        # toward host RAM and protected from eviction (released when it is over, however it ends)
        await run_in_threadpool(self.engine.queued, rid, ctx, tenant)

        ran = threading.Event()

        def done() -> None:
            self.engine.finished(rid)
            if not ran.is_set():  # timed out in the queue or abandoned before it started
                self.budget.refund(share, tokens)
            self.completions.release(share)

        def run() -> GenerationResult:
            ran.set()
            self.engine.started(rid)
            return self.engine.generate(question, ctx, params=params, cancel=cancel)

        stop = threading.Event()
        deadline = time.monotonic() + self.limits.request_timeout_s

        def cancel() -> bool:
            return stop.is_set() or time.monotonic() > deadline

        if req.stream:
            return await self._stream(request, question, ctx, params, cancel, stop, done, ran, rid, created, chat,
                                      t0)
        try:
            result = await self.gate.run(run, stop, request, on_done=done)
        except Cancelled:
            self.metrics.cancelled.labels("client_closed").inc()
            raise ApiError(499, "the client closed the request", code="client_closed") from None
        if result.finish_reason == "cancelled":
            if stop.is_set():
                self.metrics.cancelled.labels("client_closed").inc()
                raise ApiError(499, "the client closed the request", code="client_closed")
            self.metrics.cancelled.labels("deadline_exceeded").inc()
            raise ApiError(504, f"the request ran past its deadline of {self.limits.request_timeout_s:g} s "
                           "and was stopped", code="deadline_exceeded", type_="server_error")
        total = time.perf_counter() - t0
        self.metrics.observe_result(result, total - (result.timings.total_s - result.timings.ttft_s), total)
        return openai.completion(result, rid, created, self.served_model, chat)

    async def _stream(self, request: Request, question: str, ctx: list[ContextItem], params: GenerationParams,
                      cancel: Callable[[], bool], stop: threading.Event, done: Callable[[], None],
                      ran: threading.Event, rid: str, created: int, chat: bool, t0: float) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        first: dict[str, float] = {}

        def emit(kind: str, val: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, val))

        def produce() -> None:
            # The whole generation runs in this one thread, which holds the model lock; the
            # generator polls `cancel` between tokens, so a gone client frees the model.
            ran.set()
            self.engine.started(rid)
            stream = self.engine.stream(question, ctx, params=params, cancel=cancel)
            for delta in stream:
                first.setdefault("t", time.perf_counter())
                emit("delta", delta)
            emit("done", stream.result)

        def finished(f: Future[None]) -> None:
            done()
            exc = f.exception()
            if exc is not None:
                emit("error", exc)

        self.gate.submit(produce, stop).add_done_callback(finished)
        while True:  # until the first event, watch for a client that gives up waiting
            try:
                head = await asyncio.wait_for(events.get(), 0.1)
                break
            except asyncio.TimeoutError:
                if not stop.is_set() and await request.is_disconnected():
                    stop.set()
        if head[0] == "error":  # failed before the first token: a proper HTTP error
            stop.set()
            if isinstance(head[1], Cancelled):
                raise ApiError(499, "the client closed the request", code="client_closed")
            raise head[1]
        return self._sse(events, head, stop, rid, created, chat, t0, first)

    async def _sse(self, events: asyncio.Queue[tuple[str, Any]], head: tuple[str, Any], stop: threading.Event,
                   rid: str, created: int, chat: bool, t0: float, first: dict[str, float]) -> AsyncIterator[str]:
        model = self.served_model
        ended = False
        try:
            if chat:
                yield openai.sse_chunk("", rid, created, model, chat)  # role announcement, as OpenAI does
            event = head
            while True:
                kind, val = event
                if kind == "delta":
                    yield openai.sse_chunk(val, rid, created, model, chat)
                elif kind == "done":
                    if val is not None and val.finish_reason == "cancelled" and not stop.is_set():
                        self.metrics.cancelled.labels("deadline_exceeded").inc()
                        yield openai.sse_error(f"the request ran past its deadline of "
                                               f"{self.limits.request_timeout_s:g} s and was stopped",
                                               "deadline_exceeded")
                    elif val is not None:
                        total = time.perf_counter() - t0
                        self.metrics.observe_result(val, first.get("t", time.perf_counter()) - t0, total)
                        yield openai.sse_chunk(None, rid, created, model, chat, val.finish_reason,
                                               usage=openai.usage(val), daser=openai.daser_block(val))
                    ended = True
                    yield "data: [DONE]\n\n"
                    return
                else:
                    code = getattr(val, "code", None) or "internal_error"
                    ended = True
                    yield openai.sse_error(f"{type(val).__name__}: {val}", code)
                    return
                event = await events.get()
        finally:
            if not ended:  # the client went away mid-stream
                self.metrics.cancelled.labels("client_closed").inc()
            stop.set()

    # -- documents ----------------------------------------------------------------------------
    def _doc_record(self, doc: Document, tenant: str) -> dict[str, Any]:
        info = self.store.document_info(doc.doc_id, tenant)
        keys = self.engine.chunk_keys(doc.text, tenant)
        return {"id": doc.doc_id, "digest": text_digest(doc.text), "version": info.version if info else None,
                "num_chunks": len(keys), "chunk_keys": keys}

    async def ingest(self, request: Request, caller: Caller, docs: list[Document], precompute: bool,
                     rc: RequestContext) -> dict[str, Any]:
        tenant = rc.tenant
        share = caller.share_key(tenant)
        self.writes.acquire(share)  # admission first: a refused request registers and costs nothing
        try:
            tokens = await self.charge(caller, tenant, [d.text for d in docs], window=False)
        except BaseException:
            self.writes.release(share)
            raise
        ran = threading.Event()

        def done() -> None:
            if not ran.is_set():  # timed out in the queue or abandoned: nothing was written
                self.budget.refund(share, tokens)
            self.writes.release(share)

        def work() -> dict[str, Any]:
            ran.set()
            report = self.engine.add_documents(docs, tenant=tenant, precompute=precompute)
            records = [self._doc_record(d, tenant) for d in docs]
            written = getattr(self.store, "written_version", None)
            for rec in records:  # the version this request wrote, not a newer one committed since
                v = written(rec["id"], tenant) if callable(written) else None
                if v is not None:
                    rec["version"] = v
            return {"documents": records, "report": vars(report)}

        try:
            return await self.gate.run(work, threading.Event(), request, on_done=done)
        except Cancelled:
            raise ApiError(499, "the client closed the request", code="client_closed") from None

    async def delete(self, request: Request, caller: Caller, doc_id: str, rc: RequestContext) -> dict[str, Any]:
        tenant = rc.tenant
        share = caller.share_key(tenant)
        self.writes.acquire(share)

        def work() -> dict[str, Any]:
            known = (self.store.document_info(doc_id, tenant) is not None
                     or bool(self.store.document_chunk_keys(doc_id, tenant)))
            dropped = self.engine.invalidate(doc_id, tenant)
            return {"id": doc_id, "found": known, "dropped_chunks": len(dropped), "dropped_keys": dropped}

        try:
            return await self.gate.run(work, threading.Event(), request,
                                       on_done=lambda: self.writes.release(share))
        except Cancelled:
            raise ApiError(499, "the client closed the request", code="client_closed") from None

    # -- operations ----------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        redis_state = "disabled"
        if self.store.remote_health(probe=False) is not None:
            # a PING with a 0.25 s timeout (or the breaker's verdict while it holds Redis down);
            # should the thread pool be slow to run it, the breaker's current state answers
            try:
                up = await asyncio.wait_for(run_in_threadpool(self.store.remote_health), 0.5)
            except asyncio.TimeoutError:
                up = self.store.remote_health(probe=False)
            redis_state = "up" if up else "down"
        # storage trouble seen recently: Redis refusing writes (OOM, READONLY), a full local
        # disk, the index mirror not written (kv.store.KVStore.problems; cheap, no I/O)
        problems_fn = getattr(self.store, "problems", None)
        reasons = list(problems_fn()) if callable(problems_fn) else []
        if redis_state == "down" and not any("unreachable" in r for r in reasons):
            reasons.insert(0, "Redis unreachable")
        engine = await run_in_threadpool(self.engine.health)  # in-memory state, no model or network call
        if not engine.ok:
            reasons.append(f"engine {engine.engine}: no instance available")
        out: dict[str, Any] = {
            "status": "degraded" if redis_state == "down" or reasons else "ok", "redis": redis_state,
            "model": self.served_model, "fingerprint": self.engine.fingerprint,
            "inflight": self.completions.inflight, "inflight_documents": self.writes.inflight,
            "engine": {"kind": engine.engine, "ok": engine.ok, **engine.detail}}
        if reasons:
            out["reasons"] = reasons
        return out
