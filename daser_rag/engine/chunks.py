"""Chunk KV computation: every chunk is computed right after the fixed system prefix.

The prefix's KV does not depend on the tenant (only keys are salted per tenant), so it is
computed once per generator and shared: a new tenant name costs no model memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from daser_rag.kv.chunk_kv import ChunkKV, mean_kv
from daser_rag.kv.keys import chunk_key, prefix_key
from daser_rag.model.kv_cache import PositionalKVCache
from daser_rag.model.runner import LayerRunner
from daser_rag.prompt import PromptFormat


def extract(runner: LayerRunner, cache: PositionalKVCache, key: str, ids: torch.Tensor, start: int,
            fingerprint: str) -> ChunkKV:
    """Copy positions [start, start+len(ids)) of every layer out of a buffer as a ChunkKV."""
    end = start + int(ids.shape[0])
    n = runner.spec.num_layers
    keys = torch.stack([cache.keys[i][:, start:end] for i in range(n)])
    values = torch.stack([cache.values[i][:, start:end] for i in range(n)])
    return ChunkKV(key=key, token_ids=ids.cpu(), start_pos=start, keys=keys, values=values,
                   meta={"fingerprint": fingerprint})


def write_runs(runner: LayerRunner, cache: PositionalKVCache, runs: Sequence[ChunkKV]) -> int:
    """Write stored runs back to back from position 0 (they must be exact there); return the length."""
    off = 0
    for r in runs:
        for i in range(runner.spec.num_layers):
            cache.write(i, off, r.keys[i].to(runner.device, runner.dtype), r.values[i].to(runner.device, runner.dtype))
        off += r.num_tokens
    cache.length = off
    return off


class ChunkComputer:
    """Computes the shared system prefix once and chunk KV after it."""

    def __init__(self, runner: LayerRunner, prompt: PromptFormat, fingerprint: str) -> None:
        self.runner = runner
        self.prompt = prompt
        self.fingerprint = fingerprint
        self._prefix: ChunkKV | None = None
        self._primed: dict[tuple[int, ...], ChunkKV] = {}  # primer ids -> its KV after the prefix
        self._lock = threading.Lock()

    def key(self, token_ids: Sequence[int], tenant: str) -> str:
        return chunk_key(self.fingerprint, self.prompt.prefix_ids, list(token_ids), tenant)

    def prefix_key(self, tenant: str) -> str:
        return prefix_key(self.fingerprint, self.prompt.prefix_ids, tenant)

    def prefix(self) -> ChunkKV:
        """The system prefix's exact KV (tenant-independent; keyed without a tenant salt)."""
        with self._lock:
            if self._prefix is None:
                ids = torch.tensor(self.prompt.prefix_ids, dtype=torch.long)
                cache = self.runner.new_cache(len(ids))
                self.runner.forward(ids, 0, cache)
                self._prefix = extract(self.runner, cache, self.prefix_key(""), ids, 0, self.fingerprint)
            return self._prefix

    @torch.inference_mode()
    def compute(self, token_ids: Sequence[int], key: str) -> ChunkKV:
        """Chunk KV computed right after the system prefix: the layout it is stored in."""
        prefix = self.prefix()
        t = torch.tensor(list(token_ids), dtype=torch.long)
        cache = self.runner.new_cache(prefix.num_tokens + len(t))
        p = write_runs(self.runner, cache, [prefix])
        self.runner.forward(t, p, cache)
        return extract(self.runner, cache, key, t, p, self.fingerprint)

    def primed_prefix(self, primer: Sequence[int]) -> ChunkKV:
        """The primer's KV computed after the system prefix. Kept for the primers of the last
        calibrations used (at most `MAX_PRIMERS` x 2: an engine serves one or two calibrations)."""
        from daser_rag.calibration.config import MAX_PRIMERS

        ids = tuple(int(i) for i in primer)
        with self._lock:
            if ids in self._primed:
                return self._primed[ids]
        run = self.compute_after([self.prefix()], [ids], ["primer"])[0]
        with self._lock:
            while len(self._primed) >= 2 * MAX_PRIMERS:
                self._primed.pop(next(iter(self._primed)))
            self._primed[ids] = run
        return run

    def compute_primed(self, token_ids: Sequence[int], key: str, primers: Sequence[Sequence[int]]) -> ChunkKV:
        """Chunk KV computed after [system prefix, primer] (`calibration/adapter.py`, primer): at
        the positions it was computed at (`start_pos` past the primer), which fusion re-rotates
        from like any chunk; the primer's own KV is not part of it. With several primers (all of
        one length, so the chunk sits at the same positions after each) the K/V are the mean of
        the computations after each, in float32: the best fixed guess of the chunk's state when
        what precedes it is unknown."""
        if not primers or len({len(p) for p in primers}) != 1:
            raise ValueError("compute_primed needs one or more primers of one length")
        return mean_kv([self.compute_after([self.prefix(), self.primed_prefix(p)], [token_ids], [key])[0]
                        for p in primers])

    @torch.inference_mode()
    def compute_after(self, runs: Sequence[ChunkKV], pieces: Sequence[Sequence[int]],
                      keys: Sequence[str], *, before_layer: Callable[[int], None] | None = None) -> list[ChunkKV]:
        """Compute `pieces` exactly after the exact `runs` (prefix-tree nodes); one entry each.
        `before_layer` may raise to abandon the work between layers (background materialization)."""
        rest = [i for ids in pieces for i in ids]
        total = sum(r.num_tokens for r in runs) + len(rest)
        cache = self.runner.new_cache(total)
        start = write_runs(self.runner, cache, runs)
        self.runner.forward(torch.tensor(rest, dtype=torch.long), start, cache, before_layer=before_layer)
        out = []
        for ids, key in zip(pieces, keys):
            out.append(extract(self.runner, cache, key, torch.tensor(list(ids), dtype=torch.long), start,
                               self.fingerprint))
            start += len(ids)
        return out
