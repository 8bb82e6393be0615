"""Index-time chunk operations for the adapters: chunks given one by one, never split again.

An adapter (LlamaIndex nodes, LangChain record parts) decides the chunk boundaries itself: each
text it hands in is ONE chunk, keyed exactly as the same text is keyed when a query passes it as
a context (`resolve`: a string or a `ChunkRef` with text is one literal chunk). This module is
what both engines (daser's embedded one and the vLLM control plane) run for the engine
protocol's `chunk_info`, `add_chunks`, `replace_refs`, `document_keys` and `stored`, so the
adapters precompute chunk KV at index time through any engine, in process or behind the
service, and tie it to the document that owns it (so invalidating that document drops it).

How a missing chunk's KV is computed is the engine's: daser's model here, one chunk at a time
under the model lock, or vLLM instances, many at once (`compute_missing`). Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from daser_rag.errors import InvalidInputError
from daser_rag.kv.keys import text_digest
from daser_rag.prompt import PromptFormat
from daser_rag.textcheck import check_document_text, check_text
from daser_rag.types import ResolvedChunk

if TYPE_CHECKING:
    from daser_rag.kv.store import KVStore

ChunkProgress = bool | Callable[[int], None] | None
"""True: a bar; None: a bar when 16+ chunks are computed; False: none; a callable gets increments
(in chunks computed)."""

PROGRESS_AUTO_CHUNKS = 16
MAX_KEYS_PER_CALL = 4096
"""Most keys one `stored` call answers (the service's limit per request too)."""


@dataclass(frozen=True)
class ChunkInfo:
    """One text as one chunk: its store key and the tokens it takes in a prompt."""

    key: str
    tokens: int


@dataclass
class ChunkReport:
    """What `add_chunks` did. `keys[doc_id]` are the keys of that document's texts, in order."""

    keys: dict[str, list[str]] = field(default_factory=dict)
    chunks: int = 0
    computed: int = 0
    reused: int = 0
    dropped: int = 0
    mapped: int = 0
    """Chunk entries made for the engine's calibration (primed and/or token-mapped) at index
    time, as `IngestReport.mapped_chunks` counts them; 0 without a calibration that needs them."""
    seconds: float = 0.0


class _Keyer(Protocol):
    prompt: PromptFormat

    def key(self, token_ids: Sequence[int], tenant: str) -> str: ...


ComputeMissing = Callable[[dict[str, list[int]], ChunkProgress], int]
"""(key -> chunk token ids of every chunk to compute, progress) -> how many got stored."""
PrepareChunks = Callable[[list[ResolvedChunk], str, ChunkProgress], int]
"""(the chunks just added, tenant, progress) -> how many calibration entries (primed and/or
token-mapped) were made for them: what `add_documents` does at index time, for `add_chunks`."""


def compute_each(compute: Callable[[Sequence[int], str], bool]) -> ComputeMissing:
    """A `ComputeMissing` that computes the chunks one after another (daser's own model)."""

    def run(todo: dict[str, list[int]], progress: ChunkProgress) -> int:
        done = 0
        with progress_bar(len(todo), progress, "precomputing chunk KV") as step:
            for key, ids in todo.items():
                done += int(compute(ids, key))
                step()
        return done

    return run


class progress_bar:
    """`with progress_bar(total, progress, desc) as step: ... step()` per chunk done."""

    def __init__(self, total: int, progress: ChunkProgress, desc: str) -> None:
        self.total, self.progress, self.desc = total, progress, desc
        self.bar = None

    def __enter__(self) -> Callable[[], None]:
        show = self.progress if self.progress is not None else self.total >= PROGRESS_AUTO_CHUNKS
        if show is True and self.total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="chunk")

        def step() -> None:
            if self.bar is not None:
                self.bar.update(1)
            elif callable(show):
                show(1)

        return step

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class ChunkIndex:
    """The index-time chunk operations over one store, keyed like `keyer` (ChunkComputer or the
    weight-free Planner). `max_tokens()`: the longest chunk whose KV may be computed (the window
    less the system prefix and room for a question)."""

    def __init__(self, keyer: _Keyer, store: KVStore, *, max_tokens: Callable[[], int],
                 compute_missing: ComputeMissing, prepare: PrepareChunks | None = None) -> None:
        self.keyer = keyer
        self.store = store
        self.max_tokens = max_tokens
        self.compute_missing = compute_missing
        self.prepare = prepare

    def info(self, texts: Sequence[str], tenant: str) -> list[ChunkInfo]:
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of chunk texts, not a single string")
        out = []
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError("a chunk text must be a non-empty string")
            check_text(text, "a chunk text")
            ids = self.keyer.prompt.chunk_ids(text)
            out.append(ChunkInfo(self.keyer.key(ids, tenant), len(ids)))
        return out

    def _plan(self, chunks: Mapping[str, Sequence[str]], tenant: str) -> dict[str, list[tuple[str, list[int]]]]:
        """Validated before anything is written: ids, texts, and every chunk within the window."""
        if not isinstance(chunks, Mapping):
            raise InvalidInputError(f"chunks must map document ids to lists of texts, got {type(chunks).__name__}")
        plan: dict[str, list[tuple[str, list[int]]]] = {}
        for doc_id, texts in chunks.items():
            if not isinstance(doc_id, str) or not doc_id:
                raise InvalidInputError("document id must be a non-empty string")
            if isinstance(texts, str) or not texts:
                raise InvalidInputError(f"document {doc_id!r}: give a non-empty list of chunk texts")
            rows = []
            for text in texts:
                check_document_text(doc_id, text)
                ids = self.keyer.prompt.chunk_ids(text)
                if len(ids) > self.max_tokens():
                    raise InvalidInputError(
                        f"a chunk of document {doc_id!r} has {len(ids)} tokens; at most {self.max_tokens()} fit the "
                        "model's window with a question (split it first; nothing was written)")
                rows.append((self.keyer.key(ids, tenant), ids))
            plan[doc_id] = rows
        return plan

    def add(self, chunks: Mapping[str, Sequence[str]], *, tenant: str, progress: ChunkProgress = False,
            precompute: bool = True, replace: bool = False) -> ChunkReport:
        """Compute the chunks' missing KV, then tie each document's keys to it: added to its refs,
        or with `replace` made exactly its refs (KV nobody else references is dropped). A
        document the index does not know (new, or removed a moment ago by an upsert) is
        registered with these texts first: the index refuses refs to unknown documents, which
        would leave the KV without an owner and so never invalidated."""
        t0 = time.perf_counter()
        plan = self._plan(chunks, tenant)
        report = ChunkReport(keys={d: [k for k, _ in rows] for d, rows in plan.items()})
        report.chunks = sum(len(rows) for rows in plan.values())
        todo: dict[str, list[int]] = {}
        if precompute:
            for rows in plan.values():
                for key, ids in rows:
                    if key not in todo and not self.store.contains(key):
                        todo[key] = ids
            report.computed = self.compute_missing(todo, progress)
            report.reused = report.chunks - len(todo)
        for doc_id, rows in plan.items():
            texts, keys = list(chunks[doc_id]), [k for k, _ in rows]
            if replace or self.store.document_info(doc_id, tenant) is None:
                self.store.register_document(doc_id, texts, text_digest("\n\n".join(texts)), tenant)
                report.dropped += len(self.store.replace_document_refs(doc_id, keys, tenant))
            else:
                self.store.add_refs(doc_id, keys, tenant)
        if precompute and self.prepare is not None:  # after the refs: entries made now are dropped with them
            report.mapped = self.prepare([ResolvedChunk(text, doc_id, tuple(ids), key) for doc_id, rows in plan.items()
                                          for text, (key, ids) in zip(chunks[doc_id], rows)], tenant, progress)
        report.seconds = time.perf_counter() - t0
        return report

    def replace_refs(self, doc_id: str, texts: Sequence[str], tenant: str) -> list[str]:
        """The keys of `texts` (one chunk each) become exactly the document's refs; nothing is
        computed. Returns the keys dropped (referenced by no document any more)."""
        if not isinstance(doc_id, str) or not doc_id:
            raise InvalidInputError("document id must be a non-empty string")
        keys = [c.key for c in self.info(texts, tenant)]
        return self.store.replace_document_refs(doc_id, keys, tenant)

    def document_keys(self, doc_id: str, tenant: str) -> list[str]:
        return self.store.document_chunk_keys(doc_id, tenant)

    def stored(self, keys: Sequence[str]) -> list[bool]:
        if isinstance(keys, str) or len(keys) > MAX_KEYS_PER_CALL:
            raise InvalidInputError(f"keys must be a list of at most {MAX_KEYS_PER_CALL} chunk keys")
        return [bool(self.store.contains(k)) for k in keys]


__all__ = ["ChunkIndex", "ChunkInfo", "ChunkProgress", "ChunkReport", "PrepareChunks", "compute_each", "progress_bar"]
