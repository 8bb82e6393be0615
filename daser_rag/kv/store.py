"""The tiered KV store: an ordered list of tiers (device -> host RAM -> local disk -> shared
remote), plus the document index.

Every tier speaks the same `Tier` interface and the store loops over them in order: reads go
top-down and promote a hit into every local tier above it; writes go through every tier (so a
restart keeps the cache, and other processes see it through the remote tier); invalidation
removes entries from every tier, so no stale KV survives anywhere. A tier that fails (a remote
outage) degrades to a miss or a skipped write, never an error.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from daser_rag.errors import UnknownDocumentError
from daser_rag.kv import DEFAULT_DISK_BYTES, DEFAULT_HOST_BYTES
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import CODECS, EncodedKV, decode, encode
from daser_rag.kv.doc_index import DocIndex
from daser_rag.kv.policies import EvictionPolicy
from daser_rag.kv.tiers.base import Tier
from daser_rag.kv.tiers.device import DeviceTier
from daser_rag.kv.tiers.disk import DiskTier
from daser_rag.kv.tiers.host import HostTier

log = logging.getLogger(__name__)



def default_cache_dir() -> Path:
    return Path(os.environ.get("DASER_RAG_CACHE_DIR", Path.home() / ".cache" / "daser-rag"))


class KVStore:
    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        host_bytes: int = DEFAULT_HOST_BYTES,
        disk_bytes: int | None = DEFAULT_DISK_BYTES,
        codec: str = "fp16",
        remote: Tier | None = None,
        policy: EvictionPolicy | None = None,
        index: DocIndex | None = None,
        validate: Callable[[str], bool] | None = None,
        device: Any = None,
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
        self.derived = DocIndex(self.root / "derived.sqlite" if self.root is not None else None)
        self.validate = validate
        self._lock = threading.RLock()
        self.counters: Counter[str] = Counter()

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
            self.counters[f"error_{tier.name}"] += 1
            log.warning("tier %s unavailable on %s: %s", tier.name, op, exc)
            return None

    def get_encoded(self, key: str) -> EncodedKV | None:
        tiers = self.tiers
        for i, tier in enumerate(tiers):
            enc = self._try(tier, "get", key)
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

    def get(self, key: str, *, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> ChunkKV | None:
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
    def register_document(self, doc_id: str, chunk_texts: list[str], digest: str, tenant: str = "") -> bool:
        """Record a document's chunk texts and content digest; True when it is new or changed."""
        return bool(self.index.set_document(doc_id, chunk_texts, digest, tenant))

    def add_refs(self, doc_id: str, keys: list[str], tenant: str = "") -> None:
        """Tie chunk keys to a document, so invalidating it drops them (unless shared)."""
        self.index.add_refs(doc_id, list(keys), tenant)

    def document_info(self, doc_id: str, tenant: str = "") -> Any:
        return self.index.info(doc_id, tenant)

    def document_chunk_texts(self, doc_id: str, tenant: str = "") -> list[str]:
        return self.index.chunk_texts(doc_id, tenant)

    def document_chunk_keys(self, doc_id: str, tenant: str = "") -> list[str]:
        return self.index.chunk_keys(doc_id, tenant)

    def documents(self, tenant: str = "") -> list[str]:
        return self.index.documents(tenant)

    def invalidate(self, doc_id: str, tenant: str = "") -> list[str]:
        """Drop a document and exactly the chunk KV no other document uses. Idempotent."""
        orphans = self.index.remove_document(doc_id, tenant)
        derived = self._drop_derived(doc_id, tenant)
        if orphans is None:
            return derived
        orphans = orphans + [k for k in derived if k not in orphans]
        for key in orphans:
            self.delete(key)
        self.counters["invalidations"] += 1
        self.counters["invalidated_chunks"] += len(orphans)
        return orphans

    def replace_document_refs(self, doc_id: str, keys: list[str], tenant: str = "") -> list[str]:
        orphans = self.index.replace_refs(doc_id, keys, tenant)
        if orphans:  # the document changed: entries derived from its old text are garbage
            orphans = orphans + [k for k in self._drop_derived(doc_id, tenant) if k not in orphans]
        for key in orphans:
            self.delete(key)
        if orphans:
            self.counters["invalidated_chunks"] += len(orphans)
        return orphans

    def repair_documents(self, key_for: Callable[[str, str], str]) -> list[tuple[str, str]]:
        """Finish document switches a crash interrupted: a document whose text was registered but
        whose refs still name the old chunks gets the refs of its registered text (the old
        chunks' KV is dropped unless shared). `key_for(chunk_text, tenant)` is the generator's
        chunk key. Returns the repaired (tenant, doc_id) pairs. Run at start."""
        repaired = []
        for tenant, doc_id in self.index.pending_documents():
            try:
                texts = self.index.chunk_texts(doc_id, tenant)
            except UnknownDocumentError:
                continue
            self.replace_document_refs(doc_id, [key_for(t, tenant) for t in texts], tenant)
            repaired.append((tenant, doc_id))
        return repaired

    def add_derived(self, doc_ids: list[str], key: str, tenant: str = "") -> None:
        """Register an entry built from several documents; invalidating any one drops it."""
        for d in dict.fromkeys(doc_ids):
            self.derived.add_refs(d, [key], tenant)

    def _drop_derived(self, doc_id: str, tenant: str) -> list[str]:
        keys = self.derived.chunk_keys(doc_id, tenant)
        if keys:
            self.derived.remove_document(doc_id, tenant)
        for key in keys:
            self.delete(key)
        return keys

    # -- housekeeping -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "codec": self.codec,
            "documents": len(self.index.documents()),
            "bytes": {t.name: self._safe_nbytes(t) for t in self.tiers},
            "entries": {t.name: self._safe_len(t) for t in self.tiers},
            "host_capacity_bytes": self.host.capacity_bytes,
            "evictions_host": self.host.evictions,
            "corrupt_dropped": self.disk.corrupt_dropped if self.disk else 0,
        }
        out.update(self.counters)
        hits = sum(v for k, v in self.counters.items() if k.startswith("hit_"))
        total = hits + self.counters["miss"]
        out["hit_rate"] = hits / total if total else 0.0
        return out

    def collect_garbage(self, max_idle_s: float = 3600.0) -> list[str]:
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
            return len(list(tier.keys()))
        except Exception:
            return -1

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()
        self.index.clear()
        self.derived.clear()
        self.counters.clear()
