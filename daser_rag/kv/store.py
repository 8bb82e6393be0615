"""The tiered KV store: an ordered list of tiers (device -> host RAM -> local disk -> shared
remote), plus the document index.

Every tier speaks the same `Tier` interface and the store loops over them in order: reads go
top-down and promote a hit into every local tier above it; writes go through every tier (so a
restart keeps the cache, and other processes see it through the remote tier); invalidation
removes entries from every tier, so no stale KV survives anywhere. A tier that fails (a remote
outage, a full local disk) degrades to a miss or a skipped write, never an error; the failure
is counted and reported (`problems()`, for /health) for a while.

Document writes: `register_document` only stages the new text (after reading the current record
from the index's authority), and `replace_document_refs` commits text, version and chunk refs
in one atomic step (`index.commit_document`). A write that fails (Redis full or away, disk
full) therefore leaves the previous version whole, and concurrent updates of one document are
ordered by commit: the chunk list always belongs to the text next to it, and each writer learns
the version it wrote (`written_version`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from daser_rag.context import SHARED_TENANT
from daser_rag.errors import UnknownDocumentError
from daser_rag.kv import DEFAULT_DISK_BYTES, DEFAULT_HOST_BYTES
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import CODECS, EncodedKV, decode, encode
from daser_rag.kv.doc_index import DocIndex, DocInfo
from daser_rag.kv.policies import EvictionPolicy
from daser_rag.kv.tiers.base import Tier
from daser_rag.kv.tiers.device import DeviceTier
from daser_rag.kv.tiers.disk import DiskTier
from daser_rag.kv.tiers.host import HostTier
from daser_rag.settings import CACHE_DIR, CODEC, GC_IDLE

if TYPE_CHECKING:
    from daser_rag.kv.redis_index import RedisDocIndex

log = logging.getLogger(__name__)

PROBLEM_WINDOW_S = 60.0
"""A tier failure is reported by `problems()` (and /health) for this long after it happened."""

_STAGE_MAX_AGE_S = 3600.0

MIN_FREE_BYTES = 1 << 20
"""Below this much free space under the cache directory, `problems()` reports the disk full."""


@dataclass(frozen=True, kw_only=True)
class StoreStats:
    """One snapshot of the store's state and counters, typed (what /metrics reads); `to_dict()`
    is the flat JSON `KVStore.stats()` and `daser-rag cache stats` have always printed."""

    codec: str
    documents: int  # the shared tenant's documents (-1: the index did not answer)
    bytes: dict[str, int]  # per tier name (-1: the tier did not answer)
    entries: dict[str, int]  # per tier name (-1: the tier did not answer)
    host_capacity_bytes: int
    evictions_host: int
    corrupt_dropped: int  # disk entries that failed their checksum
    counters: dict[str, int]
    """hit_<tier>, miss, put, invalidations, invalidated_chunks, gc_dropped, stale_dropped, error_<tier>."""

    @property
    def hits(self) -> dict[str, int]:
        """Reads served, per tier name."""
        return {k[4:]: v for k, v in self.counters.items() if k.startswith("hit_")}

    @property
    def errors(self) -> dict[str, int]:
        """Failed tier operations, per tier (or "index", "derived")."""
        return {k[6:]: v for k, v in self.counters.items() if k.startswith("error_")}

    @property
    def hit_rate(self) -> float:
        hits = sum(self.hits.values())
        total = hits + self.counters.get("miss", 0)
        return hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec, "documents": self.documents, "bytes": dict(self.bytes),
            "entries": dict(self.entries), "host_capacity_bytes": self.host_capacity_bytes,
            "evictions_host": self.evictions_host, "corrupt_dropped": self.corrupt_dropped,
        }
        out.update(self.counters)
        out["hit_rate"] = self.hit_rate
        return out


def default_cache_dir() -> Path:
    """$DASER_RAG_CACHE_DIR (declared in daser_rag/settings.py), else ~/.cache/daser-rag."""
    return Path(CACHE_DIR.value() or Path.home() / ".cache" / "daser-rag")


class KVStore:
    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host_bytes: int = DEFAULT_HOST_BYTES,
        disk_bytes: int | None = DEFAULT_DISK_BYTES,
        codec: str = CODEC.default,
        remote: Tier | None = None,
        policy: EvictionPolicy | None = None,
        index: DocIndex | RedisDocIndex | None = None,
        validate: Callable[[str], bool] | None = None,
        device: str | torch.device | None = None,
        device_bytes: int = 0,
    ) -> None:
        """`index` replaces the local SQLite document index (service mode shares one in Redis).
        `validate(key)` is asked before a host/disk hit is served; False means the entry was
        dropped elsewhere (another process invalidated it), so the local copy is deleted and the
        read becomes a miss. It must not raise; it should return True when it cannot tell.
        `device`/`device_bytes`: a GPU tier above host RAM (see tiers/device.py)."""
        if codec not in CODECS:
            raise ValueError(f"unknown KV codec {codec!r}; choose one of {CODECS}")
        self.codec = codec
        self.root = Path(root) if root is not None else None
        self._protected: Counter[str] = Counter()
        self.host = HostTier(host_bytes, policy, is_protected=self.is_protected)
        self.device: DeviceTier | None = None
        if device is not None and device_bytes > 0 and torch.device(device).type != "cpu":
            self.device = DeviceTier(device_bytes, device, is_protected=self.is_protected)
        self.disk = DiskTier(self.root / "kv", disk_bytes) if self.root is not None else None
        self.remote = remote
        self.index = index if index is not None else DocIndex(
            self.root / "index.sqlite" if self.root is not None else None)
        # entries derived from several documents (prefix-tree nodes): dropped when ANY of them goes
        self.derived = DocIndex(self.root / "derived.sqlite" if self.root is not None else None, track_gone=False)
        self.validate = validate
        self._lock = threading.RLock()
        self.counters: Counter[str] = Counter()
        self._last_error: dict[str, tuple[float, str]] = {}
        self.problem_window_s = PROBLEM_WINDOW_S
        self.min_free_bytes = MIN_FREE_BYTES
        # per thread: the registration waiting for its refs (register -> replace), and the
        # versions this thread's commits wrote
        self._tls = threading.local()

    # -- tiers -----------------------------------------------------------------------------
    @property
    def tiers(self) -> list[Tier]:
        """The tiers in lookup order; all but the remote one are this process's local copies."""
        return [t for t in (self.device, self.host, self.disk, self.remote) if t is not None]

    def _is_local(self, tier: Tier) -> bool:
        return tier is not self.remote

    def _local_valid(self, key: str) -> bool:
        """May a local copy of `key` be served? If not (dropped elsewhere), drop it here too."""
        if self.validate is None or self.validate(key):
            return True
        self.counters["stale_dropped"] += 1
        for tier in self.tiers:
            if self._is_local(tier):
                self._try(tier, "delete", key)
        return False

    def _try(self, tier: Tier, op: str, *args: Any) -> Any:
        """One tier call; a failing tier counts an error and acts as a miss / skipped write."""
        try:
            return getattr(tier, op)(*args)
        except Exception as exc:
            self._note_error(tier.name, op, exc)
            return None

    def _note_error(self, what: str, op: str, exc: BaseException) -> None:
        self.counters[f"error_{what}"] += 1
        self._last_error[what] = (time.monotonic(), f"{op}: {exc}")
        log.warning("tier %s unavailable on %s: %s", what, op, exc)

    def problems(self) -> list[str]:
        """Storage trouble right now, one line each (empty: none), for /health: a tier that
        failed within `PROBLEM_WINDOW_S` (a full local disk, ...), the index mirror, Redis
        refusing commands (OOM, READONLY) or unreachable."""
        out = []
        now = time.monotonic()
        if self.root is not None:  # one statvfs: the disk's state now, not only the last write's
            try:
                st = os.statvfs(self.root)
                free = st.f_bavail * st.f_frsize
                if free < self.min_free_bytes:
                    out.append(f"local disk full: {free} bytes free under {self.root}")
            except OSError:
                pass
        for what, (at, msg) in sorted(self._last_error.items()):
            if now - at <= self.problem_window_s:
                kind = "local disk" if what in ("disk", "derived") else what
                full = "full" if ("No space" in msg or "disk is full" in msg or "full" in msg.lower()) else "failing"
                out.append(f"{kind} {full} ({now - at:.0f}s ago): {msg[:160]}")
        problem = getattr(self.index, "problem", None)
        reason = problem(self.problem_window_s) if callable(problem) else None
        if reason:
            out.append(reason)
        problem = getattr(getattr(self.remote, "link", None), "problem", None)
        reason = problem() if callable(problem) else None
        if reason:
            out.append(reason)
        return out

    def remote_health(self, *, probe: bool = True) -> bool | None:
        """The remote (Redis) tier for /health: None without one; with `probe`, whether it
        answers a PING now (bounded by the link's probe timeout), else the circuit breaker's
        current verdict (no I/O)."""
        from daser_rag.kv.tiers.redis import RedisTier

        if not isinstance(self.remote, RedisTier):
            return None
        return self.remote.link.ping() if probe else self.remote.link.up

    def get_encoded(self, key: str) -> EncodedKV | None:
        tiers = self.tiers
        for i, tier in enumerate(tiers):
            enc: EncodedKV | None = self._try(tier, "get", key)
            if enc is None:
                continue
            if self._is_local(tier) and not self._local_valid(key):
                break  # dropped elsewhere: every local copy is gone now, and so is the remote one
            self.counters[f"hit_{tier.name}"] += 1
            for upper in tiers[:i]:  # promote into every local tier above the hit
                if self._is_local(upper):
                    self._try(upper, "put", enc)
            return enc
        self.counters["miss"] += 1
        return None

    def get(self, key: str, *, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> ChunkKV | None:
        enc = self.get_encoded(key)
        return None if enc is None else decode(enc, dtype=dtype, device=device)

    def put(self, kv: ChunkKV, *, codec: str | None = None) -> EncodedKV:
        enc = encode(kv, codec or self.codec)
        self.put_encoded(enc)
        return enc

    def put_encoded(self, enc: EncodedKV) -> None:
        self.counters["put"] += 1
        for tier in self.tiers:
            self._try(tier, "put", enc)

    def contains(self, key: str) -> bool:
        local = [t for t in self.tiers if self._is_local(t)]
        if any(self._try(t, "contains", key) for t in local) and self._local_valid(key):
            return True
        return self.remote is not None and bool(self._try(self.remote, "contains", key))

    def delete(self, key: str) -> bool:
        dropped = False
        for tier in self.tiers:
            dropped = bool(self._try(tier, "delete", key)) or dropped
        return dropped

    # -- protection (look-ahead) --------------------------------------------------------------
    def protect(self, keys: list[str]) -> None:
        with self._lock:
            self._protected.update(keys)

    def unprotect(self, keys: list[str]) -> None:
        with self._lock:
            self._protected.subtract(keys)
            for k in keys:
                if self._protected[k] <= 0:
                    del self._protected[k]

    def is_protected(self, key: str) -> bool:
        return self._protected.get(key, 0) > 0

    def protected_keys(self) -> list[str]:
        with self._lock:
            return [k for k, n in self._protected.items() if n > 0]

    def in_host(self, key: str) -> bool:
        """True when a get() would be served from RAM (no disk or remote I/O)."""
        return self.host.contains(key)

    def note_cost(self, key: str, seconds: float) -> None:
        """Tell a cost-aware host policy what a miss on `key` really costs (measured)."""
        set_cost = getattr(self.host.policy, "set_cost", None)
        if set_cost is not None:
            set_cost(key, seconds)

    # -- documents ---------------------------------------------------------------------------
    # The document index is written only through these methods (never by callers reaching into
    # `store.index`), so every writer keeps refcounts and derived entries consistent.
    def register_document(self, doc_id: str, chunk_texts: list[str], digest: str, tenant: str) -> bool:
        """Stage a document's chunk texts and content digest; True when it is new or changed.
        Nothing is written until `replace_document_refs` (same thread) commits text and refs
        together; an unchanged document needs no commit. Reads the index's authority (Redis),
        so while it is away this raises at once instead of after the KV was computed."""
        current = getattr(self.index, "authoritative_info", self.index.info)(doc_id, tenant)
        if current is not None and current.content_digest == digest:
            # unchanged: the refs switch that follows is a compare-and-set on this version, so
            # it cannot pair this text's chunks with a newer text committed meanwhile
            self._tls.stage = ((tenant, doc_id), None, digest, time.monotonic(), current.version)
            self._written()[(tenant, doc_id)] = current.version
            return False
        self._tls.stage = ((tenant, doc_id), list(chunk_texts), digest, time.monotonic(), None)
        return True

    def _written(self) -> dict[tuple[str, str], int]:
        w = getattr(self._tls, "written", None)
        if w is None or len(w) > 10_000:
            w = self._tls.written = {}
        return w

    def written_version(self, doc_id: str, tenant: str) -> int | None:
        """The version this thread's last registration of the document wrote (or found
        unchanged): what an add/update reports, even if another writer committed a newer one
        since. None if this thread wrote none."""
        return self._written().get((tenant, doc_id))

    def add_refs(self, doc_id: str, keys: list[str], tenant: str) -> None:
        """Tie chunk keys to a document, so invalidating it drops them (unless shared). A read's
        bookkeeping: refused for a document removed meanwhile (no ghost), and a failure (disk
        full, Redis full) is counted and logged, never raised: losing it costs tidiness only."""
        try:
            self.index.add_refs(doc_id, list(keys), tenant)
        except Exception as exc:
            self._note_error("index", "add_refs", exc)

    def document_info(self, doc_id: str, tenant: str) -> DocInfo | None:
        return self.index.info(doc_id, tenant)

    def document_chunk_texts(self, doc_id: str, tenant: str) -> list[str]:
        return self.index.chunk_texts(doc_id, tenant)

    def document_chunk_keys(self, doc_id: str, tenant: str) -> list[str]:
        return self.index.chunk_keys(doc_id, tenant)

    def documents(self, tenant: str) -> list[str]:
        return self.index.documents(tenant)

    def invalidate(self, doc_id: str, tenant: str) -> list[str]:
        """Drop a document and exactly the chunk KV no other document uses. Idempotent."""
        self._tls.stage = None
        orphans = self.index.remove_document(doc_id, tenant)
        self._written().pop((tenant, doc_id), None)
        derived = self._drop_derived(doc_id, tenant)
        if orphans is None:
            return derived
        orphans = orphans + [k for k in derived if k not in orphans]
        for key in orphans:
            self.delete(key)
        self.counters["invalidations"] += 1
        self.counters["invalidated_chunks"] += len(orphans)
        return orphans

    def replace_document_refs(self, doc_id: str, keys: list[str], tenant: str, *,
                              version: int | None = None) -> list[str]:
        """Make `keys` the document's chunk refs; returns the chunk keys dropped. After this
        thread's `register_document` of the same document, text and refs are committed together
        (atomic; the version written is kept for `written_version`). Otherwise a plain switch,
        compare-and-set on `version` when given (refused when the document moved on)."""
        stage, self._tls.stage = getattr(self._tls, "stage", None), None
        if stage is not None and (stage[0] != (tenant, doc_id) or time.monotonic() - stage[3] >= _STAGE_MAX_AGE_S):
            stage = None
        if stage is not None and stage[1] is None:
            if version is None:
                version = stage[4]  # registered unchanged: switch only while still at that version
            stage = None
        if stage is not None:
            _, texts, digest, _, _ = stage
            commit = getattr(self.index, "commit_document", None)
            if commit is not None:
                _changed, written, orphans = commit(doc_id, texts, digest, keys, tenant)
            else:  # an index without atomic commits: two steps
                self.index.set_document(doc_id, texts, digest, tenant)
                orphans = self.index.replace_refs(doc_id, keys, tenant)
                info = self.index.info(doc_id, tenant)
                written = info.version if info is not None else 0
            self._written()[(tenant, doc_id)] = written
        else:
            orphans = self.index.replace_refs(doc_id, keys, tenant, version=version)
        if orphans:  # the document changed: entries derived from its old text are garbage
            orphans = orphans + [k for k in self._drop_derived(doc_id, tenant) if k not in orphans]
        for key in orphans:
            self.delete(key)
        if orphans:
            self.counters["invalidated_chunks"] += len(orphans)
        return list(orphans)

    def repair_documents(self, key_for: Callable[[str, str], str]) -> list[tuple[str, str]]:
        """Finish document switches a crash interrupted: a document whose text was registered but
        whose refs still name the old chunks gets the refs of its registered text (the old
        chunks' KV is dropped unless shared), compare-and-set on the version read, so a newer
        update committed meanwhile is never overwritten. `key_for(chunk_text, tenant)` is the
        generator's chunk key. Returns the repaired (tenant, doc_id) pairs. Run at start.
        (Updates through the store commit text and refs together and leave nothing to repair;
        this finishes what older versions or direct index writers left.)"""
        repaired = []
        for tenant, doc_id in self.index.pending_documents():
            info = self.index.info(doc_id, tenant)
            try:
                texts = self.index.chunk_texts(doc_id, tenant)
            except UnknownDocumentError:
                continue
            if info is None:
                continue
            self.replace_document_refs(doc_id, [key_for(t, tenant) for t in texts], tenant, version=info.version)
            repaired.append((tenant, doc_id))
        return repaired

    def add_derived(self, doc_ids: list[str], key: str, tenant: str) -> None:
        """Register an entry built from several documents; invalidating any one drops it. If it
        cannot be registered (local disk full), the entry is dropped instead of outliving its
        documents; the request that built it is not failed."""
        try:
            for d in dict.fromkeys(doc_ids):
                self.derived.add_refs(d, [key], tenant)
        except Exception as exc:
            self._note_error("derived", "add_derived", exc)
            self.delete(key)

    def _drop_derived(self, doc_id: str, tenant: str) -> list[str]:
        """Drop the entries derived from a document. Runs after the document's own removal or
        update was committed, so it must not fail it: if the local derived index cannot be
        written (disk full), the entries are still deleted (nothing stale is served) and only
        the bookkeeping rows stay behind (deleting them again later is harmless)."""
        keys = self.derived.chunk_keys(doc_id, tenant)
        if keys:
            try:
                self.derived.remove_document(doc_id, tenant)
            except Exception as exc:
                self._note_error("derived", "drop_derived", exc)
        for key in keys:
            self.delete(key)
        return keys

    # -- housekeeping -------------------------------------------------------------------------
    def snapshot(self) -> StoreStats:
        """The store's state and counters now, typed."""
        return StoreStats(
            codec=self.codec,
            documents=self._num_documents(),
            bytes={t.name: self._safe_nbytes(t) for t in self.tiers},
            entries={t.name: self._safe_len(t) for t in self.tiers},
            host_capacity_bytes=self.host.capacity_bytes,
            evictions_host=self.host.evictions,
            corrupt_dropped=self.disk.corrupt_dropped if self.disk else 0,
            counters=dict(self.counters),
        )

    def stats(self) -> dict[str, Any]:
        """`snapshot()` as the flat JSON dict the CLI prints (counters at the top level)."""
        return self.snapshot().to_dict()

    def collect_garbage(self, max_idle_s: float = GC_IDLE.default) -> list[str]:
        """Drop local KV that no document (and no multi-document entry) references and that
        nobody read for `max_idle_s`: the KV of plain-text context. Returns the dropped keys.
        (In Redis such entries carry a TTL instead; see RedisTier.)"""
        if self.disk is None:
            return []
        keep = self.index.referenced_keys() | self.derived.referenced_keys()
        dropped = []
        for key in self.disk.idle_keys(max_idle_s):
            if key in keep or self.is_protected(key):
                continue
            for tier in self.tiers:
                if self._is_local(tier):
                    self._try(tier, "delete", key)
            dropped.append(key)
        self.counters["gc_dropped"] += len(dropped)
        return dropped

    @staticmethod
    def _safe_nbytes(tier: Tier) -> int:
        try:
            return tier.nbytes()
        except Exception:
            return -1

    @staticmethod
    def _safe_len(tier: Tier) -> int:
        try:
            count = getattr(tier, "num_entries", None)
            return int(count()) if callable(count) else len(list(tier.keys()))
        except Exception:
            return -1

    def _num_documents(self) -> int:
        """The shared tenant's documents (what `daser-rag cache stats` reports; counting every
        tenant's would scan Redis)."""
        try:
            return int(self.index.num_documents(SHARED_TENANT))
        except Exception:
            return -1

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()
        self.index.clear()
        self.derived.clear()
        self.counters.clear()
