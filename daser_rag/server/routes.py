"""HTTP routes. Each is a thin adapter from the request to `Service` (server/service.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from daser_rag.errors import UnknownDocumentError
from daser_rag.server import openai
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
    return request.app.state.service


def _caller(request: Request) -> Caller:
    """API-key check, before the body is validated (an unauthenticated client learns nothing)."""
    return _svc(request).auth(request)


def _answer(out: Any) -> Response:
    if isinstance(out, dict):
        return JSONResponse(out)
    return StreamingResponse(out, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, caller: Caller = Depends(_caller)) -> Response:
    return _answer(await _svc(request).generate(request, caller, req, req.prompt, False))


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           caller: Caller = Depends(_caller)) -> Response:
    return _answer(await _svc(request).generate(request, caller, req, openai.chat_question(req.messages), True))


@router.get("/v1/models")
async def models(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    return {"object": "list", "data": [{"id": svc.served_model, "object": "model", "owned_by": "daser-rag",
                                        "created": 0}]}


@router.post("/v1/documents")
async def add_documents(req: AddDocumentsRequest, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    tenant = svc.tenant_of(request, caller, req.tenant, new_ok=True)
    docs = [Document(d.id, d.text, d.metadata) for d in req.documents]
    return await svc.ingest(request, caller, docs, req.precompute, tenant)


@router.put("/v1/documents/{doc_id:path}")
async def update_document(doc_id: str, req: UpdateDocumentRequest, request: Request,
                          caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    tenant = svc.tenant_of(request, caller, req.tenant, new_ok=True)
    out = await svc.ingest(request, caller, [Document(svc.doc_id(doc_id), req.text, req.metadata)], req.precompute,
                           tenant)
    return {"document": out["documents"][0], "report": out["report"]}


@router.delete("/v1/documents/{doc_id:path}")
async def delete_document(doc_id: str, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    tenant = svc.tenant_of(request, caller, None)
    return await svc.delete(request, caller, svc.doc_id(doc_id), tenant)


@router.get("/v1/documents")
async def list_documents(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    tenant = svc.tenant_of(request, caller, None)
    return {"object": "list", "data": await run_in_threadpool(svc.store.documents, tenant)}


@router.get("/v1/documents/{doc_id:path}")
async def get_document(doc_id: str, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    tenant = svc.tenant_of(request, caller, None)
    doc_id = svc.doc_id(doc_id)
    info = await run_in_threadpool(svc.store.document_info, doc_id, tenant)
    if info is None:
        raise UnknownDocumentError(doc_id)
    keys = await run_in_threadpool(svc.store.document_chunk_keys, doc_id, tenant)
    return {"id": doc_id, "digest": info.content_digest, "version": info.version, "num_chunks": info.num_chunks,
            "chunk_keys": keys}


@router.post("/v1/split")
async def split(req: SplitRequest, request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    return {"chunks": await run_in_threadpool(svc.generator.split, req.text)}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return await _svc(request).health()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    svc = _svc(request)
    if svc.limits.protect_metrics:
        svc.auth(request)
    return Response(await run_in_threadpool(svc.metrics.render), media_type=CONTENT_TYPE)
