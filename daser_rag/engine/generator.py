"""CacheAwareGenerator: (chunks, question) -> answer, reusing stored chunk KV.

The facade wires the parts (engine/chunks, ingest, resolve, assemble, decode; blend/fuse) and
owns the model lock. Per request: resolve the context into chunks (read-only), register the
request's document refs, assemble stored segments (computing misses), fuse and repair them
behind the exact system prefix, and decode with the one decode loop.
"""

from __future__ import annotations

import dataclasses

import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from daser_rag import settings
from daser_rag.api import ContextItem
from daser_rag.blend.config import BlendConfig
from daser_rag.blend.fusion import FusionResult, full_prefill, fuse
from daser_rag.blend.prefix_tree import PrefixTree
from daser_rag.context import SHARED_TENANT, RequestContext
from daser_rag.engine.assemble import SegmentAssembler
from daser_rag.engine.materialize import BackgroundMaterializer
from daser_rag.engine.model_lock import ModelLock
from daser_rag.engine.chunk_index import ChunkIndex, ChunkInfo, ChunkReport, compute_each
from daser_rag.engine.chunks import ChunkComputer
from daser_rag.engine.decode import StreamingEngine, TextEmitter, decode_n_tokens, stop_token_ids
from daser_rag.engine.factory import default_store
from daser_rag.engine.result import pack_result
from daser_rag.engine.ingest import Ingestor, Progress
from daser_rag.engine.lookahead import LookAhead
from daser_rag.engine.protocol import EngineHealth
from daser_rag.engine.resolve import resolve
from daser_rag.errors import ContextTooLongError, DaserError, InvalidInputError
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.store import KVStore
from daser_rag.model.loader import LoadedModel, load_model
from daser_rag.model.runner import LayerRunner
from daser_rag.params import GenerationParams, check_selector
from daser_rag.prompt import DEFAULT_SYSTEM_PROMPT, PromptFormat
from daser_rag.sampling import sample_next
from daser_rag.textcheck import check_text
from daser_rag.types import ChunkRef, Document, GenerationResult, IngestReport, PrefillInfo, ResolvedChunk, Timings

MIN_QUESTION_ROOM = 64
"""Tokens of the window a chunk must leave free for the question and the answer's start."""


class CacheAwareGenerator(StreamingEngine):
    def __init__(
        self,
        model: LoadedModel | str | Path | None = None,
        store: KVStore | None = None,
        *,
        cache_dir: str | Path | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        recompute_ratio: float | str = settings.RECOMPUTE_RATIO.default,
        selector: str = settings.SELECTOR.default,
        check_layer: int = settings.CHECK_LAYER.default,
        blend: BlendConfig | None = None,
        chunk_tokens: int = settings.CHUNK_TOKENS.default,
        codec: str = settings.CODEC.default,
        host_bytes: int | None = None,
        device: str | None = None,
        device_bytes: int = settings.DEVICE_BYTES.default,
        prefix_tree: PrefixTree | bool | str = settings.PREFIX_TREE.default,
        prefix_tree_after: int = settings.PREFIX_TREE_AFTER.default,
        layerwise: bool = False,
        prefetch_window: int = settings.PREFETCH_WINDOW.default,
        calibration: Any = settings.CALIBRATION.default,
        premap: bool = settings.PREMAP.default,
        calibrated_selector: str = settings.CALIBRATED_SELECTOR.default,
    ) -> None:
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        self.runner = LayerRunner(self.lm)
        if store is None:
            store = default_store(cache_dir, codec=codec, host_bytes=host_bytes, device=self.lm.device,
                                  device_bytes=device_bytes)
        self.store = store
        self.prompt = PromptFormat(self.lm.tokenizer, system_prompt)
        self.blend = blend if blend is not None else BlendConfig(
            recompute_ratio=recompute_ratio, selector=selector, check_layer=check_layer)
        room = self.runner.max_positions - len(self.prompt.prefix_ids) - MIN_QUESTION_ROOM
        if not 8 <= chunk_tokens <= room:
            raise InvalidInputError(f"chunk_tokens must be in [8, {room}] for this model's window "
                                    f"({self.runner.max_positions} positions), got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.computer = ChunkComputer(self.runner, self.prompt, self.lm.fingerprint)
        self.ingestor = Ingestor(self.computer, store, self.lm.tokenizer, chunk_tokens)
        self.chunks = ChunkIndex(self.computer, store, compute_missing=compute_each(self.ingestor.compute),
                                 max_tokens=lambda: self.runner.max_positions - len(self.prompt.prefix_ids)
                                 - MIN_QUESTION_ROOM, prepare=self._prepare_chunks)
        tree, tree_mode = _prefix_tree(prefix_tree, prefix_tree_after)
        self.assembler = SegmentAssembler(self.runner, store, self.computer, prefix_tree=tree, layerwise=layerwise)
        self.lock = ModelLock()
        """Held for any model work; schedulers and adapters serialize on it. It knows when a request
        wants the model, so background work (prefix-tree materialization) yields to requests."""
        if tree_mode == "background":
            self.assembler.materializer = BackgroundMaterializer(self.assembler, self.lock)
        self.lookahead = LookAhead(store, prefetch_window)
        """PCR look-ahead driven by the service's queue (engine/lookahead.py)."""
        self.eos_ids = stop_token_ids(self.lm.tokenizer)
        from daser_rag.calibration.storage import resolve_calibration

        self.calibration = resolve_calibration(calibration, self.runner, self.fingerprint, store.root)
        """The calibration of reused KV (daser_rag/calibration) requests use by default, or None."""
        self.premap = premap
        """Reused chunks are read with the calibration's token map already applied (stored once per
        chunk and map: calibration/premap.py). A calibration with a primer is always read so: its
        chunks must be computed after the primer, which placement cannot do."""
        if calibrated_selector:
            check_selector(calibrated_selector)
        chosen = blend is not None or selector != settings.SELECTOR.default  # the engine's own choice stands
        self.calibrated_selector = "" if chosen else calibrated_selector
        """The selector of requests that name none and get a calibration with a token map (with a
        map, chunk_heads measured better than hybrid at 1.5x the speed: docs/calibration.md); ''
        for none, and none when the engine was built with its own selector or blend config."""

    # -- identity ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    # -- the engine protocol (daser_rag/engine/protocol.py) -------------------------------------
    @property
    def kind(self) -> str:
        return "daser"

    @property
    def model_name(self) -> str:
        return Path(str(self.lm.source)).stem or "daser"

    @property
    def context_window(self) -> int:
        return int(self.runner.max_positions)

    @property
    def model_lock(self) -> threading.RLock:
        return self.lock

    def count_tokens(self, texts: Sequence[str]) -> int:
        return sum(len(self.prompt.encode(t)) for t in texts)

    def token_ids(self, text: str) -> list[int]:
        return self.prompt.encode(text)

    def chunk_keys(self, text: str, tenant: str = SHARED_TENANT) -> list[str]:
        return [self.chunk_key_for(t, tenant) for t in self.split(text)]

    def queued(self, request_id: str, contexts: Sequence[ContextItem] | None, tenant: str = SHARED_TENANT) -> None:
        try:
            keys = [c.key for c in self.resolve(contexts, tenant)]
        except DaserError:
            return  # the request reports its own bad input when it runs
        self.lock.note_queued(request_id)
        self.lookahead.queued(request_id, keys)

    def started(self, request_id: str) -> None:
        self.lookahead.started(request_id)

    def finished(self, request_id: str) -> None:
        self.lock.note_done(request_id)
        self.lookahead.finished(request_id)

    def health(self) -> EngineHealth:
        detail: dict[str, Any] = {"device": str(self.runner.device), "selector": self.blend.selector,
                                  "prefetch": self.lookahead.stats()}
        mat = self.assembler.materializer
        if mat is not None:  # what background materialization did, and what it cost requests
            detail["prefix_tree"] = {**dataclasses.asdict(mat.stats),
                                     "request_waits": dataclasses.asdict(self.lock.background_waits)}
        return EngineHealth(True, "daser", detail)

    def close(self) -> None:
        """Stops the prefetch and materialization threads; the model lives as long as the process."""
        self.lookahead.close()
        if self.assembler.materializer is not None:
            self.assembler.materializer.close()

    def chunk_key_for(self, text: str, tenant: str = SHARED_TENANT) -> str:
        return self.computer.key(self.prompt.chunk_ids(text), tenant)

    def compute_chunk(self, ids: Sequence[int], key: str, tenant: str = SHARED_TENANT) -> ChunkKV:
        """Chunk KV computed right after the system prefix (tenant only salts keys, not KV)."""
        return self.computer.compute(ids, key)

    # -- ingestion ---------------------------------------------------------------------------
    def split(self, text: str, max_tokens: int | None = None) -> list[str]:
        """Window-safe chunks of `text` (at most `chunk_tokens` tokens each, or `max_tokens`: an
        adapter's own parts, cut on the same boundaries)."""
        return self.ingestor.split(text, max_tokens)

    # -- index-time chunks for the adapters (engine/chunk_index.py) ------------------------------
    def chunk_info(self, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[ChunkInfo]:
        return self.chunks.info(texts, tenant)

    def add_chunks(self, chunks: Mapping[str, Sequence[str]], *, tenant: str = SHARED_TENANT,
                   progress: Progress = False, precompute: bool = True, replace: bool = False) -> ChunkReport:
        with self.lock:
            return self.chunks.add(chunks, tenant=tenant, progress=progress, precompute=precompute, replace=replace)

    def replace_refs(self, doc_id: str, texts: Sequence[str], *, tenant: str = SHARED_TENANT) -> list[str]:
        with self.lock:
            return self.chunks.replace_refs(doc_id, texts, tenant)

    def document_keys(self, doc_id: str, *, tenant: str = SHARED_TENANT) -> list[str]:
        return self.chunks.document_keys(doc_id, tenant)

    def stored(self, keys: Sequence[str]) -> list[bool]:
        return self.chunks.stored(keys)

    def add_documents(self, documents: Iterable[Document], *, tenant: str = SHARED_TENANT, progress: Progress = False,
                      precompute: bool = True) -> IngestReport:
        """Index time: split, precompute and register the documents; with a token map loaded (and
        `premap`), their chunks are stored mapped as well, so no request pays for the map."""
        docs = list(documents)
        with self.lock:
            report = self.ingestor.add_documents(docs, tenant=tenant, progress=progress, precompute=precompute)
            if precompute and self._prepares_at_index():
                report.mapped_chunks = self._premap(self.resolve([ChunkRef(doc_id=d.doc_id) for d in docs], tenant),
                                                    tenant)
            return report

    def _prepares_at_index(self) -> bool:
        """With a calibration that has a primer (never applied per request), or a token map and
        `premap`, chunks get their calibration entries at index time, so no request pays for them."""
        members = self.calibration.members if self.calibration is not None else ()
        return any(c.prepares_chunks for c in members) and (self.premap or any(c.primer is not None for c in members))

    def _prepare_chunks(self, chunks: list[ResolvedChunk], tenant: str, progress: Any = False) -> int:
        """`add_chunks`' index-time step (`ChunkIndex.prepare`), as `add_documents` has it."""
        return self._premap(chunks, tenant) if self._prepares_at_index() else 0

    def premap_contexts(self, contexts: Sequence[ContextItem], *, tenant: str = SHARED_TENANT) -> int:
        """Store these contexts' chunks with each token map of the engine's calibration applied
        now (index time), instead of on their first reuse; returns how many entries were made.
        Chunks already mapped cost a `contains`. Nothing happens without a token map."""
        with self.lock:
            return self._premap(self.resolve(contexts, tenant), tenant)

    def _premap(self, chunks: Sequence[ResolvedChunk], tenant: str) -> int:
        maps = {c.map_digest(): c for c in (self.calibration.members if self.calibration is not None else ())
                if c.prepares_chunks}
        made = 0
        timings = Timings()
        for cal in maps.values():
            for c in chunks:
                made += int(self.assembler.store_mapped(c, tenant, timings, cal))
        return made

    def invalidate(self, doc_id: str, tenant: str = SHARED_TENANT) -> list[str]:
        with self.lock:
            return self.store.invalidate(doc_id, tenant)

    # -- request planning (read-only) ---------------------------------------------------------
    def resolve(self, contexts: Sequence[ContextItem] | None, tenant: str = SHARED_TENANT) -> list[ResolvedChunk]:
        return resolve(contexts, computer=self.computer, store=self.store, split=self.split, tenant=tenant)

    def prompt_ids(self, question: str, contexts: Sequence[ContextItem] | None = None, tenant: str = SHARED_TENANT) -> list[int]:
        """The exact token sequence full prefill would see (for baselines and tests)."""
        ids = list(self.prompt.prefix_ids)
        for c in self.resolve(contexts, tenant):
            ids.extend(c.token_ids)
        return ids + self.prompt.query_ids(question)

    def plan_keys(self, contexts: Sequence[ContextItem] | None, tenant: str = SHARED_TENANT) -> list[str]:
        return self.assembler.plan_keys(self.resolve(contexts, tenant), tenant)

    # -- prefill -----------------------------------------------------------------------------
    def prefill(
        self,
        question: str,
        contexts: Sequence[ContextItem] | None = None,
        *,
        use_cache: bool = True,
        recompute_ratio: float | str | None = None,
        selector: str | None = None,
        blend: BlendConfig | None = None,
        tenant: str = SHARED_TENANT,
        extra_capacity: int = 0,
        timings: Timings | None = None,
        prefix_tree: bool = True,
    ) -> tuple[FusionResult, PrefillInfo]:
        """Build the prompt's KV (fused or full) and return it with the next-token logits.

        `prefix_tree=False`: this request neither reads exact tree nodes nor counts towards
        storing them (what measures blending itself on repeated prompts, `evaluation.py`)."""
        params = GenerationParams(recompute_ratio=recompute_ratio, selector=selector, use_cache=use_cache,
                                  tenant=tenant)
        rc = RequestContext(tenant=tenant, params=params, timings=timings or Timings())
        return self._prefill(rc, question, contexts, blend=blend, extra_capacity=extra_capacity,
                             prefix_tree=prefix_tree)

    def _prefill(self, rc: RequestContext, question: str, contexts: Sequence[ContextItem] | None, *,
                 blend: BlendConfig | None = None, extra_capacity: int = 0,
                 prefix_tree: bool = True) -> tuple[FusionResult, PrefillInfo]:
        """Prefill for one request: its tenant, its options (`rc.params`) and its timings."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        check_text(question, "the question")  # lone surrogates: InvalidInputError, not the tokenizer's TypeError
        p, tenant, timings = rc.params, rc.tenant, rc.timings
        cfg = (blend or self.blend).with_request(p.recompute_ratio, p.selector)
        with self.lock:
            chunks = self.resolve(contexts, tenant)
            q_ids = torch.tensor(self.prompt.query_ids(question), dtype=torch.long)
            ctx_len = len(self.prompt.prefix_ids) + sum(c.num_tokens for c in chunks)
            calibration = self._calibration_for(p, cfg)
            if (blend is None and p.selector is None and self.calibrated_selector and calibration is not None
                    and calibration.kv_map is not None):
                cfg = cfg.with_request(selector=self.calibrated_selector)
            needed = ctx_len + len(q_ids) + extra_capacity + (calibration.link_tokens if calibration else 0)
            if needed > self.runner.max_positions:
                raise ContextTooLongError(needed, self.runner.max_positions)
            self.ingestor.register_request(contexts, chunks, tenant)
            info = PrefillInfo(hits=0, misses=0, keys=[c.key for c in chunks])
            t0 = time.perf_counter()
            if not p.use_cache or not chunks:
                ids = self.prompt.prefix_ids + [i for c in chunks for i in c.token_ids]
                fused = full_prefill(self.runner, torch.tensor(ids, dtype=torch.long), q_ids, needed)
                timings.fuse_s = time.perf_counter() - t0
                return fused, info
            # a primer cannot be applied at placement: primed chunks are always read from their entries
            mapped_by = (calibration if _places_map(calibration, cfg)
                         and (self.premap or calibration.primer is not None) else None)
            asm = self.assembler.assemble(chunks, tenant, timings, use_tree=prefix_tree, mapped_by=mapped_by)
            info["hits"], info["misses"], info["exact_chunks"] = asm.hits, asm.misses, asm.exact_chunks
            if asm.mapped:
                info["mapped_chunks"], info["mapped_hits"] = len(asm.mapped), asm.mapped_hits
            if asm.materialized:
                info["materialized"] = True
            t0 = time.perf_counter()
            try:
                fused = fuse(self.runner, asm.segments, q_ids, exact_len=asm.exact_len, config=cfg,
                             extra_capacity=extra_capacity, calibration=calibration, mapped=asm.mapped)
            finally:
                asm.close()
            timings.fuse_s = time.perf_counter() - t0
            return fused, info

    def _calibration_for(self, p: GenerationParams, cfg: BlendConfig) -> Any:
        """The request's calibration: the engine's one for the request's recompute regime."""
        from daser_rag.calibration.adapter import calibration_for_request

        share = None if cfg.is_auto else float(cfg.recompute_ratio)
        return calibration_for_request(self.calibration, p.calibration, share, cfg.recompute_ratio)

    # -- generation --------------------------------------------------------------------------
    def _run(self, question: str, contexts: Sequence[ContextItem] | None, params: GenerationParams | None,
             *, cancel: Callable[[], bool] | None = None, **kwargs: Any) -> Generator[str, None, GenerationResult]:
        """`cancel()` is polled before prefill and between tokens; when it returns True the
        request stops with finish_reason "cancelled" (a gone client frees the model)."""
        p = GenerationParams.from_kwargs(params, **kwargs)
        rc = RequestContext(tenant=p.tenant, params=p)
        timings = rc.timings
        t_start = time.perf_counter()
        rng = torch.Generator().manual_seed(p.seed) if p.seed is not None else None

        def choose(logits: torch.Tensor) -> int:
            return sample_next(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=rng)

        emitter = TextEmitter(self.tokenizer, p.stop)
        finish = "length"
        with self.lock:
            if cancel is not None and cancel():  # gone before any model work: nothing was done
                return GenerationResult(text="", token_ids=[], prompt_tokens=0, context_tokens=0, query_tokens=0,
                                        exact_tokens=0, reused_tokens=0, recomputed_tokens=0, cache_hits=0,
                                        cache_misses=0, mode="full", recompute_ratio=1.0, finish_reason="cancelled",
                                        timings=timings)
            fused, info = self._prefill(rc, question, contexts, extra_capacity=p.max_new_tokens)
            t_dec = None
            for tok, _ in decode_n_tokens(self.runner, fused.cache, fused.logits[-1], p.max_new_tokens,
                                          choose=choose, stop_ids=self.eos_ids, cancel=cancel):
                if t_dec is None:
                    timings.ttft_s = time.perf_counter() - t_start
                    t_dec = time.perf_counter()
                if tok in self.eos_ids:
                    finish = "stop"
                    break
                delta = emitter.push(tok)
                if delta:
                    yield delta
                if emitter.stopped:
                    finish = "stop"
                    break
            else:
                if cancel is not None and len(emitter.ids) < p.max_new_tokens and cancel():
                    finish = "cancelled"
            if t_dec is not None:
                timings.decode_s = time.perf_counter() - t_dec
        timings.total_s = time.perf_counter() - t_start
        return pack_result(fused, info, emitter, finish, timings, p, self.blend.recompute_ratio)


def _prefix_tree(spec: PrefixTree | bool | str, after: int) -> tuple[PrefixTree | None, str]:
    """The tree and how it materializes, from the constructor's `prefix_tree` (a PrefixTree or
    True: background; False: off; or a mode name from the settings table)."""
    if isinstance(spec, PrefixTree):
        return spec, "background"
    if isinstance(spec, bool):
        spec = "background" if spec else "off"
    if spec not in settings.PREFIX_TREE.choices:
        raise InvalidInputError(f"prefix_tree must be one of {', '.join(settings.PREFIX_TREE.choices)} "
                                f"(or a bool / PrefixTree), got {spec!r}")
    if spec == "off":
        return None, spec
    if not isinstance(after, int) or after < 1:
        raise InvalidInputError(f"prefix_tree_after must be an integer >= 1, got {after!r}")
    return PrefixTree(materialize_after=after), spec


def _places_map(calibration: Any, cfg: BlendConfig) -> bool:
    """Fusion will place reused KV with this calibration's token map or primer (it has one, and
    the request does not recompute every reused token, where fusion drops the calibration)."""
    return (calibration is not None and calibration.prepares_chunks
            and (cfg.is_auto or float(cfg.recompute_ratio) < 1.0))
