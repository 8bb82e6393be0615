"""Index-time chunk routes: what an adapter pointed at the service needs to precompute chunk KV
when it indexes (the engine protocol's `IndexingEngine` side, daser_rag/engine/protocol.py).

- `POST /v1/chunks`: compute the missing KV of chunk texts (each text one chunk, not split) and
  tie the keys to their documents (`replace`: exactly these refs); a write.
- `POST /v1/chunks/refs`: one document's refs become exactly the keys of these texts; a write.
- `POST /v1/chunks/info`: keys and token counts of texts as chunks (tokenizing, no write).
- `POST /v1/chunks/stored`: which chunk keys the store holds.

Same hardening as the document routes (server/routes.py): the API key first, then the body
(strict schema, size caps, ids validated), then admission (429 before any work), the per-request
token limit and the key's token budget (`Service.charge`, refunded when the work never ran),
and model work through the model gate. Charged tokens are those of the texts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request

from daser_rag.server.admission import Admission, Cancelled
from daser_rag.server.errors import ApiError
from daser_rag.server.routes import _body, _caller, _svc
from daser_rag.server.schemas import AddChunksRequest, ChunkInfoRequest, ReplaceRefsRequest, StoredRequest
from daser_rag.server.service import Caller, Service

router = APIRouter()
T = TypeVar("T")


async def _admitted(request: Request, svc: Service, caller: Caller, lane: Admission, tenant: str,
                    texts: Sequence[str], work: Callable[[], T], *, gate: bool) -> T:
    """Admission, then the token check and charge, then `work` (through the model gate when it
    may run model work); the charge is refunded if the work never started."""
    share = caller.share_key(tenant)
    lane.acquire(share)
    try:
        tokens = await svc.charge(caller, tenant, texts, window=False) if texts else 0
    except BaseException:
        lane.release(share)
        raise
    ran = threading.Event()

    def done() -> None:
        if not ran.is_set():
            svc.budget.refund(share, tokens)
        lane.release(share)

    def run() -> T:
        ran.set()
        return work()

    if not gate:
        try:
            return await svc.lanes.run(share, run)
        finally:
            done()
    try:
        result: T = await svc.gate.run(run, threading.Event(), request, on_done=done)
        return result
    except Cancelled:
        raise ApiError(499, "the client closed the request", code="client_closed") from None


@router.post("/v1/chunks")
async def add_chunks(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    req = await _body(request, caller, AddChunksRequest)
    tenant = svc.tenant_of(request, caller, req.tenant)
    chunks = {d.id: list(d.texts) for d in req.documents}

    def work() -> dict[str, Any]:
        report = svc.engine.add_chunks(chunks, tenant=tenant, precompute=req.precompute, replace=req.replace)
        return {"documents": [{"id": d, "keys": keys} for d, keys in report.keys.items()],
                "report": {"chunks": report.chunks, "computed": report.computed, "reused": report.reused,
                           "dropped": report.dropped, "mapped": report.mapped, "seconds": report.seconds}}

    return await _admitted(request, svc, caller, svc.writes, tenant, [t for ts in chunks.values() for t in ts], work,
                           gate=True)


@router.post("/v1/chunks/refs")
async def replace_refs(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    req = await _body(request, caller, ReplaceRefsRequest)
    tenant = svc.tenant_of(request, caller, req.tenant)

    def work() -> dict[str, Any]:
        dropped = svc.engine.replace_refs(req.id, list(req.texts), tenant=tenant)
        return {"id": req.id, "dropped_chunks": len(dropped), "dropped_keys": dropped}

    return await _admitted(request, svc, caller, svc.writes, tenant, list(req.texts), work, gate=True)


@router.post("/v1/chunks/info")
async def chunk_info(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    req = await _body(request, caller, ChunkInfoRequest)
    tenant = svc.tenant_of(request, caller, req.tenant)

    def work() -> dict[str, Any]:
        return {"chunks": [{"key": c.key, "tokens": c.tokens}
                           for c in svc.engine.chunk_info(list(req.texts), tenant=tenant)]}

    return await _admitted(request, svc, caller, svc.completions, tenant, list(req.texts), work, gate=False)


@router.post("/v1/chunks/stored")
async def stored(request: Request, caller: Caller = Depends(_caller)) -> dict[str, Any]:
    svc = _svc(request)
    req = await _body(request, caller, StoredRequest)
    tenant = svc.tenant_of(request, caller, None)

    def work() -> dict[str, Any]:
        return {"stored": svc.engine.stored(list(req.keys))}

    return await _admitted(request, svc, caller, svc.completions, tenant, [], work, gate=False)
