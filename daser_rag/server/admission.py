"""Admission and scheduling: who may use the model, for how long, and how much.

* `Admission`: a counting limiter per kind of model work (completions; document writes), with a
  per-key fair share, so one key flooding the service cannot take every slot (429).
* `ModelGate`: model work runs in its own thread pool (never the event loop's shared pool, so
  /health, /metrics and reads never wait behind it), takes the generator's lock with a queue
  deadline (503), and passes a cancel callback that trips on client disconnect or the request
  deadline (the generator polls it between tokens).
* `TokenBudget`: tokens of new text per key per rolling minute (429).
* `TenantRegistry`: a bound on the distinct tenant names one key may use (403).
* `CpuSlots`: a few lanes for CPU-heavy request preparation (parsing a large body, counting
  tokens, splitting), waited for in arrival order with a per-key share, so a flood of large
  bodies queues behind its own lanes instead of starving the event loop and everyone else.

Order inside a request (server/service.py, server/routes.py): API key, body shape, cheap
validation, admission (429), token counting in a `CpuSlots` lane, tenant registration and the
token budget last, so that a refused request registers nothing and is charged nothing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from daser_rag.server.errors import ApiError, busy, unavailable

if TYPE_CHECKING:
    from fastapi import Request
    from prometheus_client import Gauge

T = TypeVar("T")


class Admission:
    def __init__(self, name: str, limit: int, fair_share: float, gauge: Gauge | None = None) -> None:
        self.name, self.limit = name, int(limit)
        self.per_key = max(1, math.ceil(self.limit * fair_share)) if self.limit > 0 else 0
        self.gauge = gauge
        self._n = 0
        self._per: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, key: str) -> None:
        with self._lock:
            if self._n >= self.limit:
                raise busy(f"server busy: {self._n} {self.name} requests in progress (limit {self.limit}); "
                           "retry later", "overloaded")
            if self._per[key] >= self.per_key:
                raise busy(f"this key already has {self._per[key]} {self.name} requests in progress (its fair "
                           f"share of {self.limit} slots is {self.per_key}); retry later", "fair_share")
            self._n += 1
            self._per[key] += 1
            if self.gauge is not None:
                self.gauge.inc()

    def release(self, key: str) -> None:
        with self._lock:
            self._n -= 1
            self._per[key] -= 1
            if self._per[key] <= 0:
                del self._per[key]
            if self.gauge is not None:
                self.gauge.dec()

    @property
    def inflight(self) -> int:
        return self._n


class Cancelled(Exception):
    """The client went away before or while its request ran."""


class ModelGate:
    """Runs model work in dedicated threads, one at a time, in arrival order (the generator's
    lock is not fair: without a queue, a request could keep losing the race for it). With
    `lock=None` (an engine that batches, vLLM) work runs concurrently, up to `workers`."""

    def __init__(self, lock: threading.RLock | None, workers: int, queue_timeout_s: float,
                 poll_s: float = 0.05) -> None:
        self.lock = lock
        self.queue_timeout_s = queue_timeout_s
        self.poll_s = poll_s
        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="daser-model")
        self._cv = threading.Condition()
        self._line: deque[object] = deque()
        self._running = False

    def _give_up(self, ticket: object, exc: Exception) -> Exception:
        with self._cv:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cv.notify_all()
        return exc

    def _timeout(self, waited: float) -> Exception:
        return unavailable(f"waited {waited:.1f} s for the model (queue deadline {self.queue_timeout_s:g} s); "
                           "retry later", "queue_timeout")

    def _locked(self, fn: Callable[[], T], stop: threading.Event) -> T:
        if self.lock is None:  # the engine batches (vLLM): run now, bounded by admission and workers
            if stop.is_set():
                raise Cancelled()
            return fn()
        t0 = time.monotonic()
        ticket = object()
        with self._cv:
            self._line.append(ticket)
            while self._running or self._line[0] is not ticket:
                waited = time.monotonic() - t0
                if stop.is_set():
                    raise self._give_up(ticket, Cancelled())
                if waited > self.queue_timeout_s:
                    raise self._give_up(ticket, self._timeout(waited))
                self._cv.wait(self.poll_s)
            self._line.popleft()
            self._running = True
        try:
            # our turn; the generator's lock may still be held by someone outside the gate
            while not self.lock.acquire(timeout=self.poll_s):
                if stop.is_set():
                    raise Cancelled()
                waited = time.monotonic() - t0
                if waited > self.queue_timeout_s:
                    raise self._timeout(waited)
            try:
                if stop.is_set():
                    raise Cancelled()
                return fn()
            finally:
                self.lock.release()
        finally:
            with self._cv:
                self._running = False
                self._cv.notify_all()

    def submit(self, fn: Callable[[], T], stop: threading.Event) -> Future[T]:
        """A concurrent future of `fn()` run under the model lock (no client watching)."""
        return self.executor.submit(self._locked, fn, stop)

    async def run(self, fn: Callable[[], T], stop: threading.Event, request: Request | None = None,
                  on_done: Callable[[], None] | None = None) -> T:
        """Await `fn()` under the model lock. While it waits or runs, a disconnect of `request`'s
        client sets `stop` (fn's cancel callback should read it). `on_done` runs when the work
        has really finished (also if this coroutine is cancelled first)."""
        cf = self.executor.submit(self._locked, fn, stop)
        if on_done is not None:
            cf.add_done_callback(lambda _f: on_done())
        fut = asyncio.wrap_future(cf)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.1)
            if done:
                return fut.result()
            if request is not None and not stop.is_set() and await request.is_disconnected():
                stop.set()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class TokenBudget:
    """At most `per_minute` tokens per key within any rolling 60 s."""

    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute, self.window_s = int(per_minute), window_s
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def charge(self, key: str, tokens: int) -> None:
        if tokens <= 0 or self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            q = self._spent.setdefault(key, deque())
            while q and q[0][0] <= now - self.window_s:
                q.popleft()
            used = sum(n for _, n in q)
            if used + tokens > self.per_minute:
                retry = (q[0][0] + self.window_s - now) if q else self.window_s
                raise busy(f"token budget exceeded: {used} tokens used in the last minute, this request needs "
                           f"{tokens}, the limit is {self.per_minute} per key per minute", "token_budget",
                           retry_after=max(1.0, retry))
            q.append((now, tokens))
            if len(self._spent) > 100_000:  # keys that went quiet
                for k in [k for k, v in self._spent.items() if not v]:
                    del self._spent[k]


    def refund(self, key: str, tokens: int) -> None:
        """Give back a charge for work that never ran (it timed out in the queue, or its client
        left before it started): a refused or abandoned request must not use up the budget."""
        if tokens <= 0 or self.per_minute <= 0:
            return
        with self._lock:
            q = self._spent.get(key)
            if not q:
                return
            for i in range(len(q) - 1, -1, -1):
                if q[i][1] == tokens:
                    del q[i]
                    return


class CpuSlots:
    """At most `limit` jobs at once, at most `per_key` of them for one key; the others wait in
    arrival order (a waiter whose key already has its share lets later keys pass) for up to
    `wait_s`, then 503 `busy_preparing`. A waiter is an asyncio future, woken when a lane frees
    up: it holds no thread and costs nothing while it waits, however many wait."""

    def __init__(self, name: str, limit: int, per_key: int, wait_s: float) -> None:
        self.name, self.limit, self.per_key, self.wait_s = name, int(limit), max(1, int(per_key)), float(wait_s)
        self._n = 0
        self._per: Counter[str] = Counter()
        self._line: deque[tuple[asyncio.Future[None], str, asyncio.AbstractEventLoop]] = deque()
        self._lock = threading.Lock()

    @staticmethod
    def _wake(fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)

    def _dispatch(self) -> None:
        """Grant free lanes to waiters in arrival order (under the lock)."""
        for entry in list(self._line):
            if self._n >= self.limit:
                return
            fut, key, loop = entry
            if self._per[key] >= self.per_key:
                continue
            self._line.remove(entry)
            self._n += 1
            self._per[key] += 1
            loop.call_soon_threadsafe(self._wake, fut)

    async def acquire(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (fut, key, loop)
        t0 = time.monotonic()
        with self._lock:
            self._line.append(entry)
            self._dispatch()
        try:
            await asyncio.wait_for(fut, self.wait_s)
        except BaseException as exc:
            with self._lock:
                granted = entry not in self._line
                if not granted:
                    self._line.remove(entry)
            if granted:  # the lane was given as the wait ended: hand it on
                self.release(key)
            if isinstance(exc, asyncio.TimeoutError):
                raise unavailable(f"waited {time.monotonic() - t0:.1f} s for a free {self.name} lane ({self.limit} "
                                  "in use); retry later", "busy_preparing") from None
            raise

    def release(self, key: str) -> None:
        with self._lock:
            self._n -= 1
            self._per[key] -= 1
            if self._per[key] <= 0:
                del self._per[key]
            self._dispatch()

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread, once a lane is free."""
        from starlette.concurrency import run_in_threadpool

        await self.acquire(key)
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self.release(key)


class TenantRegistry:
    """Distinct tenant names per key namespace, bounded: each new tenant costs memory and
    cache space, so one key cannot mint unlimited ones."""

    def __init__(self, max_per_key: int) -> None:
        self.max_per_key = int(max_per_key)
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def admit(self, key_ns: str, tenant: str) -> bool:
        """Register `tenant` (403 past the bound); True if it is new (see `forget`)."""
        with self._lock:
            seen = self._seen.setdefault(key_ns, set())
            if tenant in seen:
                return False
            if len(seen) >= self.max_per_key:
                raise ApiError(403, f"this key already uses {len(seen)} tenant names, the limit is "
                               f"{self.max_per_key}", code="tenant_limit", type_="permission_error")
            seen.add(tenant)
            return True

    def forget(self, key_ns: str, tenant: str) -> None:
        """Undo an `admit` that returned True, for a request refused right after it."""
        with self._lock:
            seen = self._seen.get(key_ns)
            if seen is not None:
                seen.discard(tenant)
                if not seen:
                    del self._seen[key_ns]

    @property
    def count(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._seen.values())
