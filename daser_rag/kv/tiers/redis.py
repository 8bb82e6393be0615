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
  and queues deletes so they reach Redis when it returns. An error *reply* that means "not
  now" (OOM at maxmemory, READONLY replica, LOADING, ...) is a `RedisRefused`: the same
  degradation, counted per reason and reported by `/health` for a while, but the breaker stays
  closed (reads still work on a full Redis).
* Eviction: every KV entry carries a TTL (a shorter one while no document references it), so
  under the documented `maxmemory-policy volatile-lru` Redis evicts KV -- which can always be
  recomputed -- and never the document registry (no TTL). Generation counters expire too
  (`GEN_TTL_S`): they only need to outlive a request in flight.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from daser_rag.errors import CorruptEntryError, DaserError
from daser_rag.kv.codecs import EncodedKV, from_bytes, to_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

GEN_TTL_S = 3600.0
"""Lifetime of a generation counter after its last bump. A fence only has to outlive the
requests in flight when the entry was dropped (queue + request timeouts are minutes), and an
observation older than half of this is never used as a fence (see `RedisTier.put`)."""

DEFAULT_DOC_TTL_S = 7 * 24 * 3600.0
"""TTL of KV that documents reference, renewed whenever it is written or referenced again. KV
can always be recomputed from the registered text, so giving it a TTL is what lets
`volatile-lru` make room for the registry instead of answering OOM."""

# Error replies that mean "Redis cannot take this now" rather than "this command is wrong".
_REFUSAL = re.compile(r"\b(OOM|READONLY|MASTERDOWN|LOADING|BUSY|NOREPLICAS|MISCONF|CLUSTERDOWN|TRYAGAIN)\b")

# KEYS: kv, gen, users-of-key (the document index's reference set). ARGV[3] is the TTL of KV no
# document references (plain-text context), ARGV[4] the TTL of referenced KV ('' = none).
# The first write is SET (refused whole at maxmemory, never half-applied).
_FENCED_SET = """
local g = redis.call('GET', KEYS[2]) or '0'
if ARGV[2] ~= '' and g ~= ARGV[2] then return 0 end
local ttl = ARGV[4]
if redis.call('SCARD', KEYS[3]) == 0 then ttl = ARGV[3] end
if ttl ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

# DEL first: a script whose first write frees memory is not refused at maxmemory, so a drop
# always lands (it is what makes room).
_DROP = """
local n = redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return n
"""


class RedisUnavailable(DaserError, ConnectionError):
    """Redis could not be reached; callers degrade to local tiers."""


class RedisRefused(RedisUnavailable):
    """Redis answered with an error reply that means "not now": OOM (at maxmemory), READONLY (a
    replica, a failover), LOADING, BUSY, ... Handled like an outage (reads degrade, writes are
    refused with 503 and Retry-After) but without opening the breaker: Redis is reachable."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
        self.refusals: dict[str, int] = {}
        self.last_refusal: tuple[float, str, str] | None = None  # (monotonic time, reason, message)
        self.refusal_window_s = 30.0

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

    def _refused(self, exc: BaseException) -> RedisRefused | None:
        """A RedisRefused for an error reply that means "not now" (None for any other reply)."""
        msg = str(exc)
        e = self._redis.exceptions
        # redis-py turns some prefixes into classes (and strips them from the message)
        by_class = [("OOM", getattr(e, "OutOfMemoryError", None)), ("READONLY", getattr(e, "ReadOnlyError", None)),
                    ("LOADING", getattr(e, "BusyLoadingError", None))]
        reason = next((r for r, cls in by_class if cls is not None and isinstance(exc, cls)), None)
        if reason is None:
            m = _REFUSAL.search(msg[:200])
            if m is None:
                return None
            reason = m.group(1)
        with self._lock:
            self.errors += 1
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
            first = self.last_refusal is None or time.monotonic() - self.last_refusal[0] > self.refusal_window_s
            self.last_refusal = (time.monotonic(), reason, msg)
        if first:
            log.warning("Redis at %s refused a command (%s): %s", self.url, reason, msg)
        return RedisRefused(f"Redis at {self.url} refused the command: {msg}", reason)

    def problem(self) -> str | None:
        """Why Redis is degraded right now (for /health), or None: an outage, or an error reply
        (OOM, READONLY, ...) within the last `refusal_window_s` seconds."""
        if not self._up:
            return f"Redis at {self.url} unreachable"
        last = self.last_refusal
        if last is not None and time.monotonic() - last[0] <= self.refusal_window_s:
            if last[1] == "OOM":
                return (f"Redis is full (maxmemory reached, {time.monotonic() - last[0]:.0f}s ago): "
                        "writes are refused; delete documents or raise maxmemory")
            return f"Redis refused a command {time.monotonic() - last[0]:.0f}s ago ({last[1]}): {last[2][:120]}"
        return None

    def run(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`; raise RedisUnavailable (fast, during an outage) if Redis is away, and
        RedisRefused if it answered with an OOM/READONLY/... error reply.

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
        except self._redis.ResponseError as exc:
            refused = self._refused(exc)
            if refused is None:
                raise
            raise refused from exc

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
            try:
                op(self.client)  # a connection failure raises: the op stays queued
            except self._redis.ResponseError as exc:
                # an error reply would refuse it forever and block every later call: dropped
                # (queued ops are KV deletes; a KV entry left behind expires by its TTL)
                log.warning("queued Redis operation dropped after an error reply: %s", exc)
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
        service. `fatal`: the policy may evict the document registry (`allkeys-*`: the registry
        has no TTL, only KV and bookkeeping do), so the service must not start on it.
        `problems`: worth a warning. `volatile-*` policies evict only keys with a TTL, i.e. KV
        (recomputable) and expiring bookkeeping; `noeviction` is safe but answers OOM (503s)
        once full instead of making room."""
        cfg: dict[str, Any] = {}
        for name in ("maxmemory", "maxmemory-policy"):
            def get(c: Any, n: str = name) -> dict[str, Any]:
                return dict(c.config_get(n))

            cfg.update(self.run(get))
        maxmemory = int(cfg.get("maxmemory", 0) or 0)
        policy = str(cfg.get("maxmemory-policy", ""))
        problems, fatal = [], []
        if policy.startswith("allkeys"):
            fatal.append(f"maxmemory-policy {policy} may evict the document registry (an acknowledged document "
                         "would vanish); use volatile-lru")
        elif policy == "noeviction" and maxmemory:
            problems.append("maxmemory-policy noeviction: once Redis is full every write answers 503 instead of "
                            "evicting recomputable KV; volatile-lru is recommended")
        if maxmemory == 0:
            problems.append("maxmemory is 0 (unbounded): KV grows until Redis's host runs out of memory; set "
                            "maxmemory with maxmemory-policy volatile-lru")
        return {"maxmemory": maxmemory, "policy": policy, "problems": fatal + problems, "fatal": fatal}

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
    """Chunk KV in Redis under `<namespace>:kv:<key>`, fenced by `<namespace>:gen:<key>`.

    `ttl_s`: TTL of KV no document references; `doc_ttl_s`: TTL of referenced KV (renewed when
    written or referenced again). None means no TTL, which `volatile-lru` can never evict."""

    name = "redis"

    def __init__(self, link: RedisLink, *, ttl_s: float | None = None, stats_ttl_s: float = 2.0,
                 doc_ttl_s: float | None = DEFAULT_DOC_TTL_S, gen_ttl_s: float = GEN_TTL_S,
                 stats_scan_calls: int = 4) -> None:
        self.link = link
        self.ttl_ms = "" if ttl_s is None else str(int(ttl_s * 1000))
        self.doc_ttl_ms = "" if doc_ttl_s is None else str(int(doc_ttl_s * 1000))
        self.gen_ttl_ms = str(int(gen_ttl_s * 1000))
        self._fence_max_age = gen_ttl_s / 2
        self._set = link.client.register_script(_FENCED_SET)
        self._drop = link.client.register_script(_DROP)
        self._observed: dict[str, tuple[str, float]] = {}
        self._obs_lock = threading.Lock()
        self.corrupt_dropped = 0
        self.fenced_puts = 0
        self.refused_puts = 0
        self._stats = _ScanSampler(link, link.key("kv", ""), min_interval_s=stats_ttl_s, max_calls=stats_scan_calls)

    def _kv(self, key: str) -> str:
        return self.link.key("kv", key)

    def _gen(self, key: str) -> str:
        return self.link.key("gen", key)

    def _observe(self, key: str, gen: bytes | None) -> None:
        with self._obs_lock:
            if len(self._observed) > 100_000:  # never grows without bound
                self._observed.clear()
            self._observed[key] = ((gen or b"0").decode(), time.monotonic())

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
        """Store `enc` unless it was invalidated since this process saw it missing (the fence).
        A put Redis refuses (OOM) is skipped, like one during an outage: KV is a cache."""
        blob = to_bytes(enc)
        with self._obs_lock:
            seen = self._observed.pop(enc.key, None)
        # an observation older than half the counters' TTL may predate a counter that expired
        # and restarted: not a valid fence (unreferenced KV written without one expires anyway)
        expected = seen[0] if seen is not None and time.monotonic() - seen[1] < self._fence_max_age else ""
        try:
            ok = self.link.run(lambda c: self._set(keys=[self._kv(enc.key), self._gen(enc.key),
                                                         self.link.key("idx", "users", enc.key)],
                                                   args=[blob, expected, self.ttl_ms, self.doc_ttl_ms], client=c))
        except RedisRefused:
            self.refused_puts += 1
            return
        except RedisUnavailable:
            return
        if not ok:
            self.fenced_puts += 1
            log.info("put of %s refused: it was invalidated while being computed", enc.key)

    def delete(self, key: str) -> bool:
        def op(c: Any) -> int:
            return int(self._drop(keys=[self._kv(key), self._gen(key)], args=[self.gen_ttl_ms], client=c))

        try:
            return bool(self.link.run(op))
        except RedisRefused:
            return False  # an error reply would refuse it again on replay; the entry's TTL ends it
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
        """Every key held (a full SCAN: for maintenance, never for metrics; see `nbytes`)."""
        prefix = len(self._kv(""))
        return [k.decode()[prefix:] for k in self._scan()]

    def nbytes(self) -> int:
        """Bytes of KV held, from a sampled scan (see `_ScanSampler`): what one call costs Redis
        is bounded, whatever the keyspace size; -1 until known."""
        return self._stats.sample()[0]

    def num_entries(self) -> int:
        """Entries held, from the same sampled scan as `nbytes`; -1 until known."""
        return self._stats.sample()[1]

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)


class _ScanSampler:
    """Bytes and entries under a key prefix, gathered by an incremental SCAN: each `sample()`
    advances the cursor by at most `max_calls` SCAN calls (COUNT 1000, plus one STRLEN pipeline
    per batch), at most once per `min_interval_s` and one thread at a time; others get the last
    published totals at once. A full pass publishes new totals; until the first one completes
    the running partial sums are reported (a lower bound). So a scrape costs Redis the same at
    81k keys as at 81, and 20 concurrent scrapers cost what one does."""

    def __init__(self, link: RedisLink, prefix: str, *, min_interval_s: float = 2.0, max_calls: int = 4) -> None:
        self.link = link
        self.match = prefix + "*"
        self.min_interval_s = min_interval_s
        self.max_calls = max_calls
        self._lock = threading.Lock()
        self._cursor = 0
        self._partial = (0, 0)
        self._published: tuple[int, int] | None = None
        self._next = 0.0
        self.scan_calls = 0

    def sample(self) -> tuple[int, int]:
        if time.monotonic() >= self._next and self._lock.acquire(blocking=False):
            try:
                self._step()
            except RedisUnavailable:
                pass
            finally:
                self._next = time.monotonic() + self.min_interval_s
                self._lock.release()
        if self._published is not None:
            return self._published
        return self._partial if self._partial != (0, 0) or self._cursor else (-1, -1)

    def _step(self) -> None:
        for _ in range(self.max_calls):
            cursor, names = self.link.run(lambda c: c.scan(cursor=self._cursor, match=self.match, count=1000))
            self.scan_calls += 1
            if names:
                def sizes(c: Any, names: list[bytes] = names) -> list[int]:
                    pipe = c.pipeline(transaction=False)
                    for n in names:
                        pipe.strlen(n)
                    return [int(x) for x in pipe.execute()]

                lens = self.link.run(sizes)
                self._partial = (self._partial[0] + int(sum(lens)), self._partial[1] + sum(1 for n in lens if n))
            self._cursor = int(cursor)
            if self._cursor == 0:
                self._published, self._partial = self._partial, (0, 0)
                return
