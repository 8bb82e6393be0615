"""ASGI middleware (plain ASGI, so `receive` reaches the routes untouched and a route can see
its client disconnect): body size and body read deadline, request counting, last-resort 500."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from daser_rag.server.errors import error_response

log = logging.getLogger("daser_rag.server")


class _BodyTimeout(Exception):
    pass


class Guard:
    """Outermost app middleware.

    * A POST/PUT/PATCH body over `limit` bytes is refused before it is read (413), one without a
      Content-Length (chunked) with 411, a malformed Content-Length with 400.
    * The whole body must arrive within `body_timeout_s` (408): a slow client cannot hold a
      connection and a request slot open by trickling bytes.
    * Every response is counted by route template and status; an unhandled error becomes a 500
      in the API's error shape (the traceback goes to the log).
    """

    def __init__(self, app: Any, *, limit: int, body_timeout_s: float, requests: Any) -> None:
        self.app, self.limit, self.body_timeout_s, self.requests = app, limit, body_timeout_s, requests

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "started": False}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            resp = self._refuse_body(scope)
            if resp is not None:
                await resp(scope, receive, counting_send)
                return
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

    def _refuse_body(self, scope: dict) -> Any:
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

    def _timed_receive(self, receive: Callable) -> Callable:
        state = {"body_done": False}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s

        async def timed() -> dict:
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
