"""The document index held in Redis, so every service process sees one registry.

Same interface as `daser_rag.kv.doc_index.DocIndex` (the store and generator use it unchanged).
Each write is one Lua script, so it is atomic with respect to every other process: removing a
document drops its refs, finds the chunks nobody else references, and deletes their KV (bumping
their generation, see `RedisTier`) in one step. When `remove_document` returns, no process can
resolve the document or fetch its dropped KV from Redis any more.

A local SQLite `DocIndex` is kept as a mirror: writes go to it too (with Redis's version
numbers), reads refresh it, and while Redis is away reads come from it (degraded mode).

Writes while Redis is away are refused (`RedisUnavailable`, fast): an acknowledged write must
never be rolled back when Redis returns, and a write applied only locally would be (Redis is
the authority every process reads). A mirror refresh never replaces a local record with an
older version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from daser_rag.errors import UnknownDocumentError
from daser_rag.kv.doc_index import DocIndex, DocInfo
from daser_rag.kv.tiers.redis import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

# Returns {changed, version}. ARGV[4] is the version this process last saw (its mirror): the new
# version is above it even if Redis lost its counters, so versions never go backwards anywhere.
_SET_DOC = """
local cur = redis.call('HMGET', KEYS[1], 'digest', 'version')
if cur[1] == ARGV[1] then return {0, tonumber(cur[2])} end
local v = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if floor >= v then v = floor + 1; redis.call('SET', KEYS[2], v) end
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'version', v, 'texts', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[5])  -- pending until its refs are switched (replace_refs)
return {1, v}
"""

# Shared helper: drop `member` from key k's users; if nobody is left, delete the KV and bump its
# generation so that in-flight writers cannot put it back (see RedisTier).
_RELEASE = """
local function release(k, member, users, kvp, genp, orphans)
  redis.call('SREM', users .. k, member)
  if redis.call('SCARD', users .. k) == 0 then
    table.insert(orphans, k)
    redis.call('DEL', kvp .. k)
    redis.call('INCR', genp .. k)
  end
end
"""

_REPLACE_REFS = _RELEASE + """
local member, users, kvp, genp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('SREM', KEYS[3], member)
local orphans = {}
local new = {}
for i = 5, #ARGV do new[ARGV[i]] = true end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- the document was removed while it was being added: the removal wins
  for k, _ in pairs(new) do
    if redis.call('SCARD', users .. k) == 0 then
      table.insert(orphans, k); redis.call('DEL', kvp .. k); redis.call('INCR', genp .. k)
    end
  end
  return orphans
end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not new[k] then
    redis.call('SREM', KEYS[2], k)
    release(k, member, users, kvp, genp, orphans)
  end
end
for k, _ in pairs(new) do
  redis.call('SADD', KEYS[2], k)
  redis.call('SADD', users .. k, member)
  redis.call('PERSIST', kvp .. k)  -- referenced KV lives until its documents go
end
return orphans
"""

_REMOVE_DOC = _RELEASE + """
local member, users, kvp, genp, doc_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local keys = redis.call('SMEMBERS', KEYS[2])
if #keys == 0 and redis.call('EXISTS', KEYS[1]) == 0 then return false end
local orphans = {}
for _, k in ipairs(keys) do release(k, member, users, kvp, genp, orphans) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], doc_id)
redis.call('SREM', KEYS[4], member)
return orphans
"""


def _name(tenant: str, doc_id: str) -> str:
    return json.dumps([tenant, doc_id], ensure_ascii=False, separators=(",", ":"))


_ADD_REFS = """
local member, users, kvp = ARGV[1], ARGV[2], ARGV[3]
for i = 5, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SADD', users .. ARGV[i], member)
  redis.call('PERSIST', kvp .. ARGV[i])
end
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""


class RedisDocIndex:
    """DocIndex semantics (ref-counted doc -> chunk keys) with Redis as the authority."""

    def __init__(self, link: RedisLink, local: DocIndex | None = None) -> None:
        self.link = link
        self.local = local if local is not None else DocIndex(None)
        c = link.client
        self._set_doc = c.register_script(_SET_DOC)
        self._replace = c.register_script(_REPLACE_REFS)
        self._remove = c.register_script(_REMOVE_DOC)
        self._add_refs = c.register_script(_ADD_REFS)

    # -- key names ---------------------------------------------------------------------------
    def _doc(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "doc", _name(tenant, doc_id))

    def _refs(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "refs", _name(tenant, doc_id))

    def _ver(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "ver", _name(tenant, doc_id))

    def _docs(self, tenant: str) -> str:
        return self.link.key("idx", "docs", json.dumps(tenant, ensure_ascii=False))

    def _pending(self) -> str:
        return self.link.key("idx", "pending")

    def _users_prefix(self) -> str:
        return self.link.key("idx", "users", "")

    def _script_args(self, tenant: str, doc_id: str) -> list[str]:
        return [_name(tenant, doc_id), self._users_prefix(), self.link.key("kv", ""), self.link.key("gen", "")]

    def _degraded(self, what: str, exc: RedisUnavailable) -> None:
        log.debug("document index %s served locally: %s", what, exc)

    # -- writes ------------------------------------------------------------------------------
    def set_document(self, doc_id: str, chunk_texts: Sequence[str], content_digest: str, tenant: str = "") -> bool:
        """Raises RedisUnavailable while Redis is away (the write is refused, not half-applied)."""
        texts = json.dumps(list(chunk_texts), ensure_ascii=False)
        mine = self.local.info(doc_id, tenant)
        floor = mine.version if mine is not None else 0
        changed, version = self.link.run(lambda c: self._set_doc(
            keys=[self._doc(tenant, doc_id), self._ver(tenant, doc_id), self._docs(tenant), self._pending()],
            args=[content_digest, texts, doc_id, floor, _name(tenant, doc_id)], client=c))
        if changed or mine is None or mine.content_digest != content_digest:
            self.local.set_document(doc_id, chunk_texts, content_digest, tenant, version=int(version), pending=False)
        return bool(changed)

    def add_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str = "") -> None:
        keys = list(chunk_keys)
        if not keys:
            return
        try:
            self.link.run(lambda c: self._add_refs(
                keys=[self._refs(tenant, doc_id), self._docs(tenant)],
                args=[_name(tenant, doc_id), self._users_prefix(), self.link.key("kv", ""), doc_id, *keys],
                client=c))
        except RedisUnavailable as exc:
            # refs of chunks read during an outage: a best-effort local note (the document's own
            # ingest registered its refs in Redis already)
            self._degraded("add_refs", exc)
        self.local.add_refs(doc_id, keys, tenant)

    def replace_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str = "") -> list[str]:
        """Raises RedisUnavailable while Redis is away."""
        keys = list(chunk_keys)
        orphans = self.link.run(lambda c: self._replace(
            keys=[self._doc(tenant, doc_id), self._refs(tenant, doc_id), self._pending()],
            args=[*self._script_args(tenant, doc_id), *keys], client=c))
        self.local.replace_refs(doc_id, keys, tenant)
        return [k.decode() for k in orphans]

    def remove_document(self, doc_id: str, tenant: str = "") -> list[str] | None:
        """Raises RedisUnavailable while Redis is away: a removal queued for later could undo a
        re-add acknowledged by another process in the meantime."""
        res = self.link.run(lambda c: self._remove(
            keys=[self._doc(tenant, doc_id), self._refs(tenant, doc_id), self._docs(tenant), self._pending()],
            args=[*self._script_args(tenant, doc_id), doc_id], client=c))
        self.local.remove_document(doc_id, tenant)
        # Redis is the authority: the mirror may be stale, and its orphans could still be used
        # by documents this process never saw. Local copies of Redis's orphans are dropped by
        # the caller; any other local copy fails the store's liveness check on its next read.
        return None if res is None else sorted(k.decode() for k in res)

    def clear(self) -> None:
        self.local.clear()

        def op(c: Any) -> None:
            names = list(c.scan_iter(match=self.link.key("idx", "*"), count=1000))
            if names:
                c.delete(*names)

        self.link.run(op)

    # -- reads -------------------------------------------------------------------------------
    def _record(self, doc_id: str, tenant: str) -> tuple[str, int, list[str]] | None:
        digest, version, texts = self.link.run(
            lambda c: c.hmget(self._doc(tenant, doc_id), "digest", "version", "texts"))
        if digest is None:
            return None
        return digest.decode(), int(version), json.loads(texts)

    def _sync_local(self, doc_id: str, tenant: str, rec: tuple[str, int, list[str]] | None) -> None:
        """Keep the mirror close to Redis so that degraded reads are as fresh as possible. A local
        record newer than Redis's is never replaced by the older one."""
        try:
            mine = self.local.info(doc_id, tenant)
            if rec is None:
                if mine is not None:
                    self.local.remove_document(doc_id, tenant)
            elif mine is None or (mine.content_digest != rec[0] and rec[1] >= mine.version):
                self.local.set_document(doc_id, rec[2], rec[0], tenant, version=rec[1], pending=False)
        except Exception as exc:  # the mirror is best effort
            log.debug("local index mirror not updated: %s", exc)

    def info(self, doc_id: str, tenant: str = "") -> DocInfo | None:
        try:
            rec = self._record(doc_id, tenant)
        except RedisUnavailable:
            return self.local.info(doc_id, tenant)
        self._sync_local(doc_id, tenant, rec)
        return None if rec is None else DocInfo(doc_id, rec[0], rec[1], len(rec[2]))

    def chunk_texts(self, doc_id: str, tenant: str = "") -> list[str]:
        try:
            rec = self._record(doc_id, tenant)
        except RedisUnavailable:
            return self.local.chunk_texts(doc_id, tenant)
        self._sync_local(doc_id, tenant, rec)
        if rec is None:
            raise UnknownDocumentError(doc_id)
        return rec[2]

    def chunk_keys(self, doc_id: str, tenant: str = "") -> list[str]:
        try:
            return sorted(k.decode() for k in self.link.run(lambda c: c.smembers(self._refs(tenant, doc_id))))
        except RedisUnavailable:
            return self.local.chunk_keys(doc_id, tenant)

    def refcount(self, key: str) -> int:
        try:
            return int(self.link.run(lambda c: c.scard(self._users_prefix() + key)))
        except RedisUnavailable:
            return self.local.refcount(key)

    def documents(self, tenant: str = "") -> list[str]:
        try:
            return sorted(d.decode() for d in self.link.run(lambda c: c.smembers(self._docs(tenant))))
        except RedisUnavailable:
            return self.local.documents(tenant)

    def pending_documents(self) -> list[tuple[str, str]]:
        """(tenant, doc_id) of documents whose text changed but whose refs were not switched yet
        (empty while Redis is away: the repair needs the authority)."""
        try:
            names = self.link.run(lambda c: c.smembers(self._pending()))
        except RedisUnavailable:
            return []
        return sorted(tuple(json.loads(n)) for n in names)  # type: ignore[misc]

    def referenced_keys(self) -> set[str]:
        prefix = self._users_prefix()
        try:
            names = self.link.run(lambda c: list(c.scan_iter(match=prefix + "*", count=1000)))
        except RedisUnavailable:
            return self.local.referenced_keys()
        return {n.decode()[len(prefix):] for n in names}
