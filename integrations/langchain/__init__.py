"""LangChain integration for daser-rag (shaped like a `langchain_<provider>` partner package).

- `ChatDaser`: chat model; documents passed as `text-plain` blocks or `documents=` are fused
  from their cached KV.
- `DaserVectorStore`: VectorStore wrapper whose writes precompute KV and whose deletes
  invalidate it, so `langchain_core.indexing.index()` keeps the KV cache consistent.
- `DaserRetriever`: carries document ids through any retriever.
- `create_daser_rag_chain` / `DocumentsToMessages`: the LCEL recipe.
- `MiniLMEmbeddings`: offline sentence embeddings for the vector store.
"""

from integrations.langchain._convert import DOC_ID_KEY, documents_to_blocks
from integrations.langchain.chains import (
    DocumentsToMessages,
    create_daser_rag_chain,
    documents_to_messages,
)
from integrations.langchain.chat_models import ChatDaser
from integrations.langchain.embeddings import MiniLMEmbeddings
from integrations.langchain.retrievers import DaserRetriever
from integrations.langchain.vectorstores import DaserVectorStore

__all__ = [
    "DOC_ID_KEY",
    "ChatDaser",
    "DaserRetriever",
    "DaserVectorStore",
    "DocumentsToMessages",
    "MiniLMEmbeddings",
    "create_daser_rag_chain",
    "documents_to_blocks",
    "documents_to_messages",
]
