"""Prefix-tree materialization off the request path.

A repeated ordered chunk path becomes exact once its tree nodes are stored (blend/prefix_tree.py).
Computing them inline costs the request that crosses the threshold about 1.2x a full prefill
(measured: mean TTFT +34% on the QA trace), which is why the tree was off by default. Here the
assembler only *submits* the path; a background thread computes it while the model is idle and
gives the model back within one layer when a request wants it (`ModelLock.wanted`). It stores a
path one node (chunk) at a time, so no request waits for more than one layer of one chunk (the
lock measures those waits: `ModelLock.background_waits`), and a preempted path keeps the nodes it
already stored and resumes from there. A preempted job is retried later; a job
whose chunks were invalidated meanwhile is dropped (its nodes would be keyed by text that no
longer exists, so they could never be served, but they would waste memory).

Bounded: at most `queue_max` paths wait (the oldest is dropped beyond that), each is tried at most
`max_attempts` times.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daser_rag import settings
from daser_rag.blend.prefix_tree import node_key
from daser_rag.engine.model_lock import ModelLock
from daser_rag.types import ResolvedChunk, Timings

if TYPE_CHECKING:
    from daser_rag.engine.assemble import SegmentAssembler

_log = logging.getLogger(__name__)
_live: weakref.WeakSet[BackgroundMaterializer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every materializer before the interpreter tears down: a daemon thread killed inside a
    torch kernel at exit aborts the process ("terminate called without an active exception")."""
    for m in list(_live):
        m.close()


class Preempted(Exception):
    """A request wants the model: background work stops at the next layer."""


@dataclass
class MaterializeStats:
    submitted: int = 0
    materialized: int = 0
    """Paths whose nodes were all stored."""
    preempted: int = 0
    """Attempts given up at a layer boundary because a request wanted the model."""
    dropped_full: int = 0
    """Paths dropped because `queue_max` were already waiting."""
    dropped_stale: int = 0
    """Paths dropped because a chunk on them was invalidated (or evicted) before their turn."""
    dropped_retries: int = 0
    """Paths given up after `max_attempts` preemptions."""
    already_stored: int = 0
    """Paths whose nodes were all stored by the time their turn came (another job or process)."""
    nodes: int = 0
    """Tree nodes (one chunk each) stored."""
    failed: int = 0
    """Attempts that raised (logged; the path is dropped, the engine keeps serving)."""
    pending: int = 0


@dataclass
class _Job:
    chunks: list[ResolvedChunk]
    tenant: str
    attempts: int = 0
    progressed: bool = False  # some of its nodes were stored by an earlier attempt


class BackgroundMaterializer:
    """One daemon thread that stores prefix-tree nodes while the engine is idle."""

    def __init__(self, assembler: SegmentAssembler, lock: ModelLock, *,
                 queue_max: int = settings.PREFIX_TREE_QUEUE.default,
                 idle_s: float = settings.PREFIX_TREE_IDLE_MS.default / 1000.0,
                 max_attempts: int = 8) -> None:
        if queue_max < 1:
            raise ValueError(f"prefix-tree queue must hold at least 1 path, got {queue_max}")
        self.assembler = assembler
        self.lock = lock
        self.queue_max = queue_max
        self.idle_s = idle_s
        self.max_attempts = max_attempts
        self.stats = MaterializeStats()
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread: threading.Thread | None = None
        _live.add(self)

    # -- request side --------------------------------------------------------------------------
    def submit(self, chunks: list[ResolvedChunk], tenant: str) -> bool:
        """Queue the ordered path for materialization; False if it already waits."""
        pk = self.assembler.computer.prefix_key(tenant)
        path_key = node_key(pk, [c.key for c in chunks])  # the deepest node names the whole path
        with self._cv:
            if self._closed or path_key in self._jobs:
                return False
            self._jobs[path_key] = _Job(list(chunks), tenant)
            self.stats.submitted += 1
            while len(self._jobs) > self.queue_max:
                self._jobs.popitem(last=False)
                self.stats.dropped_full += 1
            self.stats.pending = len(self._jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="daser-materialize", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return True

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing waits and nothing runs (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._jobs or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._jobs.clear()
            self._cv.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout=10)

    # -- background side -----------------------------------------------------------------------
    def _idle_for(self, seconds: float) -> bool:
        """True once the model has been unwanted for `seconds` in a row (False when closing)."""
        quiet_since: float | None = None
        while not self._closed:
            if self.lock.wanted():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= seconds:
                return True
            time.sleep(min(0.01, max(seconds / 4, 0.001)))
        return False

    def _next(self) -> tuple[str, _Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait(1.0)
            if self._closed:
                return None
            key, job = self._jobs.popitem(last=False)
            self._busy = True
            self.stats.pending = len(self._jobs)
            return key, job

    def _done(self, key: str, job: _Job, retry: bool) -> None:
        with self._cv:
            if retry and not self._closed:
                self._jobs[key] = job
                self._jobs.move_to_end(key, last=False)  # it keeps its place: oldest first
            self._busy = False
            self.stats.pending = len(self._jobs)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            key, job = got
            retry = False
            try:
                retry = self._attempt(job)
            except Exception:  # noqa: BLE001 - background work must never take the engine down
                self.stats.failed += 1
                _log.exception("prefix-tree materialization failed; the path is dropped")
                retry = False
            finally:
                self._done(key, job, retry)

    def _attempt(self, job: _Job) -> bool:
        """One try at the path's next node; True when the job should be retried (preempted) or
        go on (more nodes). Only the layer computations hold the model: reading the runs they
        extend and storing the result happen outside the lock, so a request never waits for I/O."""
        if not self._idle_for(self.idle_s):
            return False
        store = self.assembler.store
        if not all(store.contains(c.key) for c in job.chunks):
            self.stats.dropped_stale += 1
            return False
        work = self.assembler.path_work(job.chunks, job.tenant, Timings(), max_nodes=1)
        if work is None:
            if job.progressed:
                self.stats.materialized += 1
            else:
                self.stats.already_stored += 1
            return False
        if not self.lock.acquire_quietly():
            return True
        wanted: Callable[[], bool] = self.lock.wanted

        def check(_layer: int) -> None:
            if wanted() or self._closed:
                raise Preempted()

        try:
            if wanted():
                return True
            nodes = self.assembler.compute_nodes(work, before_layer=check)
        except Preempted:
            if self._closed:
                return False
            self.stats.preempted += 1
            job.attempts += 1
            if job.attempts >= self.max_attempts:
                self.stats.dropped_retries += 1
                return False
            return True
        finally:
            self.lock.release_quietly()
        if self._closed:  # the engine is shutting down: its store may be closing too
            return False
        self.assembler.store_nodes(work, nodes, job.tenant)
        self.stats.nodes += len(nodes)
        job.progressed = True
        if not work.complete:  # more nodes: it keeps its place and goes on after the idle rule
            return True
        self.stats.materialized += 1
        return False


__all__ = ["BackgroundMaterializer", "MaterializeStats", "Preempted"]
