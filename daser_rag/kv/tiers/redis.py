"""Shared remote tier on Redis: several service processes (or machines) share chunk KV.

Three properties matter more than speed here:

* Integrity: values are the checksummed wire format (`codecs.to_bytes`); every read is
  verified with `from_bytes(expect_key=...)` and a corrupt value is deleted, never served.
  A Redis SET is atomic, so a writer killed mid-request leaves no torn value behind.
* Invalidation fencing: each chunk key has a generation counter next to it. Deleting an entry
  bumps it in the same transaction; a put only lands if the generation is still the one seen
  when the writer found the entry missing. A request that started computing a chunk before an
  invalidation therefore cannot write it back afterwards.
* Degradation: all calls go through `RedisLink`, a small circuit breaker. When Redis is away
  the tier answers like an empty cache (misses, skipped writes), logs one warning per outage,
  and queues deletes so they reach Redis when it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from daser_rag.errors import CorruptEntryError, DaserError
from daser_rag.kv.codecs import EncodedKV, from_bytes, to_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

# KEYS: kv, gen, users-of-key (the document index's reference set). The TTL (ARGV[3]) applies
# only to KV no document references (plain-text context): referenced KV lives until its
# documents are removed, unreferenced KV expires instead of piling up.
_FENCED_SET = """
local g = redis.call('GET', KEYS[2]) or '0'
if ARGV[2] ~= '' and g ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

_DROP = """
local n = redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
return n
"""


class RedisUnavailable(DaserError, ConnectionError):
    """Redis could not be reached; callers degrade to local tiers."""


class RedisLink:
    """One Redis connection pool plus outage bookkeeping shared by the tier and the index.

    After a failure, calls fail fast for `retry_s` seconds instead of each paying a connect
    timeout; the first call after that probes again. Operations that must not be lost
    (deletes, document removals) are queued with `defer` and replayed, in order, as soon as
    Redis answers again.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "daser",
        retry_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        op_timeout_s: float = 1.0,
        probe_timeout_s: float = 0.25,
    ) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the installed extra
            raise DaserError("the Redis tier needs the 'server' extra: pip install 'daser-rag[server]'") from exc
        self._redis = redis
        self.url = url
        self.namespace = namespace
        self.retry_s = retry_s
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=op_timeout_s, retry_on_timeout=False
        )
        # PINGs that decide whether Redis is back use their own short timeout: a hung server
        # (SIGSTOP, a full network buffer) must cost a probe 0.25 s, not the op timeout.
        self._probe_client = redis.Redis.from_url(
            url, socket_connect_timeout=probe_timeout_s, socket_timeout=probe_timeout_s, retry_on_timeout=False
        )
        self._lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._up = True
        self._next_probe = 0.0
        self._outbox: deque[Callable[[Any], Any]] = deque()
        self.errors = 0
        self.outages = 0

    @property
    def up(self) -> bool:
        return self._up

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def _failed(self, exc: BaseException) -> RedisUnavailable:
        with self._lock:
            self.errors += 1
            self._next_probe = time.monotonic() + self.retry_s
            if self._up:
                self._up = False
                self.outages += 1
                log.warning("Redis at %s unavailable (%s); serving from local tiers until it returns", self.url, exc)
        return RedisUnavailable(f"Redis at {self.url} unavailable: {exc}")

    def run(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`; raise RedisUnavailable (fast, during an outage) if Redis is away.

        While Redis is marked down, nothing but a short-timeout PING (at most one per
        `retry_s`, one thread at a time) touches it; only a PING that answered marks it up, and
        queued operations are replayed before any other call."""
        if not self._up and not self._probe():
            raise RedisUnavailable(f"Redis at {self.url} unavailable (retrying in a moment)")
        try:
            if self._outbox:
                self._replay()
            return fn(self.client)
        except (self._redis.ConnectionError, self._redis.TimeoutError, OSError) as exc:
            raise self._failed(exc) from exc

    def _probe(self) -> bool:
        """True once a PING answered and every queued operation was replayed (Redis marked up)."""
        if self._up:
            return True
        if time.monotonic() < self._next_probe or not self._replay_lock.acquire(blocking=False):
            return False
        try:
            if self._up:
                return True
            try:
                self._probe_client.ping()
                replayed = self._replay_locked()
            except (self._redis.RedisError, OSError) as exc:
                self._failed(exc)
                return False
            with self._lock:
                self._up = True
            log.warning("Redis at %s is back; %d queued operation(s) replayed", self.url, replayed)
            return True
        finally:
            self._replay_lock.release()

    def _replay_locked(self) -> int:
        replayed = 0
        while self._outbox:
            op = self._outbox[0]
            op(self.client)  # raises on failure: the op stays queued
            self._outbox.popleft()
            replayed += 1
        return replayed

    def _replay(self) -> None:
        with self._replay_lock:
            self._replay_locked()

    def defer(self, op: Callable[[Any], Any]) -> None:
        self._outbox.append(op)

    def memory_policy(self) -> dict[str, Any]:
        """Redis's `maxmemory` and `maxmemory-policy`, and what is wrong with them for this
        service (empty `problems`: fine). Only KV without document references carries a TTL, so
        `volatile-*` policies evict just that; `allkeys-*` would evict the document registry."""
        cfg: dict[str, Any] = {}
        for name in ("maxmemory", "maxmemory-policy"):
            cfg.update(self.run(lambda c, n=name: c.config_get(n)))
        maxmemory = int(cfg.get("maxmemory", 0) or 0)
        policy = str(cfg.get("maxmemory-policy", ""))
        problems = []
        if policy.startswith("allkeys"):
            problems.append(f"maxmemory-policy {policy} may evict the document registry; use volatile-lru")
        if maxmemory == 0:
            problems.append("maxmemory is 0 (unbounded): KV with document references grows until Redis's host "
                            "runs out of memory; set maxmemory with maxmemory-policy volatile-lru")
        return {"maxmemory": maxmemory, "policy": policy, "problems": problems}

    def ping(self) -> bool:
        """Is Redis answering? Never waits more than the probe timeout (for /health)."""
        if not self._up:
            return self._probe()
        try:
            return bool(self._probe_client.ping())
        except (self._redis.RedisError, OSError) as exc:
            self._failed(exc)
            return False


class RedisTier:
    """Chunk KV in Redis under `<namespace>:kv:<key>`, fenced by `<namespace>:gen:<key>`."""

    name = "redis"

    def __init__(self, link: RedisLink, *, ttl_s: float | None = None, stats_ttl_s: float = 2.0) -> None:
        self.link = link
        self.ttl_ms = "" if ttl_s is None else str(int(ttl_s * 1000))
        self._set = link.client.register_script(_FENCED_SET)
        self._drop = link.client.register_script(_DROP)
        self._observed: dict[str, str] = {}
        self._obs_lock = threading.Lock()
        self.corrupt_dropped = 0
        self.fenced_puts = 0
        self._stats_ttl = stats_ttl_s
        self._stats: tuple[float, int, int] = (0.0, 0, 0)

    def _kv(self, key: str) -> str:
        return self.link.key("kv", key)

    def _gen(self, key: str) -> str:
        return self.link.key("gen", key)

    def _observe(self, key: str, gen: bytes | None) -> None:
        with self._obs_lock:
            if len(self._observed) > 100_000:  # never grows without bound
                self._observed.clear()
            self._observed[key] = (gen or b"0").decode()

    def get(self, key: str) -> EncodedKV | None:
        try:
            blob, gen = self.link.run(lambda c: c.pipeline(transaction=False).get(self._kv(key)).get(self._gen(key)).execute())
        except RedisUnavailable:
            return None
        if blob is None:
            self._observe(key, gen)
            return None
        try:
            return from_bytes(blob, expect_key=key)
        except CorruptEntryError as exc:
            log.warning("dropping corrupt Redis entry %s: %s", key, exc)
            self.corrupt_dropped += 1
            self.delete(key)
            return None

    def put(self, enc: EncodedKV) -> None:
        blob = to_bytes(enc)
        with self._obs_lock:
            expected = self._observed.pop(enc.key, "")
        try:
            ok = self.link.run(lambda c: self._set(keys=[self._kv(enc.key), self._gen(enc.key),
                                                         self.link.key("idx", "users", enc.key)],
                                                   args=[blob, expected, self.ttl_ms], client=c))
        except RedisUnavailable:
            return
        if not ok:
            self.fenced_puts += 1
            log.info("put of %s refused: it was invalidated while being computed", enc.key)

    def delete(self, key: str) -> bool:
        def op(c: Any) -> int:
            return int(self._drop(keys=[self._kv(key), self._gen(key)], client=c))

        try:
            return bool(self.link.run(op))
        except RedisUnavailable:
            self.link.defer(op)
            return False

    def contains(self, key: str) -> bool:
        try:
            exists, gen = self.link.run(
                lambda c: c.pipeline(transaction=False).exists(self._kv(key)).get(self._gen(key)).execute())
        except RedisUnavailable:
            return False
        if not exists:
            self._observe(key, gen)
        return bool(exists)

    def is_live(self, key: str) -> bool:
        """May a local copy of `key` be served? Only while Redis still holds it (True if unknown)."""
        try:
            return bool(self.link.run(lambda c: c.exists(self._kv(key))))
        except RedisUnavailable:
            return True

    def _scan(self) -> list[bytes]:
        return list(self.link.run(lambda c: list(c.scan_iter(match=self._kv("*"), count=1000))))

    def keys(self) -> Iterable[str]:
        prefix = len(self._kv(""))
        return [k.decode()[prefix:] for k in self._scan()]

    def nbytes(self) -> int:
        now = time.monotonic()
        if now - self._stats[0] > self._stats_ttl:
            names = self._scan()

            def sizes(c: Any) -> list[int]:
                pipe = c.pipeline(transaction=False)
                for n in names:
                    pipe.strlen(n)
                return pipe.execute()

            lens = self.link.run(sizes) if names else []
            self._stats = (now, int(sum(lens)), len(names))
        return self._stats[1]

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)
