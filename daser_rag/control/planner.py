"""Weight-free request planning: (question, context items) -> the exact token ids of the prompt
and the plan of stored segments that supplies its context KV inside vLLM.

Everything here depends on the tokenizer, the prompt layout, the model fingerprint and the
document index, never on the weights, so the control plane and any planning client
(`vllm_daser.VllmRagPrompter`) run it without loading the model. The token sequence is the one
daser's own full prefill sees (`CacheAwareGenerator.prompt_ids`): "with and without reuse" is a
like-for-like comparison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daser_rag.api import ContextItem
from daser_rag.blend.prefix_tree import node_key
from daser_rag.chunking import split_text
from daser_rag.control.wire import Recompute, plan_params
from daser_rag.engine.resolve import resolve
from daser_rag.errors import InvalidInputError
from daser_rag.kv.keys import chunk_key, prefix_key
from daser_rag.prompt import DEFAULT_SYSTEM_PROMPT, PromptFormat
from daser_rag.types import ResolvedChunk
from daser_rag.settings import CHUNK_TOKENS

if TYPE_CHECKING:
    from daser_rag.calibration.adapter import Calibration
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.files import ModelFiles

MIN_QUESTION_ROOM = 64
"""Tokens of the window a chunk must leave free for the question and the answer's start."""


@dataclass(frozen=True)
class PrefillPlan:
    """A request that makes vLLM compute one chunk right after the system prefix and save it
    under `key` (max_tokens=1): how a chunk not stored yet gets its KV, at index or query time.

    With `parts` (a primer ensemble's entry) it is no request of its own: vLLM runs each part (the
    chunk after one primer, saved under the part's key) and the control plane stores the mean of
    their K/V under `key` (`kv.chunk_kv.mean_kv`, as daser's own engine makes it); `prompt_ids`
    is then empty."""

    key: str
    prompt_ids: list[int]
    kv_transfer_params: dict[str, Any]
    parts: tuple[PrefillPlan, ...] = ()

    @property
    def compute_tokens(self) -> int:
        """Prompt tokens vLLM computes for it (the router's unit of work)."""
        return len(self.prompt_ids) + sum(p.compute_tokens for p in self.parts)


@dataclass
class ReusePlan:
    """One request's prompt and the plan of stored segments that makes up its context KV."""

    prompt_ids: list[int]
    kv_transfer_params: dict[str, Any]
    context_tokens: int
    query_tokens: int
    chunks: list[ResolvedChunk]
    cache_salt: str | None = None
    exact_chunks: int = 0
    prefill: list[PrefillPlan] = field(default_factory=list)
    """Chunks missing from the store: run these first and the main request loads every chunk."""
    calibrated: bool = False
    """The plan carries a calibration (scales, biases) for its re-positioned segments."""

    @property
    def chunk_keys(self) -> list[str]:
        return [c.key for c in self.chunks]


class Planner:
    """Prompt layout, chunk keys, context resolution and vLLM plans from tokenizer + fingerprint.

    `store` is the shared store (its document index resolves document ids to chunk texts and
    records which documents a chunk's KV belongs to, so invalidation reaches it)."""

    def __init__(self, tokenizer: Any, fingerprint: str, store: KVStore, *, context_window: int,
                 chunk_tokens: int = CHUNK_TOKENS.default, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 prompt: PromptFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.store = store
        self.prompt = prompt if prompt is not None else PromptFormat(tokenizer, system_prompt)
        self.context_window = int(context_window)
        room = self.context_window - len(self.prompt.prefix_ids) - MIN_QUESTION_ROOM
        if not isinstance(chunk_tokens, int) or not 8 <= chunk_tokens <= room:
            raise InvalidInputError(f"chunk_tokens must be in [8, {room}] for this model's window "
                                    f"({self.context_window} positions), got {chunk_tokens!r}")
        self.chunk_tokens = chunk_tokens
        self._published: set[str] = set()  # calibration digests published for the connectors

    @classmethod
    def from_files(cls, files: ModelFiles, store: KVStore, **kw: Any) -> Planner:
        """A planner for the model in `files` (tokenizer and fingerprint; no weights)."""
        return cls(files.tokenizer, files.fingerprint, store, context_window=files.spec.max_positions, **kw)

    @classmethod
    def for_generator(cls, gen: CacheAwareGenerator) -> Planner:
        """The planner that names chunks exactly as daser's own engine `gen` does (same prompt
        layout, fingerprint, store and chunk size)."""
        return cls(gen.tokenizer, gen.fingerprint, gen.store, context_window=gen.context_window,
                   chunk_tokens=gen.ingestor.chunk_tokens, prompt=gen.prompt)

    # -- keys and layout ------------------------------------------------------------------------
    def key(self, token_ids: Sequence[int], tenant: str) -> str:
        return chunk_key(self.fingerprint, self.prompt.prefix_ids, list(token_ids), tenant)

    def prefix_key(self, tenant: str) -> str:
        return prefix_key(self.fingerprint, self.prompt.prefix_ids, tenant)

    def split(self, text: str) -> list[str]:
        """Window-safe chunks of `text`, cut exactly as daser's own ingestion cuts them."""
        return split_text(self.tokenizer, text, self.chunk_tokens)

    def chunk_keys(self, text: str, tenant: str) -> list[str]:
        return [self.key(self.prompt.chunk_ids(t), tenant) for t in self.split(text)]

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.prompt.encode(t)) for t in texts)

    def resolve(self, contexts: Sequence[ContextItem] | None, tenant: str) -> list[ResolvedChunk]:
        return resolve(contexts, computer=self, store=self.store, split=self.split, tenant=tenant)

    def prompt_ids(self, question: str, chunks: Sequence[ResolvedChunk]) -> list[int]:
        ids = list(self.prompt.prefix_ids)
        for c in chunks:
            ids.extend(c.token_ids)
        return ids + self.prompt.query_ids(question)

    def prefill_plan(self, chunk: ResolvedChunk, tenant: str) -> PrefillPlan:
        n_pre = len(self.prompt.prefix_ids)
        return PrefillPlan(chunk.key, list(self.prompt.prefix_ids) + list(chunk.token_ids),
                           plan_params([(self.prefix_key(tenant), n_pre), (chunk.key, chunk.num_tokens)]))

    def primed_key(self, key: str, calibration: Calibration) -> str:
        """Store key of chunk `key` computed after `calibration`'s primer, not token-mapped: the
        connector maps it as it loads it, as it does raw entries. The embedded engine stores
        chunks under the same key for a primer-only calibration (`Calibration.primer_digest`)."""
        from daser_rag.calibration.premap import mapped_key

        return mapped_key(key, calibration.primer_digest())

    def primed_entries(self, key: str, calibration: Calibration) -> list[str]:
        """Every store entry chunk `key` gets under `calibration`'s primer: `primed_key`, and for an
        ensemble each member's entry it is averaged from. All are registered under the chunk's
        document, so invalidating or editing it drops them."""
        members = calibration.primer_members()
        return [self.primed_key(key, calibration)] + ([self.primed_key(key, m) for m in members]
                                                      if len(members) > 1 else [])

    def check_primer(self, calibration: Calibration) -> None:
        """A primed chunk is computed in one vLLM request [system prefix, primer, chunk] (one per
        primer of an ensemble), which must fit the model's window."""
        rows = calibration.primers()
        need = len(self.prompt.prefix_ids) + (len(rows[0]) if rows else 0) + self.chunk_tokens
        if rows and need > self.context_window:
            raise InvalidInputError(
                f"this calibration's {len(rows[0])}-token primer, the system prefix and a "
                f"{self.chunk_tokens}-token chunk take {need} positions, more than this model's window "
                f"({self.context_window}): calibrate with fewer --primer-tokens or use smaller chunks")

    def primed_prefill_plan(self, chunk: ResolvedChunk, calibration: Calibration, tenant: str) -> PrefillPlan:
        """vLLM computes [system prefix, primer, chunk] and its connector saves the chunk's part under
        `primed_key` (at the positions after the primer; the connector re-rotates it to where it is
        placed) and the primer's part as a chunk entry of its own (exact, loaded next time). For a
        primer ensemble: one such request per primer (`Calibration.primer_members`, each saved
        under its member's key), averaged into `primed_key` by the control plane (`parts`)."""
        key = self.primed_key(chunk.key, calibration)
        members = calibration.primer_members()
        if len(members) > 1:
            return PrefillPlan(key, [], {}, tuple(self.primed_prefill_plan(chunk, m, tenant) for m in members))
        primer = calibration.primer_ids()
        n_pre = len(self.prompt.prefix_ids)
        return PrefillPlan(key, list(self.prompt.prefix_ids) + primer + list(chunk.token_ids),
                           plan_params([(self.prefix_key(tenant), n_pre), (self.key(primer, ""), len(primer)),
                                        (key, chunk.num_tokens)]))

    # -- plans ------------------------------------------------------------------------------------
    def full(self, question: str, contexts: Sequence[ContextItem] | None, tenant: str) -> ReusePlan:
        """No reuse: the same prompt, computed in full (`use_cache=False`)."""
        from daser_rag.control.wire import OFF_PARAMS

        _check_question(question)
        chunks = self.resolve(contexts, tenant)
        ids = self.prompt_ids(question, chunks)
        ctx = len(self.prompt.prefix_ids) + sum(c.num_tokens for c in chunks)
        return ReusePlan(ids, dict(OFF_PARAMS), ctx, len(ids) - ctx, chunks)

    def reuse(self, question: str, contexts: Sequence[ContextItem] | None = None, *, tenant: str,
              exact_nodes: bool = True, recompute: Recompute | None = None,
              calibration: Calibration | None = None) -> ReusePlan:
        """Full reuse inside vLLM, repaired in-engine when `recompute` = (ratio, check layer, selector).

        Segment j loads the chunk's own entry (computed right after the system prefix) and the
        connector re-rotates it to its place; vLLM computes only the question. With
        `exact_nodes`, the longest run of leading chunks whose exact prefix-tree node is stored
        is loaded exactly instead. vLLM's computation of a segment is saved (as the node of its
        path) only while everything before it was exact. Missing chunk entries come back as
        `prefill` plans. Writes the request's document refs (so invalidation reaches its KV).
        `calibration` (scales, biases, a token map and a primer, no link tokens;
        docs/calibration.md): the connector places every re-positioned segment it loads with it (a
        token map by the digest the plan names, published in the shared store directory); with a
        primer, re-positioned segments load the chunk's primed entry (`primed_key`; missing ones
        come back as `primed_prefill_plan`s) while the exact run stays raw; the plan's cache salt
        names it. `ReusePlan.calibrated` says whether it went into the plan (not when the whole
        context is exact).
        """
        _check_question(question)
        if calibration is not None and calibration.link_tokens:
            raise InvalidInputError(f"this calibration has {calibration.link_tokens} link tokens, which cannot be "
                                    "placed inside vLLM (docs/calibration.md); calibrate with --link-tokens 0")
        primed = calibration if calibration is not None and calibration.primer is not None else None
        if primed is not None:
            self.check_primer(primed)
        if (calibration is not None and calibration.kv_map is not None and recompute is not None
                and recompute[0] > 0 and (recompute[2] if len(recompute) > 2 else "deviation") == "deviation"):
            raise InvalidInputError("the in-engine deviation selector cannot rank staleness under a token map (the "
                                    "connector undoes scales and biases on V rows only; docs/calibration.md): use "
                                    "selector chunk_heads, or a calibration made with --no-token-map")
        store = self.store
        chunks = self.resolve(contexts, tenant)
        n_pre = len(self.prompt.prefix_ids)
        pk = self.prefix_key(tenant)
        segs: list[tuple[str, int, str | None]] = [(pk, n_pre, pk)]
        keys = [c.key for c in chunks]
        exact_run = True
        prefill: list[PrefillPlan] = []
        seen: set[str] = set()
        by_doc: dict[str, list[str]] = {}
        for c in chunks:
            if c.doc_id is not None:
                by_doc.setdefault(c.doc_id, []).append(c.key)
        for doc_id, doc_keys in by_doc.items():
            store.add_refs(doc_id, doc_keys, tenant)
        for j, c in enumerate(chunks):
            node = node_key(pk, keys[: j + 1])
            if j > 0:
                doc_ids = [q.doc_id for q in chunks[: j + 1] if q.doc_id is not None]
                if doc_ids:
                    store.add_derived(doc_ids, node, tenant)  # invalidating any document drops the node
            if exact_run and (j == 0 or (exact_nodes and store.contains(node))):
                segs.append((node, c.num_tokens, node))
            elif primed is not None:
                # re-positioned under a primer: the chunk's entry computed after the primer
                exact_run = False
                key = self.primed_key(c.key, primed)
                segs.append((key, c.num_tokens, node))
                if c.doc_id is not None:
                    for k in self.primed_entries(c.key, primed):  # invalidating the document drops them
                        store.add_derived([c.doc_id], k, tenant)
                if key not in seen and not store.contains(key):
                    seen.add(key)
                    prefill.append(self.primed_prefill_plan(c, primed, tenant))
                continue
            else:
                exact_run = False
                segs.append((c.key, c.num_tokens, node))
            if c.key not in seen and not store.contains(c.key):
                seen.add(c.key)
                prefill.append(self.prefill_plan(c, tenant))
        ids = self.prompt_ids(question, chunks)
        ctx = sum(s[1] for s in segs)
        rc = recompute if recompute is not None and recompute[0] > 0 and not exact_run else None
        cal = calibration if not exact_run else None
        salt = None
        if not exact_run:
            # re-positioned KV must not enter vLLM's prefix cache under plain token hashes
            h = hashlib.blake2b(digest_size=16)
            h.update(b"daser-vllm-reuse-v1\0" + "\0".join(s[0] for s in segs).encode())
            h.update(repr(rc).encode())
            if cal is not None:  # scaled KV is another KV: its blocks never meet unscaled ones
                h.update(b"\0calibration\0" + cal.digest().encode())
            salt = "r" + h.hexdigest()
        params = plan_params(segs, recompute=rc, scales=cal.factors() if cal is not None else None,
                             bias=cal.bias_bytes() if cal is not None else None,
                             token_map=self._publish(cal) if cal is not None and cal.kv_map is not None else None)
        return ReusePlan(ids, params, ctx, len(ids) - ctx, chunks, salt,
                         sum(1 for s in segs[1:] if s[0] == s[2]), prefill, calibrated=cal is not None)

    def _publish(self, cal: Calibration) -> str:
        """The digest a plan names for `cal`'s token map, after publishing the calibration in the
        store directory and the shared Redis, where the connectors read it (once per digest and
        planner)."""
        digest = cal.digest()
        if digest not in self._published:
            from daser_rag.calibration.storage import publish

            if self.store.root is None:
                raise InvalidInputError("a calibration with a token map needs a store directory shared with the "
                                        "vLLM connectors (the map is published there, not sent in the plan)")
            publish(cal, self.store.root, getattr(self.store.remote, "link", None))  # Redis: for other hosts
            self._published.add(digest)
        return digest

    def exact(self, question: str, contexts: Sequence[ContextItem] | None = None, *,
              tenant: str) -> ReusePlan:
        """Prefix-tree plan: exact reuse of whatever leading part of this chunk path is stored;
        vLLM computes (and the connector saves) the rest. No approximation is involved."""
        _check_question(question)
        store = self.store
        chunks = self.resolve(contexts, tenant)
        pk = self.prefix_key(tenant)
        segs: list[tuple[str, int]] = [(pk, len(self.prompt.prefix_ids))]
        keys = [c.key for c in chunks]
        for j, c in enumerate(chunks):
            key = node_key(pk, keys[: j + 1])
            segs.append((key, c.num_tokens))
            doc_ids = [q.doc_id for q in chunks[: j + 1] if q.doc_id is not None]
            if j == 0 and c.doc_id is not None:
                store.add_refs(c.doc_id, [key], tenant)
            elif j > 0 and doc_ids:
                store.add_derived(doc_ids, key, tenant)
        ids = self.prompt_ids(question, chunks)
        ctx = sum(n for _, n in segs)
        return ReusePlan(ids, plan_params(segs), ctx, len(ids) - ctx, chunks, exact_chunks=len(chunks))


def _check_question(question: object) -> None:
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError("question must be a non-empty string")


__all__ = ["MIN_QUESTION_ROOM", "Planner", "PrefillPlan", "ReusePlan"]
