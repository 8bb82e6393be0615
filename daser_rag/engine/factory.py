"""The one composition root: build a generator from settings (CLI, service, examples, benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_generator(model: Any = None, *, cache_dir: str | Path | None = None, **options: Any) -> Any:
    """A `CacheAwareGenerator` over the embedded default model unless `model` says otherwise.

    `options` are the generator's keyword options (codec, chunk_tokens, recompute_ratio,
    selector, prefix_tree, host_bytes, ...); unknown ones raise TypeError by name.
    """
    from daser_rag.generate import CacheAwareGenerator

    return CacheAwareGenerator(model, cache_dir=cache_dir, **options)
