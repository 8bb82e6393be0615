"""daser-rag: RAG-native KV-cache middleware.

Precompute each chunk's KV once, fuse stored chunk KV at query time (RoPE re-rotation +
CacheBlend selective recompute), and invalidate exactly what a knowledge-base change touches.
"""

from typing import Any

from daser_rag.errors import (
    ContextTooLongError,
    CorruptEntryError,
    DaserError,
    InvalidInputError,
    ModelLoadError,
    UnknownDocumentError,
)
from daser_rag.types import ChunkRef, Document, GenerationResult, Timings

try:  # one place for the version: the installed distribution's metadata (pyproject.toml)
    from importlib.metadata import version as _version

    __version__ = _version("daser-rag")
except Exception:  # noqa: BLE001 - not installed (a bare source tree)
    __version__ = "0.0.0+unknown"

__all__ = [
    "CacheAwareGenerator",
    "KVStore",
    "ChunkRef",
    "Document",
    "GenerationResult",
    "Timings",
    "load_model",
    "DaserError",
    "InvalidInputError",
    "UnknownDocumentError",
    "ContextTooLongError",
    "ModelLoadError",
    "CorruptEntryError",
]


def __getattr__(name: str) -> Any:  # lazy: importing the package must not import torch eagerly
    if name == "CacheAwareGenerator":
        from daser_rag.engine.generator import CacheAwareGenerator

        return CacheAwareGenerator
    if name == "KVStore":
        from daser_rag.kv.store import KVStore

        return KVStore
    if name == "load_model":
        from daser_rag.model.loader import load_model

        return load_model
    raise AttributeError(name)
