"""The document index held in Redis, so every service process sees one registry.

Same interface as `daser_rag.kv.doc_index.DocIndex` (the store and generator use it unchanged).
Each write is one Lua script, so it is atomic with respect to every other process: removing a
document drops its refs, finds the chunks nobody else references, and deletes their KV (bumping
their generation, see `RedisTier`) in one step. When `remove_document` returns, no process can
resolve the document or fetch its dropped KV from Redis any more.

An update is one step too (`commit_document`): the text, its version and its chunk list switch
together, so versions follow commit order and a chunk list always belongs to the text next to
it (two processes updating one document at once: the later commit wins whole, each reports the
version it wrote, and the KV only the loser used is dropped). Scripts that add data are
refused whole at `maxmemory` (OOM -> `RedisRefused`, nothing half-written); scripts that remove
data start with a delete, so Redis runs them even when full.

Bookkeeping expires: a removed document leaves a version tombstone (`idx:ver:*`, so a re-add
continues its numbering) and a "gone" mark (`idx:gone:*`, refusing refs that a request which
started before the removal adds afterwards: no ghost documents), both with TTLs.

A local SQLite `DocIndex` is kept as a mirror: writes go to it too (with Redis's version
numbers), reads refresh it, and while Redis is away reads come from it (degraded mode). The
mirror is best effort: a mirror write that fails (local disk full) never fails a write Redis
acknowledged; the document is marked untrusted locally instead, and degraded reads of it are
refused rather than served stale, until a later read refreshes it.

Writes while Redis is away are refused (`RedisUnavailable`, fast): an acknowledged write must
never be rolled back when Redis returns, and a write applied only locally would be (Redis is
the authority every process reads). A mirror refresh never replaces a local record with an
older version.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from daser_rag.errors import UnknownDocumentError
from daser_rag.kv.doc_index import DocIndex, DocInfo
from daser_rag.kv.tiers.redis import DEFAULT_DOC_TTL_S, GEN_TTL_S, RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

TOMBSTONE_TTL_S = 7 * 24 * 3600.0
"""How long a removed document's last version is remembered (a re-add within it continues
the numbering; after it, numbering restarts at 1)."""

GONE_TTL_S = 3600.0
"""How long refs to a removed document are refused. Longer than any request can queue and run
(queue + request timeouts): a request that resolved the document before its removal cannot
bring it back as a ghost when it registers its chunk refs afterwards."""

# Shared helper: drop `member` from key k's users; if nobody is left, delete the KV and bump its
# generation (with a TTL) so that in-flight writers cannot put it back (see RedisTier).
_RELEASE = """
local function release(k, member, users, kvp, genp, genttl, orphans)
  redis.call('SREM', users .. k, member)
  if redis.call('SCARD', users .. k) == 0 then
    table.insert(orphans, k)
    redis.call('DEL', kvp .. k)
    redis.call('INCR', genp .. k)
    redis.call('PEXPIRE', genp .. k, genttl)
  end
end
local function refer(k, member, users, kvp, docttl)
  redis.call('SADD', users .. k, member)
  if docttl == '' then redis.call('PERSIST', kvp .. k) else redis.call('PEXPIRE', kvp .. k, docttl) end
end
"""

# The next version: above the record's, the tombstone's and what this process saw (its mirror),
# so versions never go backwards anywhere.
_NEXT_VERSION = """
local function next_version(cur, tomb, floor)
  local v = tonumber(cur) or 0
  local t = tonumber(redis.call('GET', tomb)) or 0
  if t > v then v = t end
  if floor > v then v = floor end
  return v + 1
end
"""

# KEYS: doc, ver (tombstone), docs, refs, pending, gone
# ARGV: digest, texts, doc_id, floor, member, users prefix, kv prefix, gen prefix, gen ttl, doc ttl, keys...
# Returns {changed, version, orphans...}. The first write is HSET (or SADD): refused whole at OOM.
_COMMIT = _RELEASE + _NEXT_VERSION + """
local digest, texts, doc_id, floor = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local member, users, kvp, genp, genttl, docttl = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local cur = redis.call('HMGET', KEYS[1], 'digest', 'version')
local changed = 0
local v = tonumber(cur[2]) or 0
if cur[1] ~= digest then
  v = next_version(cur[2], KEYS[2], floor)
  redis.call('HSET', KEYS[1], 'digest', digest, 'version', v, 'texts', texts)
  changed = 1
end
redis.call('SADD', KEYS[3], doc_id)
redis.call('DEL', KEYS[2], KEYS[6])
redis.call('SREM', KEYS[5], member)
local orphans = {}
local new = {}
for i = 11, #ARGV do new[ARGV[i]] = true end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if not new[k] then
    redis.call('SREM', KEYS[4], k)
    release(k, member, users, kvp, genp, genttl, orphans)
  end
end
for k, _ in pairs(new) do
  redis.call('SADD', KEYS[4], k)
  refer(k, member, users, kvp, docttl)
end
local out = {changed, v}
for _, k in ipairs(orphans) do table.insert(out, k) end
return out
"""

# The text alone (two-step update, kept for direct index users; the store uses _COMMIT).
# Returns {changed, version}.
_SET_DOC = _NEXT_VERSION + """
local cur = redis.call('HMGET', KEYS[1], 'digest', 'version')
if cur[1] == ARGV[1] then return {0, tonumber(cur[2])} end
local v = next_version(cur[2], KEYS[2], tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'version', v, 'texts', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[5])  -- pending until its refs are switched (replace_refs)
redis.call('DEL', KEYS[2], KEYS[5])
return {1, v}
"""

# KEYS: doc, refs, pending. ARGV: member, users, kv, gen prefixes, gen ttl, doc ttl, expected
# version ('' = any), keys... Compare-and-set on the version: refs switch only to the chunks of
# the version the caller saw; otherwise (a newer version was saved meanwhile, or the document
# was removed) the caller's chunks that nobody references are dropped and nothing switches.
_REPLACE_REFS = _RELEASE + """
local member, users, kvp, genp, genttl, docttl, expect = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local orphans = {}
local new = {}
for i = 8, #ARGV do new[ARGV[i]] = true end
local ver = redis.call('HGET', KEYS[1], 'version')
if (not ver) or (expect ~= '' and ver ~= expect) then
  for k, _ in pairs(new) do
    if redis.call('SCARD', users .. k) == 0 then
      table.insert(orphans, k); redis.call('DEL', kvp .. k); redis.call('INCR', genp .. k)
      redis.call('PEXPIRE', genp .. k, genttl)
    end
  end
  return orphans
end
redis.call('SREM', KEYS[3], member)
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not new[k] then
    redis.call('SREM', KEYS[2], k)
    release(k, member, users, kvp, genp, genttl, orphans)
  end
end
for k, _ in pairs(new) do
  redis.call('SADD', KEYS[2], k)
  refer(k, member, users, kvp, docttl)
end
return orphans
"""

# KEYS: doc, refs, docs, pending, ver (tombstone), gone. Starts with deletes (runs at OOM).
_REMOVE_DOC = _RELEASE + """
local member, users, kvp, genp, genttl, doc_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local keys = redis.call('SMEMBERS', KEYS[2])
local ver = redis.call('HGET', KEYS[1], 'version')
if #keys == 0 and not ver then return false end
redis.call('DEL', KEYS[1], KEYS[2])
local orphans = {}
for _, k in ipairs(keys) do release(k, member, users, kvp, genp, genttl, orphans) end
redis.call('SREM', KEYS[3], doc_id)
redis.call('SREM', KEYS[4], member)
if ver then redis.call('SET', KEYS[5], ver, 'PX', ARGV[7]) end
redis.call('SET', KEYS[6], '1', 'PX', ARGV[8])
return orphans
"""

# KEYS: refs, docs, doc, gone. Refs to a document removed meanwhile are refused (returns 0).
_ADD_REFS = _RELEASE + """
if redis.call('EXISTS', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local member, users, kvp, docttl = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
for i = 6, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  refer(ARGV[i], member, users, kvp, docttl)
end
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""


def _name(tenant: str, doc_id: str) -> str:
    return json.dumps([tenant, doc_id], ensure_ascii=False, separators=(",", ":"))


class RedisDocIndex:
    """DocIndex semantics (ref-counted doc -> chunk keys) with Redis as the authority."""

    def __init__(self, link: RedisLink, local: DocIndex | None = None, *, doc_ttl_s: float | None = DEFAULT_DOC_TTL_S,
                 gen_ttl_s: float = GEN_TTL_S, tombstone_ttl_s: float = TOMBSTONE_TTL_S,
                 gone_ttl_s: float = GONE_TTL_S) -> None:
        self.link = link
        self.local = local if local is not None else DocIndex(None)
        self.doc_ttl_ms = "" if doc_ttl_s is None else str(int(doc_ttl_s * 1000))
        self.gen_ttl_ms = str(int(gen_ttl_s * 1000))
        self.tombstone_ttl_ms = str(int(tombstone_ttl_s * 1000))
        self.gone_ttl_ms = str(int(gone_ttl_s * 1000))
        c = link.client
        self._commit = c.register_script(_COMMIT)
        self._set_doc = c.register_script(_SET_DOC)
        self._replace = c.register_script(_REPLACE_REFS)
        self._remove = c.register_script(_REMOVE_DOC)
        self._add_refs = c.register_script(_ADD_REFS)
        # documents whose mirror record could not be written (local disk full): never served
        # from the mirror until a read refreshed it
        self._untrusted: set[tuple[str, str]] = set()
        self._mlock = threading.Lock()
        self.mirror_errors = 0
        self.last_mirror_error: tuple[float, str] | None = None
        self.refused_refs = 0

    # -- key names ---------------------------------------------------------------------------
    def _doc(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "doc", _name(tenant, doc_id))

    def _refs(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "refs", _name(tenant, doc_id))

    def _ver(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "ver", _name(tenant, doc_id))

    def _gone(self, tenant: str, doc_id: str) -> str:
        return self.link.key("idx", "gone", _name(tenant, doc_id))

    def _docs(self, tenant: str) -> str:
        return self.link.key("idx", "docs", json.dumps(tenant, ensure_ascii=False))

    def _pending(self) -> str:
        return self.link.key("idx", "pending")

    def _users_prefix(self) -> str:
        return self.link.key("idx", "users", "")

    def _script_args(self, tenant: str, doc_id: str) -> list[str]:
        return [_name(tenant, doc_id), self._users_prefix(), self.link.key("kv", ""), self.link.key("gen", ""),
                self.gen_ttl_ms]

    def _degraded(self, what: str, exc: RedisUnavailable) -> None:
        log.debug("document index %s served locally: %s", what, exc)

    # -- the local mirror (best effort) ----------------------------------------------------
    def _mirror(self, doc_id: str, tenant: str, fn: Callable[[], Any], *, record: bool = True) -> None:
        """Apply a write to the mirror. Redis already holds it, so a failure (local disk full)
        must not fail the write: the document is marked untrusted locally instead. `record`:
        the write replaces the document's whole record (so success makes it trusted again)."""
        try:
            fn()
        except Exception as exc:
            with self._mlock:
                self.mirror_errors += 1
                self.last_mirror_error = (time.monotonic(), str(exc))
                self._untrusted.add((tenant, doc_id))
            log.warning("local index mirror not updated for %r (its degraded reads are refused until it is): %s",
                        doc_id, exc)
        else:
            if record and self._untrusted:
                with self._mlock:
                    self._untrusted.discard((tenant, doc_id))

    def _local_read(self, doc_id: str, tenant: str, exc: RedisUnavailable) -> None:
        """Degraded reads of a document whose mirror record is known stale are refused."""
        if (tenant, doc_id) in self._untrusted:
            raise RedisUnavailable(f"{exc}; the local copy of document {doc_id!r} is not current "
                                   "(it could not be written)") from exc

    def problem(self, window_s: float = 60.0) -> str | None:
        """Why the local mirror is degraded (a write failed within `window_s`), or None."""
        last = self.last_mirror_error
        if last is not None and time.monotonic() - last[0] <= window_s:
            return f"local index mirror not written {time.monotonic() - last[0]:.0f}s ago: {last[1][:120]}"
        return None

    # -- writes ------------------------------------------------------------------------------
    def authoritative_info(self, doc_id: str, tenant: str) -> DocInfo | None:
        """`info` from Redis itself; raises RedisUnavailable instead of answering from the
        mirror (a write must decide on the authority's state)."""
        rec = self._record(doc_id, tenant)
        return None if rec is None else DocInfo(doc_id, rec[0], rec[1], len(rec[2]))

    def commit_document(self, doc_id: str, chunk_texts: Sequence[str], content_digest: str,
                        chunk_keys: Iterable[str], tenant: str) -> tuple[bool, int, list[str]]:
        """Save a document's text and switch its refs to `chunk_keys` in one atomic step.
        Returns (changed, the version now saved, chunk keys nobody references any more).
        Raises RedisUnavailable (or RedisRefused: OOM, READONLY) with nothing written."""
        texts = json.dumps(list(chunk_texts), ensure_ascii=False)
        keys = list(dict.fromkeys(chunk_keys))
        mine = self.local.info(doc_id, tenant) if (tenant, doc_id) not in self._untrusted else None
        floor = mine.version if mine is not None else 0
        res = self.link.run(lambda c: self._commit(
            keys=[self._doc(tenant, doc_id), self._ver(tenant, doc_id), self._docs(tenant),
                  self._refs(tenant, doc_id), self._pending(), self._gone(tenant, doc_id)],
            args=[content_digest, texts, doc_id, floor, *self._script_args(tenant, doc_id), self.doc_ttl_ms, *keys],
            client=c))
        changed, version, orphans = bool(res[0]), int(res[1]), [k.decode() for k in res[2:]]

        def mirror() -> None:
            self.local.commit_document(doc_id, chunk_texts, content_digest, keys, tenant, version=version)

        self._mirror(doc_id, tenant, mirror)
        return changed, version, orphans

    def set_document(self, doc_id: str, chunk_texts: Sequence[str], content_digest: str, tenant: str) -> bool:
        """Raises RedisUnavailable while Redis is away (the write is refused, not half-applied)."""
        texts = json.dumps(list(chunk_texts), ensure_ascii=False)
        mine = self.local.info(doc_id, tenant) if (tenant, doc_id) not in self._untrusted else None
        floor = mine.version if mine is not None else 0
        changed, version = self.link.run(lambda c: self._set_doc(
            keys=[self._doc(tenant, doc_id), self._ver(tenant, doc_id), self._docs(tenant), self._pending(),
                  self._gone(tenant, doc_id)],
            args=[content_digest, texts, doc_id, floor, _name(tenant, doc_id)], client=c))
        if changed or mine is None or mine.content_digest != content_digest:
            self._mirror(doc_id, tenant, lambda: self.local.set_document(
                doc_id, chunk_texts, content_digest, tenant, version=int(version), pending=False))
        return bool(changed)

    def add_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str) -> bool:
        """Tie chunk keys to a document (a request's reads). Best effort: losing these refs
        costs nothing but tidiness (the KV keeps its TTL), so a refusal (OOM) or an outage is
        logged, not raised. Refs to a document removed meanwhile are refused (no ghost).
        Returns whether the refs were recorded in Redis."""
        keys = list(chunk_keys)
        if not keys:
            return True
        try:
            ok = self.link.run(lambda c: self._add_refs(
                keys=[self._refs(tenant, doc_id), self._docs(tenant), self._doc(tenant, doc_id),
                      self._gone(tenant, doc_id)],
                args=[_name(tenant, doc_id), self._users_prefix(), self.link.key("kv", ""), doc_id,
                      self.doc_ttl_ms, *keys],
                client=c))
        except RedisUnavailable as exc:
            # refs of chunks read during an outage: a best-effort local note (the document's own
            # ingest registered its refs in Redis already)
            self._degraded("add_refs", exc)
            ok = None
        if ok == 0:
            self.refused_refs += 1
            log.info("refs to document %r refused: it was removed while the request ran", doc_id)
            return False
        self._mirror(doc_id, tenant, lambda: self.local.add_refs(doc_id, keys, tenant), record=False)
        return ok is not None

    def replace_refs(self, doc_id: str, chunk_keys: Iterable[str], tenant: str, *,
                     version: int | None = None) -> list[str]:
        """Switch the refs, only if the document still exists and (with `version`) is still at
        that version; otherwise the given chunks nobody references are dropped. Raises
        RedisUnavailable while Redis is away."""
        keys = list(chunk_keys)
        orphans = self.link.run(lambda c: self._replace(
            keys=[self._doc(tenant, doc_id), self._refs(tenant, doc_id), self._pending()],
            args=[*self._script_args(tenant, doc_id), self.doc_ttl_ms, "" if version is None else str(version),
                  *keys], client=c))
        self._mirror(doc_id, tenant, lambda: self.local.replace_refs(doc_id, keys, tenant, version=version),
                     record=False)
        return [k.decode() for k in orphans]

    def remove_document(self, doc_id: str, tenant: str) -> list[str] | None:
        """Raises RedisUnavailable while Redis is away: a removal queued for later could undo a
        re-add acknowledged by another process in the meantime."""
        res = self.link.run(lambda c: self._remove(
            keys=[self._doc(tenant, doc_id), self._refs(tenant, doc_id), self._docs(tenant), self._pending(),
                  self._ver(tenant, doc_id), self._gone(tenant, doc_id)],
            args=[*self._script_args(tenant, doc_id), doc_id, self.tombstone_ttl_ms, self.gone_ttl_ms], client=c))
        self._mirror(doc_id, tenant, lambda: self.local.remove_document(doc_id, tenant))
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
        record newer than Redis's is never replaced by the older one. Best effort; never
        writes to Redis."""
        untrusted = (tenant, doc_id) in self._untrusted
        try:
            mine = self.local.info(doc_id, tenant)
            if rec is None:
                if mine is not None or untrusted:
                    self._mirror(doc_id, tenant, lambda: self.local.remove_document(doc_id, tenant))
            elif mine is None or untrusted or (mine.content_digest != rec[0] and rec[1] >= mine.version):
                self._mirror(doc_id, tenant, lambda: self.local.set_document(
                    doc_id, rec[2], rec[0], tenant, version=rec[1], pending=False))
        except Exception as exc:  # the mirror is best effort
            log.debug("local index mirror not updated: %s", exc)

    def info(self, doc_id: str, tenant: str) -> DocInfo | None:
        try:
            rec = self._record(doc_id, tenant)
        except RedisUnavailable as exc:
            self._local_read(doc_id, tenant, exc)
            return self.local.info(doc_id, tenant)
        self._sync_local(doc_id, tenant, rec)
        return None if rec is None else DocInfo(doc_id, rec[0], rec[1], len(rec[2]))

    def chunk_texts(self, doc_id: str, tenant: str) -> list[str]:
        try:
            rec = self._record(doc_id, tenant)
        except RedisUnavailable as exc:
            self._local_read(doc_id, tenant, exc)
            return self.local.chunk_texts(doc_id, tenant)
        self._sync_local(doc_id, tenant, rec)
        if rec is None:
            raise UnknownDocumentError(doc_id)
        return rec[2]

    def chunk_keys(self, doc_id: str, tenant: str) -> list[str]:
        try:
            return sorted(k.decode() for k in self.link.run(lambda c: c.smembers(self._refs(tenant, doc_id))))
        except RedisUnavailable as exc:
            self._local_read(doc_id, tenant, exc)
            return self.local.chunk_keys(doc_id, tenant)

    def refcount(self, key: str) -> int:
        try:
            return int(self.link.run(lambda c: c.scard(self._users_prefix() + key)))
        except RedisUnavailable:
            return self.local.refcount(key)

    def documents(self, tenant: str) -> list[str]:
        try:
            return sorted(d.decode() for d in self.link.run(lambda c: c.smembers(self._docs(tenant))))
        except RedisUnavailable:
            return self.local.documents(tenant)

    def num_documents(self, tenant: str) -> int:
        """How many documents `tenant` has (SCARD: constant cost, for metrics)."""
        try:
            return int(self.link.run(lambda c: c.scard(self._docs(tenant))))
        except RedisUnavailable:
            return self.local.num_documents(tenant)

    def pending_documents(self) -> list[tuple[str, str]]:
        """(tenant, doc_id) of documents whose text changed but whose refs were not switched yet
        (empty while Redis is away: the repair needs the authority)."""
        try:
            names = self.link.run(lambda c: c.smembers(self._pending()))
        except RedisUnavailable:
            return []
        pairs = [json.loads(n) for n in names]
        return sorted((str(t), str(d)) for t, d in pairs)

    def referenced_keys(self) -> set[str]:
        prefix = self._users_prefix()
        try:
            names = self.link.run(lambda c: list(c.scan_iter(match=prefix + "*", count=1000)))
        except RedisUnavailable:
            return self.local.referenced_keys()
        return {n.decode()[len(prefix):] for n in names}
