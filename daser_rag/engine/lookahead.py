"""PCR on the request path: the service tells the engine which requests wait in its queue, and
their chunk KV is loaded toward host RAM and protected from eviction until they have run.

Without it a request whose chunks were evicted to disk (or live only in Redis) pays that read
inside its own TTFT, and a burst of requests can evict each other's KV while they wait. The
service knows its queue; the queue drives the prefetcher (`kv/prefetch.py`, which never holds a
lock a running request needs) and the store's look-ahead protection (`KVStore.protect`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypedDict

from daser_rag.kv import DEFAULT_PREFETCH_WINDOW
from daser_rag.kv.prefetch import Prefetcher
from daser_rag.kv.store import KVStore


class LookAheadStats(TypedDict, total=False):
    """`LookAhead.stats()`: always window and queued; the prefetcher's counters
    (`kv.prefetch.PrefetchStats`) once it has started."""

    window: int
    queued: int
    loaded: int
    already_in_ram: int
    missing: int
    claimed_waits: int
    dropped: int
    bytes: int


class LookAhead:
    def __init__(self, store: KVStore, window: int = DEFAULT_PREFETCH_WINDOW) -> None:
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"prefetch window must be an integer >= 0, got {window!r}")
        self.store = store
        self.window = window
        self._prefetcher: Prefetcher | None = None  # its thread starts on first use
        self._keys: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def queued(self, request_id: str, keys: Sequence[str]) -> None:
        """`request_id` waits for the model and will read `keys`: protect and prefetch them."""
        if self.window == 0 or not keys:
            return
        keys = list(dict.fromkeys(keys))
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(self.store, window=self.window)
            self._keys[request_id] = keys
        self.store.protect(keys)
        self._prefetcher.enqueue(request_id, keys)

    def started(self, request_id: str) -> None:
        """The request runs now: it reads its keys itself; a load already under way is awaited."""
        with self._lock:
            keys, pf = self._keys.get(request_id), self._prefetcher
        if keys and pf is not None:
            pf.claim(request_id, keys)

    def finished(self, request_id: str) -> None:
        """Done (or refused, cancelled): its keys are no longer protected on its behalf."""
        with self._lock:
            keys, pf = self._keys.pop(request_id, None), self._prefetcher
        if keys:
            if pf is not None:
                pf.release(request_id, keys)
            self.store.unprotect(keys)

    def stats(self) -> LookAheadStats:
        """For /health's engine block: the window, requests waiting, and the prefetcher's counters."""
        pf = self._prefetcher
        if pf is None:
            return LookAheadStats(window=self.window, queued=len(self._keys))
        st = pf.stats
        return LookAheadStats(window=self.window, queued=len(self._keys), loaded=st.loaded,
                              already_in_ram=st.already_in_ram, missing=st.missing, claimed_waits=st.claimed_waits,
                              dropped=st.dropped, bytes=st.bytes)

    def close(self) -> None:
        with self._lock:
            pf, self._prefetcher = self._prefetcher, None
        if pf is not None:
            pf.close()


__all__ = ["DEFAULT_PREFETCH_WINDOW", "LookAhead", "LookAheadStats"]
