"""daser-rag for LlamaIndex: a FAISS vector store whose changes invalidate exactly the affected KV.

`DaserFaissVectorStore(generator=gen)`: FAISS (`IndexIDMap2`) with working deletes. Every way
LlamaIndex changes a knowledge base (IngestionPipeline upserts, `delete_ref_doc`,
`update_ref_doc`, `refresh_ref_docs`, `delete_nodes`) drops the chunk KV of the documents it
touched, and nodes longer than the model's window are split before anything is written.
`InvalidatingFaissVectorStore` is the same class under its old name.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from llama_index.vector_stores.daser.base import (
    DaserFaissVectorStore,
    InvalidatingFaissVectorStore,
    KnowledgeBaseHook,
)

try:
    __version__ = version("llama-index-vector-stores-daser")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["DaserFaissVectorStore", "InvalidatingFaissVectorStore", "KnowledgeBaseHook", "__version__"]
