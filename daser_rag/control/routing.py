"""Which vLLM instance runs a request: one small class per policy, in one registry.

Prefix-based routers (vLLM production-stack, llm-d, Dynamo) hash token prefixes, so the same
documents in another order, or behind another system prompt, look like a cold request. Here a
request is a set of chunk keys: the `documents` policy sends it to the instance whose host
tier already holds most of its chunk KV (loading from host RAM instead of Redis/disk, or
computing it), balanced against how busy each instance is. `round_robin` is the baseline the
benchmark compares with.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_AFFINITY_KEYS = 50_000
"""Chunk keys remembered per instance (~ what its host tier holds: 1 GiB of 512-token SmolLM2
chunks is ~90 entries; an 8B model's 40 GiB host tier ~1,000); bounded so that memory does not
grow with the corpus."""
DEFAULT_LOAD_WEIGHT = 0.25
"""How much one in-flight request on an instance weighs against a 100% chunk hit there."""


@dataclass
class InstanceState:
    """The control plane's view of one instance: load, health and what its host tier holds."""

    url: str
    name: str
    inflight: int = 0
    healthy: bool = True
    down_until: float = 0.0
    failures: int = 0
    served: int = 0
    last_error: str | None = None
    version: str | None = None
    disabled: str | None = None
    """Why the instance is out of rotation for good (a failed self-check); None when usable."""
    max_keys: int = DEFAULT_AFFINITY_KEYS
    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def holds(self, keys: Sequence[str]) -> int:
        with self.lock:
            return sum(1 for k in keys if k in self.keys)

    def remember(self, keys: Iterable[str]) -> None:
        """These chunks' KV went through this instance (loaded or computed): its host tier has them."""
        with self.lock:
            for k in keys:
                self.keys[k] = None
                self.keys.move_to_end(k)
            while len(self.keys) > self.max_keys:
                self.keys.popitem(last=False)

    def forget_all(self) -> None:
        """A restarted instance starts with an empty host tier."""
        with self.lock:
            self.keys.clear()


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str]) -> InstanceState:
        """One of `candidates` (non-empty, all available) for a request over chunk `keys`."""
        ...


class RoundRobin:
    """Each instance in turn, ignoring what it holds."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str]) -> InstanceState:
        return candidates[next(self._next) % len(candidates)]


class DocumentAware:
    """The instance with the highest `hit share - load_weight x in-flight requests`; ties go to
    the less loaded one, then in turn (so a cold start spreads the corpus over the instances)."""

    name = "documents"

    def __init__(self, load_weight: float = DEFAULT_LOAD_WEIGHT) -> None:
        self.load_weight = load_weight
        self._next = itertools.count()

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str]) -> InstanceState:
        turn = next(self._next)
        n = len(candidates)

        def score(i: int) -> tuple[float, int, int]:
            inst = candidates[i]
            share = inst.holds(keys) / len(keys) if keys else 0.0
            return (share - self.load_weight * inst.inflight, -inst.inflight, -((i - turn) % n))

        return candidates[max(range(n), key=score)]


ROUTERS: dict[str, type[RoundRobin] | type[DocumentAware]] = {"documents": DocumentAware, "round_robin": RoundRobin}
"""Routing policies by name (`daser-rag serve --router NAME`); adding one touches this file."""


def make_router(name: str) -> RoutingPolicy:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None


__all__ = ["DEFAULT_AFFINITY_KEYS", "DEFAULT_LOAD_WEIGHT", "DocumentAware", "InstanceState", "ROUTERS",
           "RoundRobin", "RoutingPolicy", "make_router"]
