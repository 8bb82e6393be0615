"""ASGI middleware (plain ASGI, so `receive` reaches the routes untouched and a route can see
its client disconnect): body size and body read deadline, request counting, last-resort 500,
and giving memory back after large bodies."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daser_rag.server.errors import error_response
from daser_rag.settings import LIMIT_MAX_LARGE_BODY_BYTES

log = logging.getLogger("daser_rag.server")


class _BodyTimeout(Exception):
    pass


LARGE_BODY_BYTES = 1 << 20
"""Bodies at least this large count as large (see `MemoryReturn`)."""


class MemoryReturn:
    """Large bodies in flight: their bytes are bounded (`reserve`), and after the last one is done
    freed heap memory is returned to the OS.

    A large body passes through several multi-megabyte buffers (the bytes, the decoded text,
    the parsed strings). glibc serves such sizes from its heaps once its dynamic mmap threshold
    has risen, and keeps the freed pages: twelve concurrent 8 MB bodies left the process 300+ MB
    larger for good. `malloc_trim(0)` hands free pages back; it runs in a worker thread, at most
    once per quiet period, and is a no-op where glibc is absent."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._n = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._trim: Any = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc
            self._trim = None

    def enter(self, size: int) -> bool:
        """Reserve `size` bytes for a large body; False when that would pass `max_bytes` (one body
        alone is always admitted, so a limit below the body limit cannot lock every upload out)."""
        with self._lock:
            if self._n and self._bytes + size > self.max_bytes:
                return False
            self._n += 1
            self._bytes += size
            return True

    def leave(self, size: int) -> bool:
        """True when this was the last large body in flight (the caller then calls `trim`)."""
        with self._lock:
            self._n -= 1
            self._bytes -= size
            return self._n == 0 and self._trim is not None

    def trim(self) -> None:
        import gc

        # young generations only: the request's cycles (an exception's traceback holding the
        # frame that held the body) are young; a full collection of a process with a model
        # loaded walks ~450k objects and would hold the GIL for most of a second
        gc.collect(1)
        with self._lock:
            if self._n:
                return  # another large body arrived meanwhile; its end trims
        self._trim(0)


class Guard:
    """Outermost app middleware.

    * A POST/PUT/PATCH body over `limit` bytes is refused before it is read (413), one without a
      Content-Length (chunked) with 411, a malformed Content-Length with 400.
    * The whole body must arrive within `body_timeout_s` (408): a slow client cannot hold a
      connection and a request slot open by trickling bytes.
    * Every response is counted by route template and status; an unhandled error becomes a 500
      in the API's error shape (the traceback goes to the log).
    """

    def __init__(self, app: ASGIApp, *, limit: int, body_timeout_s: float, requests: Any,
                 large_bytes: int = LIMIT_MAX_LARGE_BODY_BYTES.default) -> None:
        self.app, self.limit, self.body_timeout_s, self.requests = app, limit, body_timeout_s, requests
        self.memory = MemoryReturn(large_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "started": False}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        large = 0
        try:
            resp = self._refuse_body(scope)
            if resp is not None:
                await resp(scope, receive, counting_send)
                return
            size = self._body_size(scope)
            if size >= LARGE_BODY_BYTES:
                if not self.memory.enter(size):
                    await error_response(503, f"too many large request bodies in flight (at most "
                                         f"{self.memory.max_bytes} bytes of bodies of 1 MiB and over at once); "
                                         "retry shortly", "busy_large_bodies", "server_error",
                                         {"Retry-After": "1"})(scope, receive, counting_send)
                    return
                large = size
            await self.app(scope, self._timed_receive(receive), counting_send)
        except _BodyTimeout:
            if not status["started"]:
                await error_response(408, f"request body not received within {self.body_timeout_s:g} s",
                                     "request_timeout")(scope, receive, counting_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                await error_response(500, "internal server error (see the service log)", "internal_error",
                                     "server_error")(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.requests.labels(getattr(route, "path", "unmatched"), str(status["code"])).inc()
            if large and self.memory.leave(large):
                asyncio.get_running_loop().run_in_executor(None, self.memory.trim)

    @staticmethod
    def _body_size(scope: Scope) -> int:
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    return int(v)
                except ValueError:
                    return 0
        return 0

    def _refuse_body(self, scope: Scope) -> Response | None:
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"content-length")
        if raw is None:
            if headers.get(b"transfer-encoding"):
                return error_response(411, "request bodies must carry a Content-Length header", "length_required")
            return None
        try:
            size = int(raw)
        except ValueError:
            size = -1
        if size < 0:
            return error_response(400, "invalid Content-Length header", "invalid_content_length")
        if size > self.limit:
            return error_response(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes",
                                  "body_too_large")
        return None

    def _timed_receive(self, receive: Receive) -> Receive:
        state = {"body_done": False}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s

        async def timed() -> Message:
            if state["body_done"]:
                return await receive()  # after the body: disconnect notices, untouched
            left = deadline - loop.time()
            if left <= 0:
                raise _BodyTimeout()
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise _BodyTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        return timed
