"""Eviction policies for byte-budgeted tiers. A policy only orders victims; the tier owns bytes.

Three orderings, chosen per store so they can be compared on one trace:

- `LRUPolicy`: least recently used first. Blind to what is about to be needed.
- `LookAheadLRUPolicy` (PCR): the request queue is visible. Entries no queued request needs
  go first (LRU among them); entries a queued request needs go last, the one needed
  furthest in the future first (Belady's rule on the part of the future we can see). Hard
  protection (never evict) is the tier's `is_protected` callback, which the scheduler drives
  through `KVStore.protect`; the ordering here is what is left when protection alone cannot
  make room.
- `CostAwarePolicy` (RAGCache's PGDSF flavour): priority = clock + frequency * cost / size.
  An entry that is cheap to get back per byte it occupies goes first; the clock ages out
  entries that were popular long ago.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

ProtectFn = Callable[[str], bool]
NextUseFn = Callable[[], Mapping[str, int]]
"""Returns key -> queue position of the earliest pending request that needs it."""
CostFn = Callable[[str, int], float]
"""(key, stored bytes) -> seconds it costs to get the entry back if it is evicted."""


class EvictionPolicy(Protocol):
    def on_insert(self, key: str, nbytes: int) -> None: ...
    def on_access(self, key: str) -> None: ...
    def on_remove(self, key: str) -> None: ...
    def victims(self) -> Iterable[str]:
        """Candidate keys, best victim first."""
        ...


class LRUPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_insert(self, key: str, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterable[str]:
        return list(self._order)


class LookAheadLRUPolicy(LRUPolicy):
    """LRU that sees the request queue (PCR's look-ahead LRU).

    `next_use` is usually `RequestScheduler.next_use`; it can be attached after construction
    because the store (and its policy) is built before the scheduler that feeds it.
    """

    name = "lookahead-lru"

    def __init__(self, next_use: NextUseFn | None = None) -> None:
        super().__init__()
        self._next_use = next_use

    def attach(self, next_use: NextUseFn | None) -> None:
        self._next_use = next_use

    def victims(self) -> Iterable[str]:
        upcoming = self._next_use() if self._next_use is not None else {}
        if not upcoming:
            return list(self._order)
        free = [k for k in self._order if k not in upcoming]
        needed = [k for k in self._order if k in upcoming]
        needed.sort(key=lambda k: upcoming[k], reverse=True)  # needed furthest away goes first
        return free + needed


class CostAwarePolicy:
    """PGDSF-like: evict the lowest `clock + freq * cost / size` first.

    `cost_fn` estimates what a miss costs (seconds to recompute or reload); `set_cost`
    overrides it with a measured value (the generator reports real recompute times through
    `KVStore.note_cost`). The default cost is proportional to bytes, which makes the policy
    frequency-aware GDSF; give a recompute-time model to make it truly cost-aware.
    """

    name = "cost-aware"

    def __init__(self, cost_fn: CostFn | None = None, *, max_history: int = 65536) -> None:
        self.cost_fn: CostFn = cost_fn or (lambda _key, nbytes: float(nbytes))
        self.clock = 0.0
        self._size: dict[str, int] = {}
        self._prio: dict[str, float] = {}
        self._freq: OrderedDict[str, int] = OrderedDict()  # survives eviction (bounded ghost list)
        self._cost: dict[str, float] = {}
        self._max_history = max_history
        self._pending_victims: set[str] = set()

    def set_cost(self, key: str, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cost must be >= 0, got {seconds}")
        self._cost[key] = float(seconds)
        if key in self._size:
            self._prio[key] = self._priority(key)

    def _priority(self, key: str) -> float:
        size = max(1, self._size[key])
        cost = self._cost.get(key)
        if cost is None:
            cost = self.cost_fn(key, size)
        # cost per byte, scaled to "per MB" so the clock and the ratio live on similar scales
        return self.clock + self._freq.get(key, 1) * cost / size * 1e6

    def _bump(self, key: str) -> None:
        self._freq[key] = self._freq.get(key, 0) + 1
        self._freq.move_to_end(key)
        while len(self._freq) > self._max_history:
            old, _ = self._freq.popitem(last=False)
            if old not in self._size:
                self._cost.pop(old, None)

    def on_insert(self, key: str, nbytes: int) -> None:
        self._size[key] = int(nbytes)
        self._bump(key)
        self._prio[key] = self._priority(key)
        self._pending_victims.clear()

    def on_access(self, key: str) -> None:
        if key in self._size:
            self._bump(key)
            self._prio[key] = self._priority(key)

    def on_remove(self, key: str) -> None:
        prio = self._prio.pop(key, None)
        self._size.pop(key, None)
        if prio is not None and key in self._pending_victims:
            self.clock = max(self.clock, prio)  # GDSF aging: the evicted priority becomes the floor
            self._pending_victims.discard(key)

    def victims(self) -> Iterable[str]:
        order = sorted(self._prio, key=self._prio.__getitem__)
        self._pending_victims = set(order)
        return order


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lookahead-lru": LookAheadLRUPolicy,
    "cost-aware": CostAwarePolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
