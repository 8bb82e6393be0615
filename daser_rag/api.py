"""The generator interface that adapters (LlamaIndex, LangChain, HTTP client) program against.

`CacheAwareGenerator` (in-process) and `daser_rag.server.client.DaserClient` (remote service)
both satisfy it, so an adapter switches between them with one setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, Union, runtime_checkable

from daser_rag.context import SHARED_TENANT
from daser_rag.types import ChunkRef, Document, GenerationResult

ContextItem = Union[str, ChunkRef, Document]


class ResultStream(Protocol):
    """Text deltas as they are decoded; `.result` (the GenerationResult) once exhausted."""

    @property
    def result(self) -> GenerationResult | None: ...

    def __iter__(self) -> Iterator[str]: ...


@runtime_checkable
class KVGenerator(Protocol):
    def generate(
        self, question: str, contexts: Sequence[ContextItem] | None = None, **kwargs: Any
    ) -> GenerationResult: ...

    def stream(self, question: str, contexts: Sequence[ContextItem] | None = None,
               **kwargs: Any) -> ResultStream: ...

    def add_documents(self, documents: Iterable[Document], **kwargs: Any) -> Any: ...

    def invalidate(self, doc_id: str, tenant: str = SHARED_TENANT) -> list[str]: ...

    def split(self, text: str) -> list[str]: ...

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the texts take in a prompt, as the engine counts them (token budgets, trimming)."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """The ids `count_tokens` counts for `text` (user text: control-token strings stay text).
        Adapters hand this to their host's token counters (LangChain's `get_token_ids`,
        LlamaIndex's `TokenCountingHandler`), so they count offline, like the engine, with no
        tokenizer of their own."""
        ...
