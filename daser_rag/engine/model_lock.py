"""The embedded engine's model lock, which also knows whether a request wants the model.

Background work (prefix-tree materialization) may use the model only while no request wants it,
and must give it back within one layer when one arrives. A plain RLock cannot tell whether
someone waits for it, so this one counts the threads blocked in `acquire` and the requests the
service has queued for the engine but not yet finished (`note_queued` / `note_done`).
"""

from __future__ import annotations

import _thread
import threading
from typing import Any


class ModelLock(_thread.RLock):  # type: ignore[misc]  # final in typeshed, subclassable at run time
    """A reentrant lock (`threading.RLock` semantics) that reports demand for the model."""

    def __init__(self) -> None:
        super().__init__()
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._queued: set[str] = set()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._count_lock:
            self._waiting += 1
        try:
            return bool(super().acquire(blocking, timeout))
        finally:
            with self._count_lock:
                self._waiting -= 1

    def __enter__(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.acquire(blocking, timeout)

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire_quietly(self) -> bool:
        """Take the lock only if it is free, without counting as demand (background work)."""
        return bool(super().acquire(False))

    def note_queued(self, request_id: str) -> None:
        """A request waits in the service's queue for this engine: the model is wanted."""
        with self._count_lock:
            self._queued.add(request_id)

    def note_done(self, request_id: str) -> None:
        with self._count_lock:
            self._queued.discard(request_id)

    def wanted(self) -> bool:
        """True while a thread waits for the lock or a queued request has not finished."""
        with self._count_lock:
            return self._waiting > 0 or bool(self._queued)


__all__ = ["ModelLock"]
