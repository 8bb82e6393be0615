"""The engine protocol: everything the service, the CLI and the adapters need from an engine.

Two implementations: daser's own embedded engine (`CacheAwareGenerator`, one process, one
model lock) and `daser_rag.control.vllm_engine.VllmEngine` (the control plane in front of N
`vllm serve` instances, which batch). The service programs against this protocol only: a second
engine is a new class, not a new branch in the service, and nobody probes an engine with
getattr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from daser_rag.api import ContextItem, ResultStream
from daser_rag.engine.chunk_index import ChunkInfo, ChunkReport
from daser_rag.context import SHARED_TENANT
from daser_rag.types import Document, GenerationResult, IngestReport

if TYPE_CHECKING:
    import threading

    from daser_rag.kv.store import KVStore
    from daser_rag.params import GenerationParams

Cancel = Callable[[], bool]
"""Polled before model work and between tokens; True stops the request ("cancelled")."""
Progress = bool | Callable[[int], None] | None
"""Ingestion progress: True draws a bar, None one when the work is long (16+ chunks), a callable
receives increments (in chunks)."""


@dataclass(frozen=True)
class EngineHealth:
    """What `/health` reports about the engine: `ok` False makes the service `degraded`."""

    ok: bool
    engine: str
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class IndexingEngine(Protocol):
    """What the adapters' index-time side (LlamaIndex's KV-precompute transform and vector
    stores, LangChain's vector stores) needs from an engine. Both engines implement it, and so
    does `daser_rag.server.client.DaserClient` over the service's routes: an adapter pointed at
    the service precomputes chunk KV at index time exactly as one holding the engine in process.

    A "chunk text" is ONE chunk, never split again: keyed as the same text is keyed when a query
    passes it as a context (a string, or a `ChunkRef` with text)."""

    @property
    def context_window(self) -> int:
        """Positions the model attends over (prompt + answer)."""
        ...

    def add_documents(self, documents: Iterable[Document], *, tenant: str = SHARED_TENANT, progress: Progress = False,
                      precompute: bool = True) -> IngestReport: ...

    def invalidate(self, doc_id: str, tenant: str = SHARED_TENANT) -> list[str]: ...

    def split(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Window-safe chunks of `text`, cut exactly as ingestion cuts them; with `max_tokens`,
        pieces of at most that many tokens cut on the same boundaries (an adapter's own parts)."""
        ...

    def chunk_info(self, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[ChunkInfo]:
        """Each text as one chunk: its store key and its tokens in a prompt. Reads nothing."""
        ...

    def add_chunks(self, chunks: Mapping[str, Sequence[str]], *, tenant: str = SHARED_TENANT,
                   progress: Progress = False, precompute: bool = True, replace: bool = False) -> ChunkReport:
        """`chunks` maps document ids to chunk texts. Computes every missing chunk's KV (progress
        in chunks), then ties the keys to their document: added to its refs, or with `replace`
        made exactly its refs (KV no document references any more is dropped). A document the
        index does not know is registered with these texts."""
        ...

    def replace_refs(self, doc_id: str, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[str]:
        """The keys of `texts` become exactly the document's refs (nothing computed); returns the
        keys dropped."""
        ...

    def document_keys(self, doc_id: str, *, tenant: str = SHARED_TENANT) -> list[str]:
        """The keys of the document's current chunks ([] for an unknown document)."""
        ...

    def stored(self, keys: Sequence[str]) -> list[bool]:
        """Whether the store holds each key's KV now (on any tier)."""
        ...


@runtime_checkable
class Engine(IndexingEngine, Protocol):
    """A KV-reusing engine behind the service. Every method is thread-safe; `model_lock` says
    whether model work must be serialized (the embedded engine) or may run concurrently
    (vLLM batches requests itself)."""

    @property
    def kind(self) -> str:
        """"daser" (embedded) or "vllm"."""
        ...

    @property
    def model_name(self) -> str:
        """The served model's name (OpenAI `model`)."""
        ...

    @property
    def fingerprint(self) -> str:
        """Identity of weights + tokenizer + dtype: part of every chunk key."""
        ...

    @property
    def store(self) -> KVStore:
        """The tiered KV store and document index this engine reads and writes."""
        ...

    @property
    def model_lock(self) -> threading.RLock | None:
        """Held for model work when the engine runs one request at a time; None when it batches."""
        ...

    def generate(self, question: str, contexts: Sequence[ContextItem] | None = None,
                 params: GenerationParams | None = None, *, cancel: Cancel | None = None) -> GenerationResult: ...

    def stream(self, question: str, contexts: Sequence[ContextItem] | None = None,
               params: GenerationParams | None = None, *, cancel: Cancel | None = None) -> ResultStream: ...

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the texts take in a prompt (tokenized as user text)."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """The ids `count_tokens` counts for `text` (so `len(token_ids(t)) == count_tokens([t])`)."""
        ...

    def chunk_keys(self, text: str, tenant: str = SHARED_TENANT) -> list[str]:
        """Store keys of the chunks `text` is split into (what ingestion would store)."""
        ...

    def queued(self, request_id: str, contexts: Sequence[ContextItem] | None, tenant: str = SHARED_TENANT) -> None:
        """A request waits in the service's queue and will read these contexts: bring their KV
        toward the fastest tier and keep it there until `finished` (PCR look-ahead). Never raises
        for bad contexts: the request itself reports those when it runs."""
        ...

    def started(self, request_id: str) -> None:
        """The queued request runs now."""
        ...

    def finished(self, request_id: str) -> None:
        """The request is over (done, refused or cancelled): release what `queued` held for it."""
        ...

    def health(self) -> EngineHealth: ...

    def close(self) -> None:
        """Release what the engine started (threads, spawned processes)."""
        ...


__all__ = ["Cancel", "ChunkInfo", "ChunkReport", "Engine", "EngineHealth", "IndexingEngine", "Progress", "ResultStream"]
