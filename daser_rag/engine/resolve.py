"""Context resolution: request items -> the exact chunks the prompt will hold. Never writes.

A `Document` is split the same way ingestion splits it, so its chunks (and their keys) are the
ingested ones; a `ChunkRef` with only a doc id reads the registered chunk texts; a string is
one literal chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from daser_rag.api import ContextItem
from daser_rag.errors import InvalidInputError
from daser_rag.prompt import PromptFormat
from daser_rag.textcheck import check_text
from daser_rag.types import ChunkRef, Document, ResolvedChunk

if TYPE_CHECKING:
    from daser_rag.kv.store import KVStore


class ChunkKeyer(Protocol):
    """What resolution needs to name a chunk: the prompt layout and the key function (daser's
    ChunkComputer, or the weight-free control-plane Planner)."""

    prompt: PromptFormat

    def key(self, token_ids: Sequence[int], tenant: str) -> str: ...


def resolve(contexts: Sequence[ContextItem] | None, *, computer: ChunkKeyer, store: KVStore,
            split: Callable[[str], list[str]], tenant: str) -> list[ResolvedChunk]:
    out: list[ResolvedChunk] = []
    for item in contexts or []:
        if isinstance(item, str):
            texts: list[tuple[str, str | None]] = [(item, None)]
        elif isinstance(item, Document):
            texts = [(t, item.doc_id) for t in split(item.text)]
        elif isinstance(item, ChunkRef):
            if item.text is None:
                if not item.doc_id:
                    raise InvalidInputError("a ChunkRef needs text, doc_id, or both")
                texts = [(t, item.doc_id) for t in store.document_chunk_texts(item.doc_id, tenant)]
            else:
                texts = [(item.text, item.doc_id)]
        else:
            raise InvalidInputError(f"context items must be str, ChunkRef or Document, got {type(item).__name__}")
        for text, doc_id in texts:
            check_text(text, "a context chunk" if doc_id is None else f"a context chunk of document {doc_id!r}")
            ids = tuple(computer.prompt.chunk_ids(text))
            out.append(ResolvedChunk(text, doc_id, ids, computer.key(ids, tenant)))
    return out
