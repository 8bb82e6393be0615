"""HTTP routes. Each is a thin adapter from the request to `Service` (server/service.py).

Order in every route: the API key (401), then the body (server/bodies.py: strict JSON, shape
limits, validation; a large body in a CPU lane), then the service's admission, token counting
and budget. No route declares a pydantic body parameter: FastAPI would parse it before the key
check.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from daser_rag.errors import UnknownDocumentError
from daser_rag.server import openai
from daser_rag.server.bodies import read_body
from daser_rag.server.metrics import CONTENT_TYPE
from daser_rag.server.schemas import (
    AddDocumentsRequest,
    ChatCompletionRequest,
    CompletionRequest,
    SplitRequest,
    UpdateDocumentRequest,
)
from daser_rag.server.service import Caller, Service
from daser_rag.types import Document

router = APIRouter()


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def _caller(request: Request) -> Caller:
    """API-key check, before the body is read (an unauthenticated client learns nothing)."""
    return _svc(request).auth(request)


def _share(svc: Service, request: Request, caller: Caller) -> str:
    """Whose preparation lanes a body's parsing counts against, before the body names a tenant:
    the key, or without keys the tenant in the header / query (else the default tenant)."""
    if caller.ns:
        return caller.ns
    try:
        return caller.share_key(svc.tenant_of(request, caller, None))
    except Exception:  # an invalid tenant is refused later, with its own message
        return caller.share_key("")


async def _body(request: Request, caller: Caller, model: Any, *, openai_fields: bool = False) -> Any:
    svc = _svc(request)
    return await read_body(request, model, svc.lanes, _share(svc, request, caller), openai_fields=openai_fields)


def _answer(out: Any, chat: bool = False, include_usage: bool = False) -> Response:
    if isinstance(out, dict):
        return JSONResponse(out)
    return StreamingResponse(openai.shape_stream(out, chat, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions")
async def completions(request: Request, caller: Caller = Depends(_caller)) -> Response:
    req = await _body(request, caller, CompletionRequest, openai_fields=True)
    return _answer(await _svc(request).generate(request, caller, req, req.prompt, False), False, req.include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, caller: Caller = Depends(_caller)) -> Response:
    req = await _body(request, caller, ChatCompletionRequest, openai_fields=True)
    return _answer(await _svc(request).generate(request, caller, req, openai.chat_question(req.messages), True),
                   True, req.include_usage)


@router.get("/v1/models")
async def models(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    return {"object": "list", "data": [{"id": svc.served_model, "object": "model", "owned_by": "daser-rag",
                                        "created": 0, "context_window": svc.engine.context_window,
                                        "engine": svc.engine.kind}]}


@router.post("/v1/documents")
async def add_documents(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    req = await _body(request, caller, AddDocumentsRequest)
    rc = svc.context(request, caller, req.tenant)
    docs = [Document(d.id, d.text, d.metadata) for d in req.documents]
    return await svc.ingest(request, caller, docs, req.precompute, rc)


@router.put("/v1/documents/{doc_id:path}")
async def update_document(doc_id: str, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    doc_id = svc.doc_id(doc_id)
    req = await _body(request, caller, UpdateDocumentRequest)
    rc = svc.context(request, caller, req.tenant)
    out = await svc.ingest(request, caller, [Document(doc_id, req.text, req.metadata)], req.precompute, rc)
    return {"document": out["documents"][0], "report": out["report"]}


@router.delete("/v1/documents/{doc_id:path}")
async def delete_document(doc_id: str, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    doc_id = svc.doc_id(doc_id)
    return await svc.delete(request, caller, doc_id, svc.context(request, caller, None))


@router.get("/v1/documents")
async def list_documents(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    rc = svc.context(request, caller, None)
    return {"object": "list", "data": await run_in_threadpool(svc.store.documents, rc.tenant)}


@router.get("/v1/documents/{doc_id:path}")
async def get_document(doc_id: str, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    doc_id = svc.doc_id(doc_id)
    rc = svc.context(request, caller, None)
    info = await run_in_threadpool(svc.store.document_info, doc_id, rc.tenant)
    if info is None:
        raise UnknownDocumentError(doc_id)
    keys = await run_in_threadpool(svc.store.document_chunk_keys, doc_id, rc.tenant)
    return {"id": doc_id, "digest": info.content_digest, "version": info.version, "num_chunks": info.num_chunks,
            "chunk_keys": keys}


async def _charged_text(request: Request, caller: Caller) -> tuple[Service, str, SplitRequest, int]:
    """A text-only request (split, tokenize) admitted like a completion (429) and its text counted
    against the per-request limit and charged to the token budget: (service, share, body, tokens).
    The caller releases the admission slot (`svc.completions.release(share)`)."""
    svc = _svc(request)
    req = await _body(request, caller, SplitRequest)
    tenant = svc.tenant_of(request, caller, None)
    share = caller.share_key(tenant)
    svc.completions.acquire(share)
    try:
        tokens = await svc.charge(caller, tenant, [req.text], window=False, register=False)
    except BaseException:
        svc.completions.release(share)
        raise
    return svc, share, req, tokens


@router.post("/v1/split")
async def split(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    """Splitting is tokenizing: admitted and charged (`_charged_text`), the split itself run in a
    CPU lane."""
    svc, share, req, _ = await _charged_text(request, caller)
    try:
        return {"chunks": await svc.lanes.run(share, svc.engine.split, req.text, req.max_tokens)}
    finally:
        svc.completions.release(share)


@router.post("/v1/tokenize")
async def tokenize(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    """How many tokens `text` takes in a prompt (as user text) and their ids, so that a remote
    client counts like the engine does (LangChain's get_token_ids / trim_messages, LlamaIndex's
    token counting). Admitted and charged like /v1/split: counting is tokenizing; the text is
    within the per-request limit once charged, so the ids are bounded too."""
    svc, share, req, tokens = await _charged_text(request, caller)
    try:
        ids = await svc.lanes.run(share, svc.engine.token_ids, req.text)
    finally:
        svc.completions.release(share)
    return {"tokens": tokens, "token_ids": ids}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return await _svc(request).health()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    svc = _svc(request)
    if svc.limits.protect_metrics:
        svc.auth(request)
    return Response(await run_in_threadpool(svc.metrics.render), media_type=CONTENT_TYPE)
