"""KV storage: ChunkKV, content keys, codecs, tiers, the store, eviction policies."""

DEFAULT_HOST_BYTES = 2 << 30
"""The host-RAM tier's byte cap unless one is given."""
DEFAULT_DISK_BYTES = 16 << 30
"""The disk tier's byte cap unless one is given (least recently used entries go first)."""
DEFAULT_PREFETCH_WINDOW = 4
"""Queued requests whose chunk KV is prefetched into host RAM ahead of need (0 turns look-ahead off)."""
