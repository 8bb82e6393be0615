"""DaserVectorStore: a VectorStore wrapper that keeps chunk KV in step with the knowledge base.

Every write and delete goes to the wrapped store AND to the KV generator:
- `add_documents` registers each document under its vector-store id (mapped to a daser doc
  id) and precomputes its chunk KV; re-adding an existing id with new text drops exactly the
  chunks that changed.
- `delete(ids)` invalidates those documents' KV on every tier.

That makes `langchain_core.indexing.index()` keep the KV cache consistent: it adds changed
documents under new content-hash ids and calls `delete(ids)` for the stale ones (incremental
and full cleanup alike).

A document longer than the model's window is split (the engine's `split`) into parts that are
stored as records `"<id>#<n>"` of one KV document whose chunks are exactly those parts, before
anything is written, so that a retrieved record always fits a prompt and its KV was computed at
index time; parts also fit the embedding's window (bundled MiniLM: 256 tokens), so retrieval reads
every part whole. `delete(["<id>"])` removes every part. With `split_oversized=False` such a
document raises InvalidInputError and nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from langchain_core.documents import Document as LCDocument
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore, VectorStore

from daser_rag.context import SHARED_TENANT
from daser_rag.embed_window import Counter, bundled_window, fit_parts
from daser_rag.engine.protocol import IndexingEngine
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
        generator: an engine of the engine protocol (`daser_rag.engine.protocol.IndexingEngine`):
            `CacheAwareGenerator`, the vLLM engine, or `DaserClient` (the service computes the
            chunk KV at index time on its engine).
        vectorstore: the store that does the similarity search; built from `embedding` if omitted.
        embedding: used only when `vectorstore` is omitted.
        doc_id_prefix: daser doc id = prefix + vector-store id, so several stores can share
            one KV cache without their ids colliding.
        precompute: compute chunk KV at `add_documents` time (otherwise on first use).
        tenant: KV namespace passed to the generator.
        split_oversized: split documents longer than the model's window (else reject them).
        embed_max_tokens: most embedding tokens per part of a split document (None: the
            bundled MiniLM's 256 when the store embeds with `MiniLMEmbeddings`, else no limit;
            0: no limit), so that retrieval reads every part whole.
        show_progress: progress bar (in chunks) while precomputing KV: True, False, or None
            (when 16+ chunks are computed, even for one long document;
            `add_documents(..., show_progress=...)` overrides).
    """

    def __init__(
        self,
        generator: IndexingEngine,
        vectorstore: VectorStore | None = None,
        *,
        embedding: Embeddings | None = None,
        doc_id_prefix: str = "",
        precompute: bool = True,
        tenant: str = SHARED_TENANT,
        split_oversized: bool = True,
        show_progress: bool | None = None,
        embed_max_tokens: int | None = None,
    ) -> None:
        if not isinstance(generator, IndexingEngine):
            raise TypeError("generator must satisfy daser_rag.engine.protocol.IndexingEngine (CacheAwareGenerator, the "
                            f"vLLM engine, or DaserClient), got {type(generator).__name__}")
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
        self.embed_max_tokens = embed_max_tokens
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
        system prompt, a question and an answer."""
        window = self.generator.context_window
        if not window:
            return None
        return window - min(window // 2, RESERVED_TOKENS)

    def _embed_window(self) -> tuple[Counter | None, int]:
        """(count, window) of the embedding that reads the parts: `embed_max_tokens` when given
        (0: no limit; counted with the bundled MiniLM tokenizer), else the bundled MiniLM's 256
        when the store embeds with `MiniLMEmbeddings`, else no embedding limit."""
        if self.embed_max_tokens is not None:
            return bundled_window(self.embed_max_tokens)
        from langchain_daser.embeddings import MiniLMEmbeddings

        if isinstance(self.vectorstore.embeddings, MiniLMEmbeddings):
            return bundled_window()
        return (None, 0)

    def _fit(self, documents: list[LCDocument], ids: list[str]) -> tuple[list[LCDocument], list[str], dict[str, list[str]]]:
        """Records to store, oversized documents replaced by their parts (checked before any
        write), and the parts of each split document (by vector-store id).

        Parts are the engine's chunks (so a retrieved part is one chunk at query time, whose KV
        was computed here), cut smaller where the embedding would not read a chunk whole
        (daser_rag.embed_window: a fact past MiniLM's 256 tokens is otherwise never retrieved)."""
        limit = self.max_document_tokens()
        if limit is None or not documents:
            return documents, ids, {}
        sizes = [c.tokens for c in self.generator.chunk_info([d.page_content for d in documents], tenant=self.tenant)]
        count_embed, embed_max = (None, 0)
        if any(size > limit for size in sizes):
            count_embed, embed_max = self._embed_window()

        def fits(piece: str) -> bool:
            return count_embed is None or count_embed(piece) <= embed_max

        out_docs: list[LCDocument] = []
        out_ids: list[str] = []
        parts: dict[str, list[str]] = {}
        for doc, doc_id, size in zip(documents, ids, sizes):
            if size <= limit:
                out_docs.append(doc)
                out_ids.append(doc_id)
                continue
            where = (f"document {doc_id!r} has {size} tokens; at most {limit} fit the model's "
                     f"window with a question and an answer")
            if not self.split_oversized:
                raise InvalidInputError(f"{where}: split it first (nothing was written)")
            pieces: list[str] = []
            for piece in self.generator.split(doc.page_content):
                pieces += [piece] if fits(piece) else fit_parts(piece, self.generator.split, fits, embed_max, where)
            parts[doc_id] = pieces
            for n, piece in enumerate(pieces):
                out_docs.append(LCDocument(page_content=piece,
                                           metadata={**(doc.metadata or {}), PARENT_ID_KEY: doc_id}))
                out_ids.append(f"{doc_id}{PART_SEPARATOR}{n}")
        return out_docs, out_ids, parts

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
        records, record_ids, parts = self._fit(documents, final_ids)
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
        # KV document whose chunks are exactly its parts.
        show = self.show_progress if show_progress is None else show_progress
        whole = [(i, d) for i, d in zip(final_ids, documents) if i not in parts]
        if whole:
            # progress None: auto, decided by the engine in chunks (the unit the time goes to):
            # one long document gets a bar too, a few short ones none
            self.generator.add_documents(
                [DaserDocument(self.kv_doc_id(i), d.page_content, dict(d.metadata or {})) for i, d in whole],
                precompute=self.precompute, progress=show, **self._gen_kwargs())
        if parts:
            self.generator.add_chunks({self.kv_doc_id(i): p for i, p in parts.items()}, tenant=self.tenant,
                                      progress=show, precompute=self.precompute, replace=True)
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
        generator: IndexingEngine | None = None,
        **kwargs: Any,
    ) -> DaserVectorStore:
        if generator is None:
            raise InvalidInputError("DaserVectorStore.from_texts needs generator=<an engine or DaserClient>")
        store = cls(generator, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store
