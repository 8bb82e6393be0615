"""daser-rag for LlamaIndex: cached chunk KV behind the usual LlamaIndex components.

- `DaserLLM`: a `CustomLLM` over any `KVGenerator`; plain prompts work as with any LLM, document
  refs (`contexts=`) are answered from cached chunk KV.
- `CacheAwareSynthesizer`: for `RetrieverQueryEngine.from_args(retriever, response_synthesizer=...)`;
  passes each retrieved node as its own chunk.
- `KVPrecomputeTransform`: an `IngestionPipeline` step that builds chunk KV at index time.
- `InvalidatingFaissVectorStore`: FAISS with working deletes; every knowledge-base change drops
  exactly the KV of the documents it touched (through `KVSync`).
- `MiniLMEmbedding`: an offline sentence embedding (all-MiniLM-L6-v2 from a PyPI wheel).
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("integrations.llama_index needs LlamaIndex: pip install 'daser-rag[llama-index]'") from exc

from integrations.llama_index.embeddings import MiniLMEmbedding
from integrations.llama_index.kv_sync import (
    KVSync,
    PrecomputeReport,
    node_chunk_ref,
    node_doc_id,
    rendered_text,
)
from integrations.llama_index.llm import DaserLLM
from integrations.llama_index.synthesizer import DASER_KEY, CacheAwareSynthesizer
from integrations.llama_index.transform import KVPrecomputeTransform
from integrations.llama_index.vector_store import (
    InvalidatingFaissVectorStore,
    KnowledgeBaseHook,
)

__all__ = [
    "DASER_KEY",
    "CacheAwareSynthesizer",
    "DaserLLM",
    "InvalidatingFaissVectorStore",
    "KVPrecomputeTransform",
    "KVSync",
    "KnowledgeBaseHook",
    "MiniLMEmbedding",
    "PrecomputeReport",
    "node_chunk_ref",
    "node_doc_id",
    "rendered_text",
]
