"""Host-RAM tier: a byte budget and a pluggable eviction policy (LRU by default)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from daser_rag.kv.codecs import EncodedKV
from daser_rag.kv.policies import EvictionPolicy, LRUPolicy


class HostTier:
    name = "host"

    def __init__(
        self,
        capacity_bytes: int,
        policy: EvictionPolicy | None = None,
        *,
        on_evict: Callable[[EncodedKV], None] | None = None,
        is_protected: Callable[[str], bool] | None = None,
    ) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self.policy = policy or LRUPolicy()
        self._entries: dict[str, EncodedKV] = {}
        self._bytes = 0
        self._lock = threading.RLock()
        self.on_evict = on_evict
        self.is_protected = is_protected or (lambda _k: False)
        self.evictions = 0

    def get(self, key: str) -> EncodedKV | None:
        with self._lock:
            enc = self._entries.get(key)
            if enc is not None:
                self.policy.on_access(key)
            return enc

    def put(self, enc: EncodedKV) -> None:
        size = enc.nbytes
        if size > self.capacity_bytes:
            return  # larger than the whole tier: lower tiers keep it
        with self._lock:
            if enc.key in self._entries:
                self._remove(enc.key)
            self._make_room(size)
            if self._bytes + size > self.capacity_bytes:
                return  # everything left is protected; lower tiers still hold it
            self._entries[enc.key] = enc
            self._bytes += size
            self.policy.on_insert(enc.key, size)

    def _make_room(self, size: int) -> None:
        if self._bytes + size <= self.capacity_bytes:
            return
        for victim in self.policy.victims():
            if self._bytes + size <= self.capacity_bytes:
                break
            if victim not in self._entries or self.is_protected(victim):
                continue
            enc = self._entries[victim]
            self._remove(victim)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(enc)

    def _remove(self, key: str) -> None:
        enc = self._entries.pop(key)
        self._bytes -= enc.nbytes
        self.policy.on_remove(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._remove(key)
            return True

    def contains(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> Iterable[str]:
        with self._lock:
            return list(self._entries)

    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._remove(k)
