"""PCR inside a vLLM instance: load a queued request's chunk KV into this instance's host tier
before the request runs, and pin it there until it has run.

The control plane knows a request before vLLM does (it routes it, and may hold it in its own
queue). At that moment it sends the chosen instance a *prefetch message*: an ordinary
`/v1/completions` request with a one-token prompt and `max_tokens=1` whose
`kv_transfer_params` carry `{"daser": {"prefetch": {"id", "keys", "ttl_s"}}}`. The connector's
scheduler half sees it when vLLM adds it (`on_new_request`, before vLLM's own waiting queue),
and the next step's connector metadata carries it to the worker, where `HostPrefetch` loads
the entries from Redis/disk in a background thread (daser's `Prefetcher`, which never holds a
lock a running request needs, at nice 10) and pins them against host-tier eviction
(`KVStore.protect`). A request that starts loading never waits for that thread (on a busy CPU a
nice-10 thread can be starved, and the forward pass would wait with it): loads not begun are
dropped, and one under way is simply read again by the request. The message itself costs vLLM one token of compute; nothing else
in vLLM is touched (only the KV-connector API: `on_new_request`, `build_connector_meta`,
`build_connector_worker_meta`, `update_connector_output`, `request_finished`).

A planned request that reaches vLLM while its `max_num_seqs` slots are taken prefetches its own
entries on arrival (under its plan's prefetch id or its own id): while it waits for a slot, they
come into RAM.

A pin ends when the real request (its plan names the prefetch id) has loaded its KV, when it
finishes without loading (vLLM's own prefix cache held it), when the control plane sends a
release message (the request was cancelled or ran elsewhere), or after `ttl_s`. It is
bounded: at most `max_requests` pins at once and `max_bytes` of pinned entries (never more
than the host tier holds); a prefetch past either bound is refused and counted, and the
request then loads its KV itself when it runs, as without prefetch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from daser_rag.kv.prefetch import Prefetcher
from daser_rag.kv.store import KVStore
from daser_rag.settings import VLLM_PREFETCH_MAX_BYTES, VLLM_PREFETCH_MAX_REQUESTS, VLLM_PREFETCH_TTL

DEFAULT_MAX_REQUESTS = VLLM_PREFETCH_MAX_REQUESTS.default
DEFAULT_MAX_BYTES = VLLM_PREFETCH_MAX_BYTES.default
DEFAULT_TTL_S = VLLM_PREFETCH_TTL.default
ENDED_MEMORY = 4096
"""Ids of requests that loaded or ended, remembered so that a prefetch message arriving after its
request (the two travel separately) is refused instead of pinning until the ttl."""


@dataclass
class PrefetchCounters:
    """What the worker's prefetch did since start (reported through the stats message)."""

    requested: int = 0
    """Prefetch messages received."""
    refused: int = 0
    """Refused at a bound (pins or bytes); those requests load their KV themselves."""
    claimed: int = 0
    """Pins whose request reached this instance and loaded (the prefetch was used)."""
    released: int = 0
    """Pins ended by a release message or by their request finishing without a load."""
    expired: int = 0
    """Pins that outlived their ttl (the request never came)."""
    late: int = 0
    """Prefetch messages that came after their request had already loaded or ended (refused)."""


@dataclass
class _Pin:
    keys: list[str]
    deadline: float


@dataclass
class PrefetchSnapshot:
    """The typed state the stats message returns (`DaserKVConnector` puts it in
    `kv_transfer_params["daser_stats"]["prefetch"]`)."""

    max_requests: int
    max_bytes: int
    pinned_requests: int
    pinned_keys: int
    pinned_bytes: int
    pins: dict[str, dict[str, int]]
    """Per pinned request id: {"keys": n, "in_host": how many of them host RAM holds now}."""
    counters: dict[str, int]
    loader: dict[str, Any] = field(default_factory=dict)
    """The background loader's own counters (daser_rag.kv.prefetch.PrefetchStats)."""


class HostPrefetch:
    """Worker side: pins and background loads into `store`'s host tier (see the module docstring)."""

    def __init__(self, store: KVStore, *, max_requests: int = DEFAULT_MAX_REQUESTS,
                 max_bytes: int = DEFAULT_MAX_BYTES, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_requests < 0 or max_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"prefetch bounds must be >= 0 and ttl > 0, got max_requests={max_requests}, "
                             f"max_bytes={max_bytes}, ttl_s={ttl_s}")
        self.store = store
        self.max_requests = int(max_requests)
        self.max_bytes = min(int(max_bytes), store.host.capacity_bytes)  # pins never exceed the tier
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self.counters = PrefetchCounters()
        self._loader: Prefetcher | None = None  # its thread starts with the first pin
        self._pins: dict[str, _Pin] = {}
        self._entry_bytes: list[int] = []  # sizes seen, for the estimate of a new pin's bytes
        self._ended: OrderedDict[str, None] = OrderedDict()  # ids whose request loaded or ended
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_requests > 0 and self.max_bytes > 0

    # -- messages --------------------------------------------------------------------------------
    def add(self, pid: str, keys: Sequence[str], ttl_s: float | None = None) -> bool:
        """Pin and start loading `keys` for request `pid`; False when refused at a bound."""
        self.expire()
        keys = list(dict.fromkeys(k for k in keys if isinstance(k, str) and k))
        with self._lock:
            self.counters.requested += 1
            if pid in self._pins or not keys:
                return pid in self._pins
            if pid in self._ended:  # its request was faster than the message: nothing to hold
                self.counters.late += 1
                return False
            if not self.enabled or len(self._pins) >= self.max_requests or \
                    self._pinned_bytes() + self._estimate(len(keys)) > self.max_bytes:
                self.counters.refused += 1
                return False
            ttl = self.ttl_s if ttl_s is None or ttl_s <= 0 else min(float(ttl_s), self.ttl_s)
            self._pins[pid] = _Pin(keys, self.clock() + ttl)
            if self._loader is None:
                self._loader = Prefetcher(self.store, window=max(1, self.max_requests))
            loader = self._loader
        self.store.protect(keys)
        loader.enqueue(pid, keys)
        return True

    def claim(self, pid: str) -> bool:
        """The request is loading its KV now: loads of its keys not begun are dropped (it reads
        them itself); it does not wait for the background thread (see the module docstring)."""
        with self._lock:
            pin, loader = self._pins.get(pid), self._loader
        if pin is not None and loader is not None:
            loader.claim(pid, pin.keys, timeout=0.0)
        return pin is not None

    def release(self, pid: str, *, used: bool = False) -> bool:
        """End `pid`'s pin (its keys become evictable again, unless another pin holds them)."""
        with self._lock:
            pin = self._pins.pop(pid, None)
            self._ended[pid] = None
            while len(self._ended) > ENDED_MEMORY:
                self._ended.popitem(last=False)
            if pin is None:
                return False
            self._remember_sizes(pin.keys)
            if used:
                self.counters.claimed += 1
            else:
                self.counters.released += 1
            loader = self._loader
        if loader is not None:
            loader.release(pid, pin.keys)
        self.store.unprotect(pin.keys)
        return True

    def expire(self) -> int:
        """End the pins whose ttl passed; how many."""
        now = self.clock()
        with self._lock:
            gone = [pid for pid, p in self._pins.items() if p.deadline <= now]
        for pid in gone:
            if self.release(pid):
                with self._lock:
                    self.counters.released -= 1
                    self.counters.expired += 1
        return len(gone)

    # -- accounting ------------------------------------------------------------------------------
    def _host_size(self, key: str) -> int:
        enc = self.store.host.get(key)
        return 0 if enc is None else int(enc.nbytes)

    def _pinned_keys(self) -> set[str]:
        return {k for p in self._pins.values() for k in p.keys}

    def _pinned_bytes(self) -> int:
        """Bytes the pins hold in host RAM now (entries still loading count once loaded)."""
        return sum(self._host_size(k) for k in self._pinned_keys())

    def _estimate(self, n_keys: int) -> int:
        """Bytes `n_keys` new entries will take: the mean size seen so far (0 before any)."""
        if not self._entry_bytes:
            return 0
        return n_keys * sum(self._entry_bytes) // len(self._entry_bytes)

    def _remember_sizes(self, keys: Sequence[str]) -> None:
        for k in keys:
            size = self._host_size(k)
            if size:
                self._entry_bytes.append(size)
        del self._entry_bytes[:-64]

    def snapshot(self) -> PrefetchSnapshot:
        self.expire()
        with self._lock:
            pins = {pid: {"keys": len(p.keys), "in_host": sum(1 for k in p.keys if self.store.in_host(k))}
                    for pid, p in self._pins.items()}
            keys = self._pinned_keys()
            loader = asdict(self._loader.stats) if self._loader is not None else {}
            return PrefetchSnapshot(self.max_requests, self.max_bytes, len(self._pins), len(keys),
                                    sum(self._host_size(k) for k in keys), pins, asdict(self.counters), loader)

    def close(self) -> None:
        with self._lock:
            loader, self._loader = self._loader, None
        if loader is not None:
            loader.close()


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_REQUESTS", "DEFAULT_TTL_S", "HostPrefetch", "PrefetchCounters",
           "PrefetchSnapshot"]
