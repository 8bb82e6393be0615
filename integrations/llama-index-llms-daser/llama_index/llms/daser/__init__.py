"""daser-rag for LlamaIndex: cached chunk KV behind the usual LlamaIndex components.

One line for KV reuse: `index.as_query_engine(response_synthesizer=CacheAwareSynthesizer(DaserLLM(gen)))`.

- `DaserLLM`: a `CustomLLM` over any `KVGenerator`; plain prompts work as with any LLM (full
  prefill, with a one-time warning that nothing is reused), document refs (`contexts=`) are
  answered from cached chunk KV.
- `CacheAwareSynthesizer`: for `RetrieverQueryEngine.from_args(retriever, response_synthesizer=...)`
  or `index.as_query_engine(response_synthesizer=...)`; passes each retrieved node as its own chunk.
- `CacheAwareContextChatEngine`: a context chat engine (like `chat_mode="context"`) whose every
  turn reuses the retrieved nodes' KV; stock chat engines flatten nodes into a string.
- `CacheAwareCondensePlusContextChatEngine`: the same for `chat_mode="condense_plus_context"`
  (the condensed question is the query; retrieved nodes are reusable chunks).
- `KVPrecomputeTransform`: an `IngestionPipeline` step that builds chunk KV at index time and
  splits nodes longer than the model's window.
- `MiniLMEmbedding`: an offline sentence embedding (all-MiniLM-L6-v2 from a PyPI wheel).

The FAISS store that invalidates KV on every knowledge-base change is in
`llama_index.vector_stores.daser` (distribution `llama-index-vector-stores-daser`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from llama_index.llms.daser import instrumentation as _instrumentation
from llama_index.llms.daser.base import DaserLLM, NoKVReuseWarning, result_summary
from llama_index.llms.daser.chat_engine import CacheAwareCondensePlusContextChatEngine, CacheAwareContextChatEngine
from llama_index.llms.daser.embeddings import MiniLMEmbedding
from llama_index.llms.daser.kv_sync import (
    KVSync,
    PrecomputeReport,
    node_chunk_ref,
    node_doc_id,
    rendered_text,
)
from llama_index.llms.daser.synthesizer import DASER_KEY, CacheAwareSynthesizer
from llama_index.llms.daser.transform import KVPrecomputeTransform

_instrumentation.install()  # daser metadata on stock responses; as_query_engine(streaming=True) streams

try:
    __version__ = version("llama-index-llms-daser")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "DASER_KEY",
    "CacheAwareCondensePlusContextChatEngine",
    "CacheAwareContextChatEngine",
    "CacheAwareSynthesizer",
    "DaserLLM",
    "KVPrecomputeTransform",
    "KVSync",
    "MiniLMEmbedding",
    "NoKVReuseWarning",
    "PrecomputeReport",
    "__version__",
    "node_chunk_ref",
    "node_doc_id",
    "rendered_text",
    "result_summary",
]
