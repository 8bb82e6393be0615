"""Open a KVStore that shares its KV and document index through Redis.

One recipe for every process that joins a deployment (the HTTP service, each vLLM instance's
connector, a client that plans vLLM requests), so they agree on the namespace and on the rule
that keeps stale KV out: a local copy (host RAM, local disk) is served only while Redis still
holds the entry. Whoever invalidates a document deletes the entry in Redis; every other process
then drops its own copy on its next read instead of serving it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daser_rag.settings import REDIS_TTL

if TYPE_CHECKING:
    from daser_rag.kv.store import KVStore

log = logging.getLogger(__name__)

DEFAULT_REDIS_TTL_S = REDIS_TTL.default
"""TTL of Redis KV that no document references (plain-text context). Referenced KV carries a
longer one (`DEFAULT_DOC_TTL_S`), so that `volatile-lru` can evict any KV -- recomputable --
and never the document registry, which has no TTL."""


def default_namespace(fingerprint: str) -> str:
    """The Redis key prefix for KV of one model (its fingerprint): processes serving the same
    model share entries; another model's entries can never be read by mistake."""
    return f"daser:{fingerprint[:16]}"


def open_store(
    root: str | os.PathLike[str],
    *,
    redis_url: str | None = None,
    namespace: str | None = None,
    redis_ttl_s: float | None = DEFAULT_REDIS_TTL_S,
    check_redis: bool = True,
    **store_kw: Any,
) -> KVStore:
    """A KVStore under `root`, plus the shared Redis tier and document index when `redis_url` is
    given (`namespace` is then required: see `default_namespace`). Without Redis it is a plain
    local store. `store_kw` goes to KVStore (codec, host_bytes, disk_bytes, ...)."""
    from daser_rag.kv.doc_index import DocIndex
    from daser_rag.kv.store import KVStore  # torch: imported only when a store is opened

    root = Path(root)
    if not redis_url:
        return KVStore(root, **store_kw)
    if not namespace:
        raise ValueError("a Redis-shared store needs a namespace (default_namespace(model fingerprint))")
    from daser_rag.kv.redis_index import RedisDocIndex
    from daser_rag.kv.tiers.redis import RedisLink, RedisTier

    link = RedisLink(redis_url, namespace=namespace)
    remote = RedisTier(link, ttl_s=redis_ttl_s)
    store = KVStore(root, remote=remote, validate=remote.is_live,
                    index=RedisDocIndex(link, local=DocIndex(root / "index.sqlite")), **store_kw)
    if check_redis:
        check_memory_policy(link)
    return store


def check_memory_policy(link: Any) -> None:
    """Refuse (DaserError) a Redis whose `maxmemory-policy` may evict the document registry
    (`allkeys-*`: an acknowledged document could vanish); warn about other problems. Under the
    documented `volatile-lru`, only keys with a TTL are evicted: KV (recomputable) and
    bookkeeping that may be lost; the registry has none. Where CONFIG is disabled (managed
    Redis) the policy cannot be read: a warning says so and the operator's setting stands."""
    from daser_rag.errors import DaserError

    if not link.ping():
        log.warning("Redis at %s is not reachable now; starting on local tiers", link.url)
        return
    try:
        policy = link.memory_policy()
    except Exception as exc:  # CONFIG may be disabled on managed Redis
        log.warning("Redis memory policy not checked (%s); it must not be allkeys-* (use volatile-lru)", exc)
        return
    if policy.get("fatal"):
        raise DaserError(f"refusing Redis at {link.url}: " + "; ".join(policy["fatal"]))
    for problem in policy["problems"]:
        log.warning("Redis at %s: %s", link.url, problem)


__all__ = ["DEFAULT_REDIS_TTL_S", "check_memory_policy", "default_namespace", "open_store"]
