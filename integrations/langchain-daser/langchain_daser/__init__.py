"""LangChain integration for daser-rag (a `langchain_<provider>` partner package).

One line for KV reuse: `create_daser_rag_chain(retriever, ChatDaser(generator=gen))` (or put
`DocumentsToMessages` where a stock chain has `format_docs | prompt`).

- `ChatDaser`: chat model; documents passed as `text-plain` blocks or `documents=` are fused
  from their cached KV.
- `DaserVectorStore`: VectorStore wrapper whose writes precompute KV and whose deletes
  invalidate it, so `langchain_core.indexing.index()` keeps the KV cache consistent.
- `DaserRetriever`: carries document ids through any retriever.
- `create_daser_rag_chain` / `DocumentsToMessages`: the LCEL recipe.
- `MiniLMEmbeddings`: offline sentence embeddings for the vector store.
"""

from importlib.metadata import PackageNotFoundError, version

from langchain_daser._convert import DOC_ID_KEY, documents_to_blocks
from langchain_daser.chains import (
    DocumentsToMessages,
    create_daser_rag_chain,
    documents_to_messages,
)
from langchain_daser.chat_models import ChatDaser, NoKVReuseWarning
from langchain_daser.embeddings import MiniLMEmbeddings
from langchain_daser.retrievers import DaserRetriever
from langchain_daser.vectorstores import PARENT_ID_KEY, DaserVectorStore

try:
    __version__ = version("langchain-daser")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "DOC_ID_KEY",
    "ChatDaser",
    "DaserRetriever",
    "DaserVectorStore",
    "DocumentsToMessages",
    "MiniLMEmbeddings",
    "NoKVReuseWarning",
    "PARENT_ID_KEY",
    "__version__",
    "create_daser_rag_chain",
    "documents_to_blocks",
    "documents_to_messages",
]
