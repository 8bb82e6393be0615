"""Queue-driven prefetch: load the KV of queued requests into RAM before they run (PCR).

The scheduler tells the prefetcher which keys each queued request will need, in queue
order. A background worker walks the first `window` requests and pulls every key that is
not in host RAM from the lower tiers (disk, then remote) through `KVStore.get_encoded`,
which promotes it into RAM.

Rules that keep it from hurting the request that is running:
- the worker holds no lock a running request needs while it does I/O (the store's tiers
  lock only around their dict updates);
- a request that starts `claim()`s its keys: loads not yet begun are dropped (the request
  will read them itself, now), and only a load already under way for one of *its own* keys
  is awaited, since finishing it is never slower than starting the same read again;
- the window bounds how far ahead it reads, so prefetched entries are not evicted again
  before use (pair it with look-ahead protection for that guarantee).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from daser_rag.kv.store import KVStore

log = logging.getLogger(__name__)


@dataclass
class PrefetchStats:
    loaded: int = 0  # entries brought into RAM by the worker
    already_in_ram: int = 0
    missing: int = 0  # not on any tier: the request will compute it
    claimed_waits: int = 0  # times a starting request waited for an in-flight load of its own key
    dropped: int = 0  # queued loads dropped because their request started first
    bytes: int = 0


class Prefetcher:
    def __init__(self, store: KVStore, *, window: int = 4, low_priority: bool = True) -> None:
        if window < 1:
            raise ValueError(f"prefetch window must be >= 1, got {window}")
        self.store = store
        self.window = window
        self.low_priority = low_priority
        self.stats = PrefetchStats()
        self._pending: OrderedDict[str, list[str]] = OrderedDict()  # request id -> keys, queue order
        self._done: set[str] = set()  # keys handled for the current queue contents
        self._claimed: set[str] = set()
        self._inflight: dict[str, threading.Event] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="daser-prefetch", daemon=True)
        self._thread.start()

    # -- scheduler side -------------------------------------------------------------------
    def enqueue(self, request_id: str, keys: Iterable[str]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("prefetcher is closed")
            self._pending[request_id] = list(dict.fromkeys(keys))
            self._cv.notify_all()

    def claim(self, request_id: str, keys: Iterable[str], timeout: float | None = 30.0) -> None:
        """The request is starting: take it out of the queue and settle its keys."""
        keys = list(keys)
        with self._cv:
            self._pending.pop(request_id, None)
            waits = [self._inflight[k] for k in keys if k in self._inflight]
            still_queued = {k for ks in self._pending.values() for k in ks}
            for k in keys:
                if k not in self._inflight and k not in self._done and k not in still_queued:
                    self.stats.dropped += 1
            self._claimed.update(keys)
            self._cv.notify_all()  # the window moved on
        for ev in waits:
            self.stats.claimed_waits += 1
            ev.wait(timeout)

    def release(self, request_id: str, keys: Iterable[str]) -> None:
        """The request finished (or was cancelled): forget what it pinned in our bookkeeping."""
        with self._cv:
            self._pending.pop(request_id, None)
            still = {k for ks in self._pending.values() for k in ks}
            for k in keys:
                self._claimed.discard(k)
                if k not in still:
                    self._done.discard(k)
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return not self._inflight and self._next_key() is None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker ---------------------------------------------------------------------------
    def _next_key(self) -> str | None:
        for i, keys in enumerate(self._pending.values()):
            if i >= self.window:
                return None
            for k in keys:
                if k not in self._done and k not in self._claimed and k not in self._inflight:
                    return k
        return None

    def _run(self) -> None:
        if self.low_priority and hasattr(os, "setpriority"):
            try:  # Linux: per-thread nice value, so compute keeps the CPU when both want it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except OSError:
                pass
        while True:
            with self._cv:
                key = self._next_key()
                while key is None and not self._closed:
                    self._cv.wait()
                    key = self._next_key()
                if self._closed or key is None:  # (key is set whenever not closed)
                    return
                ev = threading.Event()
                self._inflight[key] = ev
            try:
                self._load(key)
            except Exception as exc:  # a broken entry is the request's problem, not the worker's
                log.warning("prefetch of %s failed: %s", key, exc)
            finally:
                with self._cv:
                    self._inflight.pop(key, None)
                    self._done.add(key)
                    self._cv.notify_all()
                ev.set()

    def _load(self, key: str) -> None:
        if self.store.in_host(key):
            self.stats.already_in_ram += 1
            return
        enc = self.store.get_encoded(key)  # promotes into RAM on a lower-tier hit
        if enc is None:
            self.stats.missing += 1
            return
        self.stats.loaded += 1
        self.stats.bytes += enc.nbytes
