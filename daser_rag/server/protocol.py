"""uvicorn's h11 protocol with a header deadline: a connection must deliver a complete request head
within `header_timeout_s` of opening (or of its previous response), or it is closed. uvicorn
itself times out only idle keep-alive connections, so without this a client could hold sockets
open forever by sending nothing, or a header a byte at a time (slowloris)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(header_timeout_s: float) -> type:
    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _heads_seen = 0

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_deadline, self._heads_seen)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self, heads_seen: int) -> None:
            if self._heads_seen == heads_seen and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request head arrived
                self._heads_seen += 1
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return TimedH11Protocol
