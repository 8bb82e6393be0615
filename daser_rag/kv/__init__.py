"""KV storage: ChunkKV, content keys, codecs, tiers, the store, eviction policies."""

from daser_rag import settings as _settings

DEFAULT_HOST_BYTES = _settings.HOST_BYTES.default
"""The host-RAM tier's byte cap unless one is given."""
DEFAULT_DISK_BYTES = _settings.DISK_BYTES.default
"""The disk tier's byte cap unless one is given (least recently used entries go first)."""
DEFAULT_PREFETCH_WINDOW = _settings.PREFETCH_WINDOW.default
"""Queued requests whose chunk KV is prefetched into host RAM ahead of need (0 turns look-ahead off)."""
