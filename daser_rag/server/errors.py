"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: every 4xx and 5xx
names the problem and carries a stable `code` clients can branch on; `param` names the request
field at fault when there is one (null otherwise), as OpenAI's clients expect the key."""

from __future__ import annotations

import errno
import json
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daser_rag.errors import (
    ContextTooLongError,
    DaserError,
    EngineUnavailableError,
    InvalidInputError,
    UnknownDocumentError,
)
from daser_rag.kv.tiers.redis import RedisRefused, RedisUnavailable

log = logging.getLogger("daser_rag.server")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
               413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
               429: "rate_limited", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers
        self.param = param


def error_response(status: int, message: str, code: str, type_: str = "invalid_request_error",
                   headers: dict[str, str] | None = None, param: str | None = None,
                   **fields: object) -> JSONResponse:
    """`fields`: structured details a client maps without reading the message (e.g. `doc_id` of
    an unknown document, `needed`/`limit` of a context that does not fit): the message is for
    people and may be reworded, the code and fields are the contract."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code, **fields}},
                        status_code=status, headers=headers)


def busy(message: str, code: str, retry_after: float = 1.0) -> ApiError:
    return ApiError(429, message, code=code, type_="rate_limit_error",
                    headers={"Retry-After": str(max(1, round(retry_after)))})


def unavailable(message: str, code: str, retry_after: float = 1.0) -> ApiError:
    return ApiError(503, message, code=code, type_="server_error",
                    headers={"Retry-After": str(max(1, round(retry_after)))})


def storage_full(exc: BaseException) -> bool:
    """Is `exc` a full local disk (ENOSPC / quota, or SQLite's "database or disk is full")?"""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def _disk_full(exc: BaseException) -> JSONResponse:
    return error_response(503, f"the service's local disk is full, so this write was not applied; retry later "
                          f"({type(exc).__name__}: {exc})", "storage_full", "server_error", {"Retry-After": "10"})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                return error_response(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}",
                                      "invalid_json")
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            param = param or loc or None
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        return error_response(400, "invalid request: " + "; ".join(problems[:5]), "invalid_request", param=param)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.type, exc.headers, exc.param)

    @app.exception_handler(UnknownDocumentError)
    async def _unknown(request: Request, exc: UnknownDocumentError) -> JSONResponse:
        return error_response(404, str(exc), "unknown_document", "not_found_error", doc_id=exc.doc_id)

    @app.exception_handler(ContextTooLongError)
    async def _too_long(request: Request, exc: ContextTooLongError) -> JSONResponse:
        return error_response(400, str(exc), "context_length_exceeded", needed=exc.needed, limit=exc.limit)

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request")

    @app.exception_handler(RedisUnavailable)
    async def _redis(request: Request, exc: RedisUnavailable) -> JSONResponse:
        # A write that cannot reach the shared registry is refused, never applied locally only:
        # an acknowledged write must not be rolled back when Redis returns.
        return error_response(503, f"the shared document registry (Redis) is unavailable, so this write was "
                              f"not applied; retry shortly ({exc})", "redis_unavailable", "server_error",
                              {"Retry-After": "1"})

    @app.exception_handler(EngineUnavailableError)
    async def _engine_down(request: Request, exc: EngineUnavailableError) -> JSONResponse:
        return error_response(503, str(exc), "engine_unavailable", "server_error",
                              {"Retry-After": str(max(1, round(exc.retry_after_s)))}, retry_after_s=exc.retry_after_s)

    @app.exception_handler(RedisRefused)
    async def _redis_refused(request: Request, exc: RedisRefused) -> JSONResponse:
        # An error reply (OOM at maxmemory, READONLY during a failover, ...): Redis is there
        # but cannot take writes now. Nothing was written (each write is one script, refused
        # whole). Reads of stored documents keep working.
        if exc.reason == "OOM":
            return error_response(503, "the shared document registry (Redis) is full (maxmemory), so this write "
                                  f"was not applied; retry later, or delete documents ({exc})", "redis_full",
                                  "server_error", {"Retry-After": "5"})
        return error_response(503, f"the shared document registry (Redis) refused this request ({exc.reason}), so "
                              f"nothing was applied; retry shortly ({exc})", "redis_refused", "server_error",
                              {"Retry-After": "2"})

    @app.exception_handler(sqlite3.Error)
    async def _sqlite(request: Request, exc: sqlite3.Error) -> JSONResponse:
        # the local index (the authority without Redis): each write is one transaction, rolled
        # back on failure, so a full disk refuses the write whole
        if storage_full(exc):
            return _disk_full(exc)
        log.error("local index error", exc_info=exc)
        return error_response(500, f"{type(exc).__name__}: {exc}", "internal_error", "server_error")

    @app.exception_handler(OSError)
    async def _os(request: Request, exc: OSError) -> JSONResponse:
        if storage_full(exc):
            return _disk_full(exc)
        log.error("request failed", exc_info=exc)
        return error_response(500, f"{type(exc).__name__}: {exc}", "internal_error", "server_error")

    @app.exception_handler(DaserError)
    async def _daser(request: Request, exc: DaserError) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"{type(exc).__name__}: {exc}", "internal_error", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
        return error_response(exc.status_code, msg, _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}"),
                              headers=getattr(exc, "headers", None))
