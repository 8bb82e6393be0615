"""KV storage: ChunkKV, content keys, codecs, tiers, the store, eviction policies."""
