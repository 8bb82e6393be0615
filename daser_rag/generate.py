"""CacheAwareGenerator: (chunks, question) -> answer, reusing stored chunk KV.

Per request: resolve the context into chunks, fetch each chunk's KV from the store
(computing and storing any that are missing, without giving up reuse for the rest), fuse
them behind the exact system prefix, selectively recompute, and decode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from daser_rag.api import ContextItem
from daser_rag.blend.fusion import BlendConfig, FusionResult, fuse
from daser_rag.blend.layer_loader import LayerLoader, source_token_ids
from daser_rag.blend.prefix_tree import PrefixTree
from daser_rag.chunking import split_text
from daser_rag.errors import ContextTooLongError, InvalidInputError
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.keys import chunk_key, prefix_key, text_digest
from daser_rag.kv.store import KVStore, default_cache_dir
from daser_rag.model.loader import LoadedModel, load_model
from daser_rag.model.runner import LayerRunner
from daser_rag.params import GenerationParams
from daser_rag.prompt import DEFAULT_SYSTEM_PROMPT, PromptFormat
from daser_rag.sampling import sample_next
from daser_rag.types import ChunkRef, Document, GenerationResult, IngestReport, ResolvedChunk, Timings

class TokenStream:
    """Iterate to receive text deltas; `.result` holds the GenerationResult once finished."""

    def __init__(self, gen: Iterator[str], holder: dict[str, GenerationResult]) -> None:
        self._gen = gen
        self._holder = holder

    def __iter__(self) -> Iterator[str]:
        yield from self._gen

    @property
    def result(self) -> GenerationResult | None:
        return self._holder.get("result")


class CacheAwareGenerator:
    def __init__(
        self,
        model: LoadedModel | str | Path | None = None,
        store: KVStore | None = None,
        *,
        cache_dir: str | Path | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        recompute_ratio: float = 0.15,
        check_layer: int = 1,
        chunk_tokens: int = 512,
        codec: str = "fp16",
        host_bytes: int | None = None,
        device: str | None = None,
        device_bytes: int = 4 << 30,
        prefix_tree: PrefixTree | bool = False,
        layerwise: bool = False,
    ) -> None:
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        self.runner = LayerRunner(self.lm)
        if store is None:
            kwargs: dict[str, Any] = {"codec": codec}
            if host_bytes is not None:
                kwargs["host_bytes"] = host_bytes
            if self.lm.device.type == "cuda":
                kwargs.update(device=self.lm.device, device_bytes=device_bytes)
            store = KVStore(cache_dir if cache_dir is not None else default_cache_dir(), **kwargs)
        self.store = store
        self.prompt = PromptFormat(self.lm.tokenizer, system_prompt)
        self.blend = BlendConfig(recompute_ratio=recompute_ratio, check_layer=check_layer)
        self.chunk_tokens = chunk_tokens
        if prefix_tree:
            # repeated ordered chunk sequences get exact KV (stored as tree nodes) from their 2nd use on
            self.prefix_tree = prefix_tree if isinstance(prefix_tree, PrefixTree) else PrefixTree()
        self.layerwise = layerwise
        self._prefix_cache: dict[str, ChunkKV] = {}
        self.lock = threading.RLock()
        tok = self.lm.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for special in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
                eos.add(tid)
        self.eos_ids = eos

    # -- identity & keys ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def chunk_key_for(self, text: str, tenant: str = "") -> str:
        return chunk_key(self.fingerprint, self.prompt.prefix_ids, self.prompt.chunk_ids(text), tenant)

    # -- KV computation ----------------------------------------------------------------------
    def _prefix_kv(self, tenant: str) -> ChunkKV:
        key = prefix_key(self.fingerprint, self.prompt.prefix_ids, tenant)
        kv = self._prefix_cache.get(key)
        if kv is None:
            ids = torch.tensor(self.prompt.prefix_ids, dtype=torch.long)
            cache = self.runner.new_cache(len(ids))
            self.runner.forward(ids, 0, cache)
            kv = self._extract(cache, key, ids, 0)
            self._prefix_cache[key] = kv
        return kv

    def _extract(self, cache: Any, key: str, ids: torch.Tensor, start: int) -> ChunkKV:
        end = start + ids.shape[0]
        keys = torch.stack([cache.keys[i][:, start:end] for i in range(self.runner.spec.num_layers)])
        values = torch.stack([cache.values[i][:, start:end] for i in range(self.runner.spec.num_layers)])
        return ChunkKV(key=key, token_ids=ids.cpu(), start_pos=start, keys=keys, values=values,
                       meta={"fingerprint": self.fingerprint})

    def compute_chunk(self, ids: list[int], key: str, tenant: str = "") -> ChunkKV:
        """Chunk KV computed right after the system prefix: the layout it is stored in."""
        prefix = self._prefix_kv(tenant)
        p = prefix.num_tokens
        t = torch.tensor(ids, dtype=torch.long)
        cache = self.runner.new_cache(p + len(ids))
        for i in range(self.runner.spec.num_layers):
            cache.write(i, 0, prefix.keys[i], prefix.values[i])
        cache.length = p
        self.runner.forward(t, p, cache)
        return self._extract(cache, key, t, p)

    def _get_or_compute(self, piece: ResolvedChunk, tenant: str, timings: Timings) -> tuple[ChunkKV, bool]:
        t0 = time.perf_counter()
        kv = self.store.get(piece.key, dtype=self.runner.dtype, device=self.runner.device)
        timings.fetch_s += time.perf_counter() - t0
        if kv is not None:
            return kv, True
        return self._compute_and_store(piece, tenant, timings), False

    def _compute_and_store(self, piece: ResolvedChunk, tenant: str, timings: Timings) -> ChunkKV:
        t0 = time.perf_counter()
        kv = self.compute_chunk(piece.token_ids, piece.key, tenant)
        self.store.put(kv)
        timings.precompute_s += time.perf_counter() - t0
        return kv

    # -- ingestion ---------------------------------------------------------------------------
    def split(self, text: str) -> list[str]:
        return split_text(self.tokenizer, text, self.chunk_tokens)

    def add_documents(
        self,
        documents: Iterable[Document],
        *,
        tenant: str = "",
        progress: bool | Callable[[int], None] = False,
        precompute: bool = True,
    ) -> IngestReport:
        """Chunk, precompute and register documents. Re-adding an edited document drops the
        KV of its old chunks (unless another document still uses them); an unchanged one
        costs nothing."""
        docs = list(documents)
        for d in docs:
            if not isinstance(d, Document):
                raise InvalidInputError(f"add_documents expects Document objects, got {type(d).__name__}")
            if not d.doc_id:
                raise InvalidInputError("document id must be a non-empty string")
        report = IngestReport(documents=len(docs))
        t_start = time.perf_counter()
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(docs), desc="precomputing chunk KV", unit="doc")
        with self.lock:
            for d in docs:
                chunks = self.split(d.text)
                report.changed_documents += int(
                    self.store.register_document(d.doc_id, chunks, text_digest(d.text), tenant)
                )
                keys = []
                for text in chunks:
                    ids = self.prompt.chunk_ids(text)
                    key = chunk_key(self.fingerprint, self.prompt.prefix_ids, ids, tenant)
                    keys.append(key)
                    report.chunks += 1
                    report.tokens += len(ids)
                    if not precompute:
                        continue
                    if self.store.contains(key):
                        report.reused_chunks += 1
                    else:
                        self.store.put(self.compute_chunk(ids, key, tenant))
                        report.computed_chunks += 1
                report.dropped_chunks += len(self.store.replace_document_refs(d.doc_id, keys, tenant))
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(1)
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t_start
        return report

    def invalidate(self, doc_id: str, tenant: str = "") -> list[str]:
        with self.lock:
            return self.store.invalidate(doc_id, tenant)

    # -- request assembly --------------------------------------------------------------------
    def resolve(self, contexts: Sequence[ContextItem] | None, tenant: str) -> list[ResolvedChunk]:
        pieces: list[ResolvedChunk] = []
        for item in contexts or []:
            if isinstance(item, str):
                texts: list[tuple[str, str | None]] = [(item, None)]
            elif isinstance(item, Document):
                known = self.store.document_info(item.doc_id, tenant)
                if known is None or known.content_digest != text_digest(item.text):
                    self.add_documents([item], tenant=tenant, precompute=False)
                texts = [(t, item.doc_id) for t in self.store.document_chunk_texts(item.doc_id, tenant)]
            elif isinstance(item, ChunkRef):
                if item.text is None:
                    if not item.doc_id:
                        raise InvalidInputError("a ChunkRef needs text, doc_id, or both")
                    texts = [(t, item.doc_id) for t in self.store.document_chunk_texts(item.doc_id, tenant)]
                else:
                    texts = [(item.text, item.doc_id)]
            else:
                raise InvalidInputError(
                    f"context items must be str, ChunkRef or Document, got {type(item).__name__}")
            for text, doc_id in texts:
                if not text.strip():
                    raise InvalidInputError("a context chunk is empty")
                ids = self.prompt.chunk_ids(text)
                pieces.append(ResolvedChunk(text, doc_id, tuple(ids),
                                     chunk_key(self.fingerprint, self.prompt.prefix_ids, ids, tenant)))
        return pieces

    def prompt_ids(self, question: str, contexts: Sequence[ContextItem] | None = None, tenant: str = "") -> list[int]:
        """The exact token sequence full prefill would see (for baselines and tests)."""
        pieces = self.resolve(contexts, tenant)
        ids = list(self.prompt.prefix_ids)
        for p in pieces:
            ids.extend(p.token_ids)
        return ids + self.prompt.query_ids(question)

    # -- generation --------------------------------------------------------------------------
    def generate(self, question: str, contexts: Sequence[ContextItem] | None = None,
                 params: GenerationParams | None = None, **kwargs: Any) -> GenerationResult:
        it = self._run(question, contexts, params, **kwargs)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    def stream(self, question: str, contexts: Sequence[ContextItem] | None = None,
               params: GenerationParams | None = None, **kwargs: Any) -> TokenStream:
        holder: dict[str, GenerationResult] = {}

        def gen() -> Iterator[str]:
            holder["result"] = yield from self._run(question, contexts, params, **kwargs)

        return TokenStream(gen(), holder)

    def prefill(
        self,
        question: str,
        contexts: Sequence[ContextItem] | None = None,
        *,
        use_cache: bool = True,
        recompute_ratio: float | None = None,
        tenant: str = "",
        extra_capacity: int = 0,
        timings: Timings | None = None,
    ) -> tuple[FusionResult, dict[str, Any]]:
        """Build the prompt's KV (fused or full) and return it with the next-token logits."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("question must be a non-empty string")
        timings = timings or Timings()
        with self.lock:
            pieces = self.resolve(contexts, tenant)
            q_ids = torch.tensor(self.prompt.query_ids(question), dtype=torch.long)
            ctx_len = len(self.prompt.prefix_ids) + sum(len(p.token_ids) for p in pieces)
            needed = ctx_len + len(q_ids)
            if needed + extra_capacity > self.runner.max_positions:
                raise ContextTooLongError(needed + extra_capacity, self.runner.max_positions)
            info: dict[str, Any] = {"hits": 0, "misses": 0, "keys": [p.key for p in pieces]}
            if not use_cache:
                ids = torch.tensor(self.prompt.prefix_ids + [i for p in pieces for i in p.token_ids], dtype=torch.long)
                all_ids = torch.cat([ids, q_ids])
                cache = self.runner.new_cache(needed + extra_capacity)
                t0 = time.perf_counter()
                logits = self.runner.forward(all_ids, 0, cache)
                timings.fuse_s = time.perf_counter() - t0
                return FusionResult(cache, logits, ctx_len, ctx_len, 0, 0, len(q_ids)), info
            segments, exact, loader = self._assemble_segments(pieces, tenant, timings, info)
            cfg = self.blend if recompute_ratio is None else replace(self.blend, recompute_ratio=recompute_ratio)
            t0 = time.perf_counter()
            try:
                fused = fuse(self.runner, segments, q_ids, exact_len=exact, config=cfg,
                             extra_capacity=extra_capacity)
            finally:
                if loader is not None:
                    loader.close()
            timings.fuse_s = time.perf_counter() - t0
            return fused, info

    # -- segment assembly (prefix tree, layer-wise loading) ------------------------------------
    prefix_tree: PrefixTree | None = None
    """When set, repeated ordered chunk sequences reuse exact KV (see blend/prefix_tree.py)."""
    layerwise: bool = False
    """When true, stored KV is decoded/re-rotated/uploaded one layer ahead of compute."""

    def plan_keys(self, contexts: Sequence[ContextItem] | None, tenant: str = "") -> list[str]:
        """Store keys a request for `contexts` will read: what a scheduler protects and prefetches."""
        pieces = self.resolve(contexts, tenant)
        chunk_keys = [p.key for p in pieces]
        if self.prefix_tree is None or not pieces:
            return chunk_keys
        pk = prefix_key(self.fingerprint, self.prompt.prefix_ids, tenant)
        m = PrefixTree.longest_stored(pk, chunk_keys, self.store.contains)
        return m.node_keys[: m.depth] + chunk_keys[m.depth:]

    def _lookup(self, key: str, timings: Timings) -> Any:
        """A stored entry, left encoded when layer-wise loading will decode it; None on a miss."""
        t0 = time.perf_counter()
        if self.layerwise:
            got: Any = self.store.get_encoded(key)
        else:
            got = self.store.get(key, dtype=self.runner.dtype, device=self.runner.device)
        timings.fetch_s += time.perf_counter() - t0
        return got

    def _fetch_chunk(self, p: ResolvedChunk, tenant: str, timings: Timings) -> tuple[Any, bool]:
        got = self._lookup(p.key, timings)
        if got is not None:
            return got, True
        pre = timings.precompute_s
        kv = self._compute_and_store(p, tenant, timings)  # the lookup above already missed
        self.store.note_cost(p.key, timings.precompute_s - pre)
        return kv, False

    def _assemble_segments(
        self, pieces: list[ResolvedChunk], tenant: str, timings: Timings, info: dict[str, Any]
    ) -> tuple[list[Any], int, LayerLoader | None]:
        prefix = self._prefix_kv(tenant)
        segments: list[Any] = [prefix]
        depth = min(1, len(pieces))
        node_keys = [p.key for p in pieces]
        if self.prefix_tree is not None and len(pieces) > 1:
            pk = prefix_key(self.fingerprint, self.prompt.prefix_ids, tenant)
            chunk_keys = [p.key for p in pieces]
            count = self.prefix_tree.record(pk, chunk_keys)
            match = PrefixTree.longest_stored(pk, chunk_keys, self.store.contains)
            depth, node_keys = match.depth, match.node_keys
            if self.prefix_tree.should_materialize(count, depth, len(pieces)):
                t0 = time.perf_counter()
                depth = self._materialize(prefix, pieces, node_keys, depth, tenant, timings)
                timings.precompute_s += time.perf_counter() - t0
                info["materialized"] = True
        info["exact_chunks"] = depth
        for j, p in enumerate(pieces):
            kv = self._lookup(node_keys[j], timings) if 0 < j < depth else None
            if kv is not None:
                hit = True
            else:
                if 0 < j < depth:
                    # the node vanished between lookup and fetch (evicted or invalidated); the
                    # plain chunk was computed after the prefix only, so exactness ends here
                    depth = j
                    info["exact_chunks"] = depth
                kv, hit = self._fetch_chunk(p, tenant, timings)
            info["hits" if hit else "misses"] += 1
            if p.doc_id is not None:
                self.store.add_refs(p.doc_id, [p.key], tenant)
            segments.append(kv)
        if depth and segments[1].start_pos != prefix.num_tokens:
            depth = 0  # not computed right after this prefix: nothing beyond the prefix is exact
        info["exact_chunks"] = depth
        exact = prefix.num_tokens + sum(len(p.token_ids) for p in pieces[:depth])
        if not self.layerwise:
            return segments, exact, None
        placements, offset = [], 0
        for seg in segments:
            placements.append((seg, offset))
            offset += int(source_token_ids(seg).shape[0])
        loader = LayerLoader(placements, num_layers=self.runner.spec.num_layers, inv_freq=self.runner.inv_freq,
                             device=self.runner.device, dtype=self.runner.dtype)
        return loader.segments(), exact, loader

    def _materialize(self, prefix: ChunkKV, pieces: list[ResolvedChunk], node_keys: list[str], depth: int,
                     tenant: str, timings: Timings) -> int:
        """Compute chunks depth.. exactly after the exact run and store them as tree nodes."""
        runs = [prefix]
        for j in range(depth):
            if j == 0:
                kv, _ = self._get_or_compute(pieces[0], tenant, timings)
            else:
                kv = self.store.get(node_keys[j], dtype=self.runner.dtype, device=self.runner.device)
                if kv is None:  # gone since the lookup: extend from here instead
                    depth = j
                    break
            runs.append(kv)
        p0 = sum(r.num_tokens for r in runs)
        rest = [i for p in pieces[depth:] for i in p.token_ids]
        cache = self.runner.new_cache(p0 + len(rest))
        off = 0
        for r in runs:
            for i in range(self.runner.spec.num_layers):
                cache.write(i, off, r.keys[i].to(self.runner.device, self.runner.dtype),
                            r.values[i].to(self.runner.device, self.runner.dtype))
            off += r.num_tokens
        cache.length = p0
        self.runner.forward(torch.tensor(rest, dtype=torch.long), p0, cache)
        start = p0
        for j in range(depth, len(pieces)):
            p = pieces[j]
            kv = self._extract(cache, node_keys[j], torch.tensor(p.token_ids, dtype=torch.long), start)
            self.store.put(kv)
            start += len(p.token_ids)
            doc_ids = [q.doc_id for q in pieces[: j + 1] if q.doc_id is not None]
            self.store.add_derived(doc_ids, node_keys[j], tenant)  # any of them dropped -> node dropped
        return len(pieces)

    def _run(
        self,
        question: str,
        contexts: Sequence[ContextItem] | None = None,
        params: GenerationParams | None = None,
        *,
        cancel: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """`cancel()` is polled before prefill and between tokens; when it returns True the
        request stops with finish_reason "cancelled" (a gone client frees the model)."""
        p = GenerationParams.from_kwargs(params, **kwargs)
        max_new_tokens, temperature, top_p, top_k, seed = p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed
        recompute_ratio, use_cache, tenant, stop = p.recompute_ratio, p.use_cache, p.tenant, p.stop
        timings = Timings()
        t_start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with self.lock:
            fused, info = self.prefill(question, contexts, use_cache=use_cache, recompute_ratio=recompute_ratio,
                                       tenant=tenant, extra_capacity=max_new_tokens, timings=timings)
            cache = fused.cache
            logits = fused.logits[-1]
            out: list[int] = []
            emitted = ""
            finish = "length"
            t_dec = None
            for step in range(max_new_tokens):
                if cancel is not None and cancel():
                    finish = "cancelled"
                    break
                tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
                if step == 0:
                    timings.ttft_s = time.perf_counter() - t_start
                    t_dec = time.perf_counter()
                if tok in self.eos_ids:
                    finish = "stop"
                    break
                out.append(tok)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if stop:
                    hit = next((s for s in stop if s and s in text), None)
                    if hit is not None:
                        text = text[: text.index(hit)]
                        if len(text) > len(emitted):
                            yield text[len(emitted):]
                        emitted = text
                        finish = "stop"
                        break
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
                if step + 1 < max_new_tokens:
                    logits = self.runner.forward(torch.tensor([tok]), cache.length, cache)[-1]
            if t_dec is not None:
                timings.decode_s = time.perf_counter() - t_dec
        timings.total_s = time.perf_counter() - t_start
        final = emitted if finish == "stop" and stop else self.tokenizer.decode(out, skip_special_tokens=True)
        return GenerationResult(
            text=final,
            token_ids=out,
            prompt_tokens=fused.context_tokens + fused.query_tokens,
            context_tokens=fused.context_tokens,
            query_tokens=fused.query_tokens,
            exact_tokens=fused.exact_tokens,
            reused_tokens=fused.reused_tokens,
            recomputed_tokens=fused.recomputed_tokens,
            cache_hits=info["hits"],
            cache_misses=info["misses"],
            mode="full" if not use_cache else "blend",
            recompute_ratio=(recompute_ratio if recompute_ratio is not None else self.blend.recompute_ratio)
            if use_cache else 1.0,
            finish_reason=finish,
            timings=timings,
            chunk_keys=info["keys"],
        )
