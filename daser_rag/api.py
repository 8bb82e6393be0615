"""The generator interface that adapters (LlamaIndex, LangChain, HTTP client) program against.

`CacheAwareGenerator` (in-process) and `daser_rag.server.client.DaserClient` (remote service)
both satisfy it, so an adapter switches between them with one setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, Union, runtime_checkable

from daser_rag.context import SHARED_TENANT
from daser_rag.types import ChunkRef, Document, GenerationResult

ContextItem = Union[str, ChunkRef, Document]


@runtime_checkable
class KVGenerator(Protocol):
    def generate(
        self, question: str, contexts: Sequence[ContextItem] | None = None, **kwargs: Any
    ) -> GenerationResult: ...

    def stream(self, question: str, contexts: Sequence[ContextItem] | None = None, **kwargs: Any) -> Iterable[str]:
        """Iterable of text deltas; the returned object exposes `.result` once exhausted."""
        ...

    def add_documents(self, documents: Iterable[Document], **kwargs: Any) -> Any: ...

    def invalidate(self, doc_id: str, tenant: str = SHARED_TENANT) -> list[str]: ...

    def split(self, text: str) -> list[str]: ...
