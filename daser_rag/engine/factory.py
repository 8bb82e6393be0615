"""The one composition root: build a generator (and its default store) from settings.

The CLI, the service, the examples and the benchmarks all build through here, so a setting
means the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daser_rag import settings
from daser_rag.kv.store import KVStore, default_cache_dir


def default_store(cache_dir: str | Path | None = None, *, codec: str = settings.CODEC.default,
                  host_bytes: int | None = None, device: Any = None,
                  device_bytes: int = settings.DEVICE_BYTES.default) -> KVStore:
    """Host RAM + disk under `cache_dir` (default ~/.cache/daser-rag), plus a GPU tier on CUDA."""
    kwargs: dict[str, Any] = {"codec": codec}
    if host_bytes is not None:
        kwargs["host_bytes"] = host_bytes
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        kwargs.update(device=device, device_bytes=device_bytes)
    return KVStore(cache_dir if cache_dir is not None else default_cache_dir(), **kwargs)


def build_generator(model: Any = None, *, cache_dir: str | Path | None = None, **options: Any) -> Any:
    """A `CacheAwareGenerator` over the embedded default model unless `model` says otherwise.

    `options` are the generator's keyword options (codec, chunk_tokens, recompute_ratio,
    selector, prefix_tree, host_bytes, store, ...); unknown ones raise TypeError by name.
    """
    from daser_rag.engine.generator import CacheAwareGenerator

    return CacheAwareGenerator(model, cache_dir=cache_dir, **options)
