"""PCR on the vLLM path: the control plane routes a request when it is queued, and asks the
chosen instance to prefetch its chunk KV into host RAM before it runs there.

`queued` picks the instance (the router's choice, made once and kept: the request runs where its
KV was prefetched) and sends that instance a prefetch message (wire.prefetch_params: a one-token
`/v1/completions` whose connector loads and pins the keys, vllm_daser/prefetch.py). `started`
marks the request the calling thread runs next; the engine's `_run` `take`s that reservation and
sends the request there with its plan naming the prefetch (the connector releases the pin once
the request has loaded). `finished` releases what a request that never ran there still holds:
its place in the instance's queued work, and the pin (a release message).

The message is sent only when the request is still waiting `delay_s` after `queued` (default
20 ms): one that starts at once reaches vLLM right away and prefetches its own chunks on arrival,
while it waits in vLLM's queue (vllm_daser/prefetch.py), so a message would only add a request.
At most `window` prefetch messages are outstanding per instance (0: routing reservations only,
no prefetch); the connector bounds its pins again in count, bytes and time.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from daser_rag import settings
from daser_rag.control.pool import InstancePool
from daser_rag.control.routing import InstanceState
from daser_rag.control.wire import prefetch_params, release_params
from daser_rag.errors import DaserError

log = logging.getLogger(__name__)

MESSAGE_DELAY_S = 0.02
"""A queued request still waiting this long after `queued` gets a prefetch message."""


@dataclass
class Reservation:
    """Where a queued request will run, and what was done for it there."""

    inst: InstanceState
    keys: list[str]
    tokens: int
    """Tokens it was routed with (the instance's queued work holds them until its first token)."""
    prefetched: bool
    """A prefetch message was sent for it."""
    pending: bool = False
    """A prefetch message will be sent if it is still waiting when the delay is over."""
    taken: bool = False
    served: bool = False
    """It ran to its end on `inst` (the connector released the pin itself)."""


class InstanceLookAhead:
    def __init__(self, pool: InstancePool, send: Callable[[InstanceState, dict[str, Any]], object], *,
                 window: int = settings.PREFETCH_WINDOW.default, ttl_s: float = settings.VLLM_PREFETCH_TTL.default,
                 workers: int = 2, delay_s: float = MESSAGE_DELAY_S) -> None:
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"prefetch window must be an integer >= 0, got {window!r}")
        self.pool = pool
        self.send = send
        self.window = window
        self.ttl_s = ttl_s
        self.counts: Counter[str] = Counter()
        self._reserved: dict[str, Reservation] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._messages = ThreadPoolExecutor(max(1, workers), thread_name_prefix="daser-prefetch-msg")
        self.delay_s = delay_s
        self._due: list[tuple[float, int, str]] = []  # (when, seq, request id): messages not sent yet
        self._seq = 0
        self._cv = threading.Condition(self._lock)
        self._closed = False
        self._timer: threading.Thread | None = None

    def queued(self, request_id: str, keys: Sequence[str], tokens: int, path: str | None = None,
               cached_tokens: int = 0, prefetch: Sequence[str] | None = None) -> Reservation | None:
        """Route the request now by its chunk `keys` and, within the window, have its instance
        prefetch `prefetch` (default `keys`: the entries its plan loads, which differ where a
        calibration's primer has re-positioned chunks load primed entries), not where vLLM's
        prefix cache holds its whole ordered `path` (it loads nothing there)."""
        ordered = list(keys)
        keys = list(dict.fromkeys(keys if prefetch is None else prefetch))
        try:
            inst, tokens = self.pool.acquire_work(ordered, tokens=tokens, path=path, cached_tokens=cached_tokens)
        except DaserError:
            return None  # no instance now: the request finds out itself when it runs
        with self._lock:
            outstanding = sum(1 for r in self._reserved.values()
                              if r.inst is inst and (r.prefetched or r.pending) and not r.taken)
            want = self.window > 0 and bool(keys) and not inst.holds_path(path)
            res = self._reserved[request_id] = Reservation(inst, keys, tokens, False)
            self.counts["reserved"] += 1
            if want and outstanding >= self.window:
                self.counts["window_full"] += 1
            elif want:
                if self.delay_s <= 0:
                    res.prefetched = True
                else:
                    res.pending = True
                    self._seq += 1
                    heapq.heappush(self._due, (time.monotonic() + self.delay_s, self._seq, request_id))
                    self._start_timer()
                    self._cv.notify_all()
        if res.prefetched:
            self._message(inst, prefetch_params(request_id, keys, self.ttl_s), "prefetch_sent")
        return res

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._dispatch, name="daser-prefetch-timer", daemon=True)
            self._timer.start()

    def _dispatch(self) -> None:
        """Send the messages of requests still waiting when they fall due."""
        while True:
            with self._cv:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                if self._closed:
                    return
                _, _, rid = heapq.heappop(self._due)
                res = self._reserved.get(rid)
                if res is None or res.taken:
                    self.counts["started_first"] += 1
                    if res is not None:
                        res.pending = False
                    continue
                res.prefetched, res.pending = True, False
            self._message(res.inst, prefetch_params(rid, res.keys, self.ttl_s), "prefetch_sent")

    def started(self, request_id: str) -> None:
        """The calling thread runs `request_id` next (its `take` finds the reservation)."""
        self._tls.request_id = request_id

    def take(self) -> tuple[str, Reservation] | None:
        """The reservation of the request this thread was told it runs, if its instance is still
        usable; an unusable one is given back (the request is routed afresh)."""
        rid = getattr(self._tls, "request_id", None)
        self._tls.request_id = None
        if rid is None:
            return None
        with self._lock:
            res = self._reserved.get(rid)
            if res is None or res.taken:
                return None
            res.taken = True
        inst = res.inst
        if inst.disabled is not None or not inst.healthy or time.monotonic() < inst.down_until:
            self.pool.release(inst, ok=False, tokens=res.tokens)
            self.counts["rerouted"] += 1
            return None
        return rid, res

    def served(self, request_id: str) -> None:
        """It ran to its end on its reserved instance, whose connector released the pin."""
        with self._lock:
            res = self._reserved.get(request_id)
            if res is not None:
                res.served = True

    def finished(self, request_id: str) -> None:
        with self._lock:
            res = self._reserved.pop(request_id, None)
        if res is None:
            return
        if not res.taken:  # refused, timed out or cancelled before it ran: give its place back
            self.pool.release(res.inst, ok=False, tokens=res.tokens)
        if res.prefetched and not res.served:
            self._message(res.inst, release_params(request_id), "release_sent")

    def _message(self, inst: InstanceState, params: dict[str, Any], what: str) -> None:
        def run() -> None:
            try:
                self.send(inst, params)
                self.counts[what] += 1
            except Exception as exc:  # an instance that is away: its pins end by ttl
                self.counts["message_failed"] += 1
                log.info("prefetch control message to %s failed: %s", inst.url, exc)

        try:
            self._messages.submit(run)
        except RuntimeError:  # closed
            pass

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._reserved)
        return {"window": self.window, "reserved_now": pending, **self.counts}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._messages.shutdown(wait=False, cancel_futures=True)


__all__ = ["InstanceLookAhead", "Reservation"]
