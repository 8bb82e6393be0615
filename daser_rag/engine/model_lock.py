"""The embedded engine's model lock, which also knows whether a request wants the model.

Background work (prefix-tree materialization) may use the model only while no request wants it,
and must give it back within one layer when one arrives. A plain RLock cannot tell whether
someone waits for it, so this one counts the threads that hold it or are blocked in `acquire`
(background work takes it with `acquire_quietly`, which does not count) and the requests the
service has queued for the engine but not yet finished (`note_queued` / `note_done`).
It also measures what background work costs requests: how long a request waited because
background work held the model (`background_waits`), the only way it can delay one.
"""

from __future__ import annotations

import _thread
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class BackgroundWaits:
    """Requests delayed because background work held the model when they asked for it."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


class ModelLock(_thread.RLock):  # type: ignore[misc]  # final in typeshed, subclassable at run time
    """A reentrant lock (`threading.RLock` semantics) that reports demand for the model."""

    def __init__(self) -> None:
        super().__init__()
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._queued: set[str] = set()
        self._held = 0  # acquisitions by requests (reentrant ones included) not released yet
        self._background = False  # held by acquire_quietly, not released yet
        self.background_waits = BackgroundWaits()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count_lock:
            self._waiting += 1
            behind_background = self._background
        t0 = time.perf_counter() if behind_background else 0.0
        got = False
        try:
            got = bool(super().acquire(blocking, timeout))
            return got
        finally:
            with self._count_lock:
                self._waiting -= 1
                self._held += int(got)
                if behind_background:
                    w = time.perf_counter() - t0
                    bw = self.background_waits
                    bw.count += 1
                    bw.total_s += w
                    bw.max_s = max(bw.max_s, w)

    def __enter__(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.acquire(blocking, timeout)

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        super().release()
        with self._count_lock:
            self._held = max(0, self._held - 1)

    def acquire_quietly(self) -> bool:
        """Take the lock only if it is free, without counting as demand (background work);
        give it back with `release_quietly`."""
        got = bool(super().acquire(False))
        if got:
            with self._count_lock:
                self._background = True
        return got

    def release_quietly(self) -> None:
        with self._count_lock:
            self._background = False
        super().release()

    def note_queued(self, request_id: str) -> None:
        """A request waits in the service's queue for this engine: the model is wanted."""
        with self._count_lock:
            self._queued.add(request_id)

    def note_done(self, request_id: str) -> None:
        with self._count_lock:
            self._queued.discard(request_id)

    def wanted(self) -> bool:
        """True while a request holds the lock or waits for it, or a queued request has not
        finished: the model is not idle."""
        with self._count_lock:
            return self._waiting > 0 or self._held > 0 or bool(self._queued)


__all__ = ["BackgroundWaits", "ModelLock"]
