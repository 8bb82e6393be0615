"""A request scheduler: a FIFO queue, several requests in flight, and a view of the future.

Knowing the queue is what makes PCR's storage tricks possible: the store can protect the
entries queued requests will need (look-ahead eviction) and a prefetcher can load them
from disk while earlier requests compute. The generator serializes model compute (one
model, one lock), so "in flight" means: one request computing, others already dispatched
and waiting, plus everything still queued; all of them count as look-ahead.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daser_rag.errors import InvalidInputError
from daser_rag.api import ContextItem
from daser_rag.context import SHARED_TENANT
from daser_rag.kv.prefetch import Prefetcher
from daser_rag.types import GenerationResult

if TYPE_CHECKING:  # the scheduler needs only the generator's public members: lock, store, plan_keys, generate
    from daser_rag.engine.generator import CacheAwareGenerator


@dataclass
class ScheduledResult:
    result: GenerationResult
    request_id: str
    arrival: float
    started: float
    ram_hits: int  # needed entries already in host RAM when the request started
    ram_misses: int
    keys: list[str] = field(default_factory=list)

    @property
    def queue_s(self) -> float:
        return self.started - self.arrival

    @property
    def ttft_s(self) -> float:
        """Time to first token measured from arrival: queueing + fetch + fusion."""
        return self.queue_s + self.result.timings.ttft_s


@dataclass
class _Request:
    request_id: str
    question: str
    contexts: Sequence[ContextItem] | None
    kwargs: dict[str, Any]
    keys: list[str]
    arrival: float
    future: Future[ScheduledResult]


class RequestScheduler:
    """Runs `generator.generate` for submitted requests, in arrival order.

    protect_queued: pin the KV of queued requests in RAM (look-ahead). A look-ahead policy on
    the store's host tier is attached to this scheduler's queue automatically.
    prefetcher: optional `Prefetcher` over the same store; it is fed the queue.
    """

    def __init__(
        self,
        generator: CacheAwareGenerator,
        *,
        concurrency: int = 2,
        protect_queued: bool = True,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if prefetcher is not None and prefetcher.store is not generator.store:
            raise ValueError("the prefetcher must serve the generator's own store")
        self.generator = generator
        self.store = generator.store
        self.protect_queued = protect_queued
        self.prefetcher = prefetcher
        self._queue: OrderedDict[str, _Request] = OrderedDict()
        self._running: dict[str, _Request] = {}
        self._cv = threading.Condition()
        self._dispatch = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        attach = getattr(self.store.host.policy, "attach", None)
        if attach is not None:
            attach(self.next_use)
        self._workers = [threading.Thread(target=self._work, name=f"daser-sched-{i}", daemon=True)
                         for i in range(concurrency)]
        for w in self._workers:
            w.start()

    # -- look-ahead view --------------------------------------------------------------------
    def next_use(self) -> Mapping[str, int]:
        """key -> position of the earliest not-yet-finished request needing it (0 = running)."""
        with self._cv:
            out: dict[str, int] = {}
            for pos, req in enumerate(itertools.chain(self._running.values(), self._queue.values())):
                for k in req.keys:
                    out.setdefault(k, pos)
            return out

    def pending(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._running)

    # -- submission --------------------------------------------------------------------------
    def submit(
        self,
        question: str,
        contexts: Sequence[ContextItem] | None = None,
        *,
        arrival: float | None = None,
        **kwargs: Any,
    ) -> Future[ScheduledResult]:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        keys = self.generator.plan_keys(contexts, tenant=kwargs.get("tenant", SHARED_TENANT))
        fut: Future[ScheduledResult] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            rid = f"r{next(self._ids)}"
            req = _Request(rid, question, contexts, kwargs, keys,
                           time.perf_counter() if arrival is None else arrival, fut)
            self._queue[rid] = req
            if self.protect_queued:
                self.store.protect(keys)
            self._cv.notify()
        if self.prefetcher is not None:
            self.prefetcher.enqueue(rid, keys)
        return fut

    def drain(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("requests still pending")
                self._cv.wait(left)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for w in self._workers:
            w.join()

    def __enter__(self) -> RequestScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drain()
        self.close()

    # -- workers -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            # Dequeue and take the model lock as one step, so requests reach the model in
            # queue order (RLock is not fair: without this, two workers could swap turns).
            with self._dispatch:
                with self._cv:
                    while not self._queue and not self._closed:
                        self._cv.wait()
                    if not self._queue:
                        return
                    rid, req = self._queue.popitem(last=False)
                    self._running[rid] = req
                self.generator.lock.acquire()
            try:
                if not req.future.set_running_or_notify_cancel():
                    continue
                self._execute(req)
            finally:
                self.generator.lock.release()
                with self._cv:
                    self._running.pop(rid, None)
                    if self.protect_queued:
                        self.store.unprotect(req.keys)
                    self._cv.notify_all()
                if self.prefetcher is not None:
                    self.prefetcher.release(rid, req.keys)

    def _execute(self, req: _Request) -> None:
        try:
            # Requests run one at a time on the model: wait for our turn before settling
            # prefetches and reading the RAM state, so the hit count describes the real start.
            with self.generator.lock:
                started = time.perf_counter()
                if self.prefetcher is not None:
                    self.prefetcher.claim(req.request_id, req.keys)
                hits = sum(1 for k in req.keys if self.store.in_host(k))
                result = self.generator.generate(req.question, req.contexts, **req.kwargs)
            req.future.set_result(ScheduledResult(result, req.request_id, req.arrival, started, hits,
                                                  len(req.keys) - hits, list(req.keys)))
        except BaseException as exc:  # the caller sees the failure on its future
            req.future.set_exception(exc)
