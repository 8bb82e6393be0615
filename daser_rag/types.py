"""Public value types passed between the retriever side and the generator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict


@dataclass(frozen=True)
class Document:
    """A knowledge-base document. `doc_id` is the stable id used for invalidation."""

    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class ChunkRef:
    """One retrieved chunk, placed in the prompt as-is (its boundaries are kept).

    `text` is the exact chunk text; `doc_id` (optional) ties its KV to a document so that
    invalidating the document drops it. A ref with only `doc_id` stands for all chunks of an
    ingested document.
    """

    text: str | None = None
    doc_id: str | None = None
    chunk_id: str | None = None


@dataclass(frozen=True)
class ResolvedChunk:
    """One context chunk as the generator will place it: exact text, token ids and store key."""

    text: str
    doc_id: str | None
    token_ids: tuple[int, ...]
    key: str

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class PrefillInfo(TypedDict):
    """What a prefill found in the store (`CacheAwareGenerator.prefill`'s second value)."""

    hits: int
    misses: int
    keys: list[str]  # the request's chunk keys, in prompt order
    exact_chunks: NotRequired[int]  # leading chunks whose KV is exactly full prefill's
    materialized: NotRequired[bool]  # present (True) when prefix-tree nodes were built
    mapped_chunks: NotRequired[int]  # chunks read with the calibration's token map applied (premap.py)
    mapped_hits: NotRequired[int]  # of those, read from the store (the rest were mapped by this request)


@dataclass(kw_only=True)
class IngestReport:
    """What an ingest did: how much KV was computed, found already stored, or dropped."""

    documents: int = 0
    changed_documents: int = 0
    chunks: int = 0
    computed_chunks: int = 0
    reused_chunks: int = 0
    tokens: int = 0
    dropped_chunks: int = 0
    mapped_chunks: int = 0  # chunks stored with the engine's token map applied (calibration/premap.py)
    seconds: float = 0.0


@dataclass(kw_only=True)
class Timings:
    ttft_s: float = 0.0
    total_s: float = 0.0
    fetch_s: float = 0.0
    precompute_s: float = 0.0
    fuse_s: float = 0.0
    decode_s: float = 0.0


@dataclass(kw_only=True)
class GenerationResult:
    """One request's answer and what it cost. Built by keyword only (16 fields of which 10 are
    counters: a positional constructor silently swaps two of them). `to_dict()` is the service's
    `daser` JSON block, field for field."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    context_tokens: int
    query_tokens: int
    exact_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    cache_hits: int
    cache_misses: int
    mode: str  # "blend": stored KV reused; "full": no reuse (use_cache=False or no context chunks)
    recompute_ratio: float | str  # as requested ("auto" included); recompute_share is what was done
    finish_reason: str
    timings: Timings
    chunk_keys: list[str] = field(default_factory=list)
    selector: str = "none"  # which selector chose the recomputed tokens ("none": no recompute)
    calibrated: bool = False  # a calibration (daser_rag/calibration) acted on the reused KV

    @property
    def recompute_share(self) -> float:
        cand = self.reused_tokens + self.recomputed_tokens
        return self.recomputed_tokens / cand if cand else 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["recompute_share"] = self.recompute_share
        return d
