"""Segment assembly: the stored pieces of one prompt, in order, and how much of it is exact.

Exact first: the system prefix is exact; so is the first chunk (computed right after the
prefix); with a prefix tree, the longest stored run of tree nodes for this ordered chunk
sequence is exact too, and a sequence seen often enough is materialized as nodes. Chunks
missing from the store are computed in place and stored, never a reason to stop reusing
the chunks after them. With a calibration that has a token map or a primer, the chunks that are
reused (not exact) are read from a second entry stored with the map applied (computed after the
primer, with a primer) (`calibration/premap.py`); the
first request to reuse a chunk under a map makes that entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from daser_rag.blend.layer_loader import LayerLoader, source_token_ids
from daser_rag.blend.prefix_tree import PrefixTree
from daser_rag.calibration.premap import mapped_key, premap
from daser_rag.engine.chunks import ChunkComputer
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import EncodedKV, decode
from daser_rag.kv.store import KVStore
from daser_rag.model.runner import LayerRunner
from daser_rag.types import ResolvedChunk, Timings

if TYPE_CHECKING:
    from daser_rag.calibration.adapter import Calibration
    from daser_rag.engine.materialize import BackgroundMaterializer


@dataclass
class Assembly:
    segments: list[Any]
    exact_len: int  # positions [0, exact_len) are exactly what full prefill computes
    exact_chunks: int
    hits: int = 0
    misses: int = 0
    materialized: bool = False
    loader: LayerLoader | None = None
    keys: list[str] = field(default_factory=list)
    mapped: set[int] = field(default_factory=set)
    """Indices in `segments` read from the calibration's second entries: primed and/or carrying its
    token map already (fusion then
    places them with the scales and biases only)."""
    mapped_hits: int = 0
    """Mapped entries read from the store (the rest of `mapped` were made by this request)."""

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()


@dataclass
class PathWork:
    """The next tree nodes of an ordered path to store: chunks[depth:end], computed after `runs`
    (the system prefix and the path's stored nodes before `depth`)."""

    chunks: list[ResolvedChunk]
    node_keys: list[str]
    runs: list[ChunkKV]
    depth: int
    end: int

    @property
    def complete(self) -> bool:
        """Storing these nodes stores the whole path."""
        return self.end >= len(self.chunks)


class SegmentAssembler:
    def __init__(self, runner: LayerRunner, store: KVStore, computer: ChunkComputer, *,
                 prefix_tree: PrefixTree | None = None, layerwise: bool = False) -> None:
        self.runner = runner
        self.store = store
        self.computer = computer
        self.prefix_tree = prefix_tree
        self.layerwise = layerwise
        self.materializer: BackgroundMaterializer | None = None
        """When set, paths that cross the tree's threshold are materialized in the background
        (engine/materialize.py) instead of inside the request that crossed it."""

    # -- fetch ------------------------------------------------------------------------------
    def lookup(self, key: str, timings: Timings) -> Any:
        """A stored entry (left encoded when layer-wise loading will decode it); None on a miss."""
        t0 = time.perf_counter()
        if self.layerwise:
            got: Any = self.store.get_encoded(key)
        else:
            got = self.store.get(key, dtype=self.runner.dtype, device=self.runner.device)
        timings.fetch_s += time.perf_counter() - t0
        return got

    def compute_and_store(self, chunk: ResolvedChunk, tenant: str, timings: Timings) -> ChunkKV:
        t0 = time.perf_counter()
        kv = self.computer.compute(chunk.token_ids, chunk.key)
        self.store.put(kv)
        spent = time.perf_counter() - t0
        timings.precompute_s += spent
        self.store.note_cost(chunk.key, spent)
        return kv

    def fetch(self, chunk: ResolvedChunk, tenant: str, timings: Timings) -> tuple[Any, bool]:
        got = self.lookup(chunk.key, timings)
        if got is not None:
            return got, True
        return self.compute_and_store(chunk, tenant, timings), False

    def fetch_mapped(self, chunk: ResolvedChunk, tenant: str, timings: Timings,
                     calibration: Calibration) -> tuple[Any, bool, bool]:
        """The chunk's K/V with `calibration`'s token map applied: (entry, chunk was stored,
        mapped entry was stored). On a miss it is made and stored (`_make_mapped`)."""
        key = mapped_key(chunk.key, calibration.map_digest())
        got = self.lookup(key, timings)
        if got is not None:
            return got, True, True
        enc, hit = self._make_mapped(chunk, key, tenant, timings, calibration)
        # what later requests will read (the codec's rounding included), so the first is no different
        return (enc if self.layerwise else decode(enc, self.runner.dtype, self.runner.device)), hit, False

    def store_mapped(self, chunk: ResolvedChunk, tenant: str, timings: Timings, calibration: Calibration) -> bool:
        """Make and store the chunk's mapped entry unless it is stored (index time: nothing is
        decoded); whether it was made now."""
        key = mapped_key(chunk.key, calibration.map_digest())
        if self.store.contains(key):
            return False
        self._make_mapped(chunk, key, tenant, timings, calibration)
        return True

    def _make_mapped(self, chunk: ResolvedChunk, key: str, tenant: str, timings: Timings,
                     calibration: Calibration) -> tuple[EncodedKV, bool]:
        """Read the raw entry (or compute it; with a primer, compute the chunk after the primer
        instead), map it, store the result under `key` and register it under the chunk's document
        (invalidated with it); (the stored entry, raw was stored)."""
        if calibration.primer is not None:  # computed after the primer, not read from the raw entry
            t0 = time.perf_counter()
            raw: ChunkKV | None = self.computer.compute_primed(chunk.token_ids, chunk.key, calibration.primers())
            timings.precompute_s += time.perf_counter() - t0
            hit = False
        else:
            t0 = time.perf_counter()
            raw = self.store.get(chunk.key, dtype=torch.float32, device=self.runner.device)
            timings.fetch_s += time.perf_counter() - t0
            hit = raw is not None
        if raw is None:
            raw = self.compute_and_store(chunk, tenant, timings)
        t0 = time.perf_counter()
        enc = self.store.put(premap(raw, calibration, self.runner.rope))
        if chunk.doc_id is not None:
            self.store.add_derived([chunk.doc_id], key, tenant)
        timings.precompute_s += time.perf_counter() - t0
        return enc, hit

    # -- plan -------------------------------------------------------------------------------
    def plan_keys(self, chunks: list[ResolvedChunk], tenant: str) -> list[str]:
        """Store keys a request will read: what a scheduler protects and prefetches."""
        keys = [c.key for c in chunks]
        if self.prefix_tree is None or not chunks:
            return keys
        m = PrefixTree.longest_stored(self.computer.prefix_key(tenant), keys, self.store.contains)
        return m.node_keys[: m.depth] + keys[m.depth:]

    # -- assemble ---------------------------------------------------------------------------
    def assemble(self, chunks: list[ResolvedChunk], tenant: str, timings: Timings, *,
                 use_tree: bool = True, mapped_by: Calibration | None = None) -> Assembly:
        """`mapped_by`: a calibration with a token map or a primer that fusion will place this
        request's reused KV with; the non-exact chunks are then read from its second entries
        (`Assembly.mapped`)."""
        if mapped_by is not None and not mapped_by.prepares_chunks:
            mapped_by = None
        prefix = self.computer.prefix()
        depth = min(1, len(chunks))
        node_keys = [c.key for c in chunks]
        materialized = False
        if self.prefix_tree is not None and use_tree and len(chunks) > 1:
            pk = self.computer.prefix_key(tenant)
            count = self.prefix_tree.record(pk, node_keys)
            match = PrefixTree.longest_stored(pk, node_keys, self.store.contains)
            depth, node_keys = match.depth, match.node_keys
            if self.prefix_tree.should_materialize(count, depth, len(chunks)):
                if self.materializer is not None:  # off the request path: this request blends as usual
                    self.materializer.submit(chunks, tenant)
                else:
                    t0 = time.perf_counter()
                    depth = self._materialize(prefix, chunks, node_keys, depth, tenant, timings)
                    timings.precompute_s += time.perf_counter() - t0
                    materialized = True
        asm = Assembly([prefix], 0, depth, materialized=materialized, keys=[c.key for c in chunks])
        for j, c in enumerate(chunks):
            kv = self.lookup(node_keys[j], timings) if 0 < j < asm.exact_chunks else None
            hit = kv is not None
            if kv is None:
                if 0 < j < asm.exact_chunks:
                    # the node vanished between lookup and fetch (evicted or invalidated); the plain
                    # chunk was computed after the prefix only, so exactness ends here
                    asm.exact_chunks = j
                if mapped_by is not None and j >= asm.exact_chunks:
                    kv, hit, stored = self.fetch_mapped(c, tenant, timings, mapped_by)
                    asm.mapped.add(j + 1)
                    asm.mapped_hits += int(stored)
                else:
                    kv, hit = self.fetch(c, tenant, timings)
            asm.hits += int(hit)
            asm.misses += int(not hit)
            asm.segments.append(kv)
        if asm.exact_chunks and asm.segments[1].start_pos != prefix.num_tokens:
            asm.exact_chunks = 0  # not computed right after this prefix: nothing beyond it is exact
        asm.exact_len = prefix.num_tokens + sum(c.num_tokens for c in chunks[: asm.exact_chunks])
        if self.layerwise:
            placements, offset = [], 0
            for seg in asm.segments:
                placements.append((seg, offset))
                offset += int(source_token_ids(seg).shape[0])
            asm.loader = LayerLoader(placements, num_layers=self.runner.spec.num_layers,
                                     inv_freq=self.runner.inv_freq, device=self.runner.device, dtype=self.runner.dtype)
            asm.segments = list(asm.loader.segments())
        return asm

    def path_work(self, chunks: list[ResolvedChunk], tenant: str, timings: Timings, *,
                  max_nodes: int | None = None) -> PathWork | None:
        """What storing the next nodes of this ordered path takes (at most `max_nodes`): the stored
        runs they extend, read from the store, no model work. None when the whole path is stored.

        The job was decided when the path crossed the threshold, so this does not consult
        `self.prefix_tree` (which a caller may have swapped out since): the nodes are exact
        whatever reads them later."""
        if len(chunks) < 2:
            return None
        match = PrefixTree.longest_stored(self.computer.prefix_key(tenant), [c.key for c in chunks],
                                          self.store.contains)
        if match.depth >= len(chunks):
            return None
        return self._path_work(self.computer.prefix(), chunks, match.node_keys, match.depth, tenant, timings,
                               max_nodes, model_held=False)

    def compute_nodes(self, work: PathWork, *, before_layer: Callable[[int], None] | None = None) -> list[ChunkKV]:
        """The model work (the caller holds the model lock); `before_layer` may raise to stop."""
        return self.computer.compute_after(work.runs, [c.token_ids for c in work.chunks[work.depth:work.end]],
                                           work.node_keys[work.depth:work.end], before_layer=before_layer)

    def store_nodes(self, work: PathWork, nodes: list[ChunkKV], tenant: str) -> None:
        """Store computed nodes, each registered under every document on its path (any of them
        invalidated -> the node is dropped). Needs no model: background work does it after giving
        the model back."""
        for j, kv in enumerate(nodes, start=work.depth):
            self.store.put(kv)
            doc_ids = [q.doc_id for q in work.chunks[: j + 1] if q.doc_id is not None]
            self.store.add_derived(doc_ids, work.node_keys[j], tenant)

    def _path_work(self, prefix: ChunkKV, chunks: list[ResolvedChunk], node_keys: list[str], depth: int,
                   tenant: str, timings: Timings, limit: int | None, *, model_held: bool) -> PathWork:
        """`model_held=False` (background, outside the model lock): only reads; a first chunk
        evicted meanwhile becomes part of the work (computed by `compute_nodes`, under the lock)
        instead of being computed here."""
        runs = [prefix]
        for j in range(depth):
            if j == 0 and model_held:
                kv, _ = self.fetch(chunks[0], tenant, timings)
            else:
                kv = self.store.get(node_keys[j], dtype=self.runner.dtype, device=self.runner.device)
                if kv is None:  # gone since the lookup: extend from here instead
                    depth = j
                    break
            runs.append(kv)
        end = len(chunks) if limit is None else min(len(chunks), depth + max(1, limit))
        return PathWork(list(chunks), list(node_keys), runs, depth, end)

    def _materialize(self, prefix: ChunkKV, chunks: list[ResolvedChunk], node_keys: list[str], depth: int,
                     tenant: str, timings: Timings) -> int:
        """Inline: compute every node of the path after the exact run and store it; returns the
        depth now stored."""
        work = self._path_work(prefix, chunks, node_keys, depth, tenant, timings, None, model_held=True)
        self.store_nodes(work, self.compute_nodes(work), tenant)
        return work.end
