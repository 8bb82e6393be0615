"""Ingestion: split documents into window-sized chunks, precompute their KV, register them.

Chunks are cut to `chunk_tokens` (checked against the model's window when the generator is
built), so nothing longer than the window is ever computed or stored, whatever the input size.
Re-adding an edited document drops the KV of its old chunks (unless another document still
uses them); an unchanged one costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from daser_rag.chunking import split_text
from daser_rag.engine.chunks import ChunkComputer
from daser_rag.errors import InvalidInputError
from daser_rag.kv.keys import text_digest
from daser_rag.kv.store import KVStore
from daser_rag.textcheck import check_document_text, check_text, check_unique_ids
from daser_rag.types import Document, IngestReport, ResolvedChunk

Progress = bool | Callable[[int], None] | None
"""True: a progress bar; None: a bar when the work is long (PROGRESS_AUTO_CHUNKS or more chunks);
False: none; a callable is called with the number of chunks done since its last call."""

PROGRESS_AUTO_CHUNKS = 16
"""With progress=None (auto), a bar appears when at least this many chunks are processed."""


def check_documents(documents: Iterable[Document]) -> list[Document]:
    """All-or-nothing validation before anything is written: every document has an id and
    real text (`daser_rag.textcheck`), and no id appears twice in one call."""
    docs = list(documents)
    for d in docs:
        if not isinstance(d, Document):
            raise InvalidInputError(f"add_documents expects Document objects, got {type(d).__name__}")
        if not isinstance(d.doc_id, str) or not d.doc_id:
            raise InvalidInputError("document id must be a non-empty string")
        check_document_text(d.doc_id, d.text)
    check_unique_ids(d.doc_id for d in docs)
    return docs


class Ingestor:
    def __init__(self, computer: ChunkComputer, store: KVStore, tokenizer: object, chunk_tokens: int,
                 compute: Callable[[Sequence[int], str], bool] | None = None) -> None:
        """`compute(ids, key)` makes a missing chunk's KV and stores it under `key`, returning
        whether it is stored; by default daser's own model computes it here. The vLLM engine
        passes one that has a vLLM instance compute it (its connector stores it)."""
        self.computer = computer
        self.store = store
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.compute = compute if compute is not None else self._compute_here

    def _compute_here(self, ids: Sequence[int], key: str) -> bool:
        self.store.put(self.computer.compute(ids, key))
        return True

    def split(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Chunks of at most `chunk_tokens` tokens, or of `max_tokens` (an adapter cutting its
        own parts, e.g. for an embedding's window), cut on the same boundaries."""
        if isinstance(text, str) and text.strip():
            check_text(text, "the text to split")  # the tokenizer's raw TypeError otherwise
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 8):
            raise InvalidInputError(f"max_tokens must be an integer >= 8, got {max_tokens!r}")
        return split_text(self.tokenizer, text, self.chunk_tokens if max_tokens is None else max_tokens)

    def register(self, doc: Document, tenant: str, chunks: list[str] | None = None) -> tuple[list[str], bool]:
        """Record a document's chunk texts (no KV computed); return its chunks and whether it changed."""
        if chunks is None:
            chunks = self.split(doc.text)
        changed = self.store.register_document(doc.doc_id, chunks, text_digest(doc.text), tenant)
        return chunks, changed

    def register_request(self, contexts: Sequence[object] | None, chunks: Sequence[ResolvedChunk],
                         tenant: str) -> None:
        """A request's writes, in one place: its inline documents and the refs of its chunks
        (so invalidating a document drops KV that requests computed for it)."""
        for item in contexts or []:
            if isinstance(item, Document):
                known = self.store.document_info(item.doc_id, tenant)
                if known is None or known.content_digest != text_digest(item.text):
                    # new or edited: register its chunks and drop the KV of its old ones
                    self.add_documents([item], tenant=tenant, precompute=False)
        by_doc: dict[str, list[str]] = {}
        for c in chunks:
            if c.doc_id is not None:
                by_doc.setdefault(c.doc_id, []).append(c.key)
        for doc_id, keys in by_doc.items():
            self.store.add_refs(doc_id, keys, tenant)

    def add_documents(self, documents: Iterable[Document], *, tenant: str, progress: Progress = False,
                      precompute: bool = True) -> IngestReport:
        docs = check_documents(documents)
        report = IngestReport(documents=len(docs))
        t_start = time.perf_counter()
        # Split everything first: progress is counted in chunks, the unit the time goes to (one
        # long document is most of a run; counting documents showed 0/1 until it was done).
        split = [self.split(d.text) for d in docs]
        total = sum(len(c) for c in split) if precompute else 0
        show = progress if progress is not None else total >= PROGRESS_AUTO_CHUNKS
        bar = None
        if show is True and total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="precomputing chunk KV", unit="chunk")
        try:
            for d, chunks in zip(docs, split):
                chunks, changed = self.register(d, tenant, chunks)
                report.changed_documents += int(changed)
                keys = []
                for text in chunks:
                    ids = self.computer.prompt.chunk_ids(text)
                    key = self.computer.key(ids, tenant)
                    keys.append(key)
                    report.chunks += 1
                    report.tokens += len(ids)
                    if not precompute:
                        continue
                    if self.store.contains(key):
                        report.reused_chunks += 1
                    elif self.compute(ids, key):
                        report.computed_chunks += 1
                    if bar is not None:
                        bar.update(1)
                    elif callable(show):
                        show(1)
                report.dropped_chunks += len(self.store.replace_document_refs(d.doc_id, keys, tenant))
        finally:
            if bar is not None:
                bar.close()
        report.seconds = time.perf_counter() - t_start
        return report
