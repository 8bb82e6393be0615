"""DaserRetriever: makes any retriever's Documents carry the ids their cached KV is filed under.

ChatDaser finds a document's KV by its exact text; the id only ties the chunks to a document
so that deleting or editing the document drops them. Documents from a `DaserVectorStore`
already carry `metadata["daser_doc_id"]`; for any other retriever this wrapper derives it
(from `Document.id` by default), and drops repeated documents so one text is not placed in
the prompt twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from langchain_daser._convert import DOC_ID_KEY


def _default_doc_id(doc: Document) -> str | None:
    return doc.id or None


class DaserRetriever(BaseRetriever):
    """Wraps a retriever; see the module docstring.

    Example:
        ```python
        retriever = DaserRetriever.from_vectorstore(store, k=3)
        chain = create_daser_rag_chain(retriever, ChatDaser(generator=gen))
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: BaseRetriever
    doc_id_fn: Callable[[Document], str | None] = _default_doc_id
    """Maps a retrieved Document to its daser doc id when it does not carry one."""

    @classmethod
    def from_vectorstore(cls, vectorstore: Any, **search_kwargs: Any) -> DaserRetriever:
        """`vectorstore.as_retriever(search_kwargs=...)` wrapped; for a DaserVectorStore the
        ids are already mapped."""
        return cls(retriever=vectorstore.as_retriever(search_kwargs=search_kwargs))

    def _carry_ids(self, docs: list[Document]) -> list[Document]:
        out: list[Document] = []
        seen: set[tuple[str | None, str]] = set()
        for doc in docs:
            doc_id = (doc.metadata or {}).get(DOC_ID_KEY) or self.doc_id_fn(doc)
            marker = (doc_id, doc.page_content)
            if marker in seen:
                continue
            seen.add(marker)
            if doc_id and (doc.metadata or {}).get(DOC_ID_KEY) != doc_id:
                doc = Document(id=doc.id, page_content=doc.page_content,
                               metadata={**(doc.metadata or {}), DOC_ID_KEY: doc_id})
            out.append(doc)
        return out

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        docs = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        return self._carry_ids(docs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        docs = await self.retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        return self._carry_ids(docs)
