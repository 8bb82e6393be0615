"""DaserVectorStore: a VectorStore wrapper that keeps chunk KV in step with the knowledge base.

Every write and delete goes to the wrapped store AND to the KV generator:
- `add_documents` registers each document under its vector-store id (mapped to a daser doc
  id) and precomputes its chunk KV; re-adding an existing id with new text drops exactly the
  chunks that changed.
- `delete(ids)` invalidates those documents' KV on every tier.

That makes `langchain_core.indexing.index()` keep the KV cache consistent: it adds changed
documents under new content-hash ids and calls `delete(ids)` for the stale ones (incremental
and full cleanup alike).

A document longer than the model's window is split (the generator's `split`) into parts that
are stored as records `"<id>#<n>"` of one KV document, before anything is written, so that a
retrieved record always fits a prompt; `delete(["<id>"])` removes every part. With
`split_oversized=False` such a document raises InvalidInputError and nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore, VectorStore

from daser_rag.api import KVGenerator
from daser_rag.errors import InvalidInputError
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.textcheck import check_document_text, check_unique_ids
from daser_rag.types import Document as DaserDocument
from langchain_daser._convert import DOC_ID_KEY

#: Metadata key of a record that is one part of a split document: the document's id.
PARENT_ID_KEY = "daser_parent_id"
PART_SEPARATOR = "#"
RESERVED_TOKENS = DEFAULT_MAX_NEW_TOKENS + 256
"""Room a stored document must leave in the model's window for the system prompt, a question and an answer."""
PROGRESS_AUTO_CHUNKS = 16
"""With show_progress=None (auto), a progress bar (counting chunks) appears when at least this
many chunks are precomputed, however many documents they come from."""


class DaserVectorStore(VectorStore):
    """Wraps any LangChain VectorStore (default: `InMemoryVectorStore(embedding)`).

    Args:
        generator: any `daser_rag.api.KVGenerator`.
        vectorstore: the store that does the similarity search; built from `embedding` if omitted.
        embedding: used only when `vectorstore` is omitted.
        doc_id_prefix: daser doc id = prefix + vector-store id, so several stores can share
            one KV cache without their ids colliding.
        precompute: compute chunk KV at `add_documents` time (otherwise on first use).
        tenant: KV namespace passed to the generator.
        split_oversized: split documents longer than the model's window (else reject them).
        show_progress: progress bar (in chunks) while precomputing KV: True, False, or None
            (when 16+ chunks are computed, even for one long document;
            `add_documents(..., show_progress=...)` overrides).
    """

    def __init__(
        self,
        generator: KVGenerator,
        vectorstore: VectorStore | None = None,
        *,
        embedding: Embeddings | None = None,
        doc_id_prefix: str = "",
        precompute: bool = True,
        tenant: str = "",
        split_oversized: bool = True,
        show_progress: bool | None = None,
    ) -> None:
        if not isinstance(generator, KVGenerator):
            raise TypeError(f"generator must satisfy daser_rag.api.KVGenerator, got {type(generator).__name__}")
        if vectorstore is None:
            if embedding is None:
                raise InvalidInputError("DaserVectorStore needs a vectorstore to wrap or an embedding to build one")
            vectorstore = InMemoryVectorStore(embedding)
        if isinstance(vectorstore, DaserVectorStore):
            raise InvalidInputError("DaserVectorStore cannot wrap another DaserVectorStore")
        self.generator = generator
        self.vectorstore = vectorstore
        self.doc_id_prefix = doc_id_prefix
        self.precompute = precompute
        self.tenant = tenant
        self.split_oversized = split_oversized
        self.show_progress = show_progress
        #: vector-store id -> chunk keys dropped by the last `delete` (for logs and tests)
        self.last_dropped: dict[str, list[str]] = {}

    # -- ids -----------------------------------------------------------------------------------
    def kv_doc_id(self, vs_id: str) -> str:
        """The daser document id that owns the KV of vector-store record `vs_id`."""
        return f"{self.doc_id_prefix}{vs_id}"

    def _tag(self, doc: LCDocument) -> LCDocument:
        # copy: the wrapped store may hand out its own metadata dict
        if not doc.id:
            return doc
        owner = (doc.metadata or {}).get(PARENT_ID_KEY) or doc.id  # a part's KV belongs to its document
        return LCDocument(id=doc.id, page_content=doc.page_content,
                          metadata={**(doc.metadata or {}), DOC_ID_KEY: self.kv_doc_id(owner)})

    # -- oversized documents -------------------------------------------------------------------
    def max_document_tokens(self) -> int | None:
        """The longest record (in tokens) stored whole: the model's window less room for the
        system prompt, a question and an answer; None when the generator does not tell its
        window (a remote service checks lengths itself)."""
        window = getattr(getattr(self.generator, "runner", None), "max_positions", None)
        if not window:
            return None
        return window - min(window // 2, RESERVED_TOKENS)

    def _count_tokens(self, text: str) -> int | None:
        resolve = getattr(self.generator, "resolve", None)
        if resolve is None:
            return None
        return resolve([text], self.tenant)[0].num_tokens

    def _fit(self, documents: list[LCDocument], ids: list[str]) -> tuple[list[LCDocument], list[str]]:
        """Records to store: oversized documents replaced by their parts (checked before any write)."""
        limit = self.max_document_tokens()
        if limit is None:
            return documents, ids
        out_docs: list[LCDocument] = []
        out_ids: list[str] = []
        for doc, doc_id in zip(documents, ids):
            size = self._count_tokens(doc.page_content)
            if size is None or size <= limit:
                out_docs.append(doc)
                out_ids.append(doc_id)
                continue
            where = (f"document {doc_id!r} has {size} tokens; at most {limit} fit the model's "
                     f"window with a question and an answer")
            if not self.split_oversized:
                raise InvalidInputError(f"{where}: split it first (nothing was written)")
            for n, piece in enumerate(self.generator.split(doc.page_content)):
                out_docs.append(LCDocument(page_content=piece,
                                           metadata={**(doc.metadata or {}), PARENT_ID_KEY: doc_id}))
                out_ids.append(f"{doc_id}{PART_SEPARATOR}{n}")
        return out_docs, out_ids

    def _part_ids(self, vs_id: str) -> list[str]:
        """Ids of the stored parts of a split document (found through `get_by_ids`)."""
        found: list[str] = []
        batch = 16
        while True:
            want = [f"{vs_id}{PART_SEPARATOR}{n}" for n in range(len(found), len(found) + batch)]
            try:
                got = {d.id for d in self.vectorstore.get_by_ids(want)}
            except NotImplementedError:
                return found
            hits = [i for i in want if i in got]
            found.extend(hits)
            if len(hits) < len(want):
                return found
            batch *= 2

    def _local_generator(self) -> bool:
        """An in-process generator (its ingest counts chunks and takes progress=None as auto)."""
        return getattr(self.generator, "ingestor", None) is not None

    def _gen_kwargs(self) -> dict[str, Any]:
        return {"tenant": self.tenant} if self.tenant else {}

    # -- writes --------------------------------------------------------------------------------
    @property
    def embeddings(self) -> Embeddings | None:
        return self.vectorstore.embeddings

    def add_documents(self, documents: list[LCDocument], **kwargs: Any) -> list[str]:
        documents = list(documents)
        ids: list[str | None] | None = kwargs.pop("ids", None)
        if ids is not None and len(ids) != len(documents):
            raise InvalidInputError(f"got {len(ids)} ids for {len(documents)} documents")
        for i, doc in enumerate(documents):
            if not isinstance(doc, LCDocument):
                raise InvalidInputError(f"add_documents expects langchain Documents, item {i} is {type(doc).__name__}")
        final_ids = [(ids[i] if ids is not None and ids[i] else None) or doc.id or str(uuid.uuid4())
                     for i, doc in enumerate(documents)]
        # the core's checks and messages (daser_rag.textcheck), before anything is written
        for doc_id, doc in zip(final_ids, documents):
            check_document_text(doc_id, doc.page_content)
        check_unique_ids(final_ids)
        if not documents:
            return []
        show_progress = kwargs.pop("show_progress", None)
        records, record_ids = self._fit(documents, final_ids)
        # Re-adding an id: records of its previous version that this one does not overwrite (its
        # parts, or its whole record when it is split now) would be served with stale text.
        keep = set(record_ids)
        stale = [r for i in final_ids for r in (i, *self._part_ids(i)) if r not in keep]
        stale = [d.id for d in self.vectorstore.get_by_ids(stale) if d.id] if stale else []
        if stale:
            self.vectorstore.delete(stale)
        stored = self.vectorstore.add_documents(records, ids=record_ids, **kwargs)
        if list(stored) != record_ids:
            raise RuntimeError(f"{type(self.vectorstore).__name__} did not keep the given ids")
        # After the vector store, so a failed vector write leaves no KV behind; KV is keyed
        # by content, so even a failure here can never serve stale KV. A split document is one
        # KV document: the generator splits it into the same parts.
        show = self.show_progress if show_progress is None else show_progress
        progress: dict[str, Any] = {}
        if show:
            progress["progress"] = True
        elif show is None and self._local_generator():
            # auto, decided by the generator in chunks (the unit the time goes to): one long
            # document gets a bar too, a few short ones none
            progress["progress"] = None
        self.generator.add_documents(
            [DaserDocument(self.kv_doc_id(i), d.page_content, dict(d.metadata or {}))
             for i, d in zip(final_ids, documents)],
            precompute=self.precompute,
            **progress,
            **self._gen_kwargs(),
        )
        return final_ids

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise InvalidInputError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        docs = [LCDocument(page_content=t, metadata=(metadatas[i] if metadatas else {}) or {})
                for i, t in enumerate(texts)]
        return self.add_documents(docs, ids=ids, **kwargs)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete records and invalidate exactly their KV. `ids=None` deletes everything
        (supported when the wrapped store can list its ids, like InMemoryVectorStore)."""
        if ids is None:
            store = getattr(self.vectorstore, "store", None)
            if not isinstance(store, dict):
                raise InvalidInputError(
                    f"delete(ids=None) needs a store that can list its ids; pass ids for "
                    f"{type(self.vectorstore).__name__}")
            # a split document's parts stand for it
            ids = list(dict.fromkeys(((r.get("metadata") or {}).get(PARENT_ID_KEY) or i) for i, r in store.items()))
        ids = list(ids)
        if any(not isinstance(i, str) or not i for i in ids):
            raise InvalidInputError("delete ids must be non-empty strings")
        records = [r for i in ids for r in (i, *self._part_ids(i))]
        result = self.vectorstore.delete(records, **kwargs)
        if result is False:
            return False
        self.last_dropped = {i: self.generator.invalidate(self.kv_doc_id(i), **self._gen_kwargs()) for i in ids}
        return True

    # -- reads ---------------------------------------------------------------------------------
    def get_by_ids(self, ids: Sequence[str], /) -> list[LCDocument]:
        return [self._tag(d) for d in self.vectorstore.get_by_ids(ids)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[LCDocument]:
        return [self._tag(d) for d in self.vectorstore.similarity_search(query, k=k, **kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[LCDocument, float]]:
        return [(self._tag(d), s) for d, s in self.vectorstore.similarity_search_with_score(query, k=k, **kwargs)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[LCDocument]:
        return [self._tag(d) for d in self.vectorstore.similarity_search_by_vector(embedding, k=k, **kwargs)]

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[LCDocument, float]]:
        pairs = self.vectorstore._similarity_search_with_relevance_scores(query, k=k, **kwargs)
        return [(self._tag(d), s) for d, s in pairs]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return self.vectorstore._select_relevance_score_fn()

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[LCDocument]:
        docs = self.vectorstore.max_marginal_relevance_search(
            query, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, **kwargs)
        return [self._tag(d) for d in docs]

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[LCDocument]:
        docs = self.vectorstore.max_marginal_relevance_search_by_vector(
            embedding, k=k, fetch_k=fetch_k, lambda_mult=lambda_mult, **kwargs)
        return [self._tag(d) for d in docs]

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        generator: KVGenerator | None = None,
        **kwargs: Any,
    ) -> DaserVectorStore:
        if generator is None:
            raise InvalidInputError("DaserVectorStore.from_texts needs generator=<KVGenerator>")
        store = cls(generator, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store
