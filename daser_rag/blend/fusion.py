"""Assemble a prompt's KV from stored pieces and repair it (CacheBlend-style).

Layout of the fused sequence: [exact run | reused chunks ... | fresh query]. The exact run
(system prefix, plus whatever chunks were computed in exactly this context) needs no repair.
Reused chunks get their keys re-rotated to their new positions; then, if the recompute ratio
r > 0, all non-exact tokens are recomputed through the layers before the check layer, the
top-r share by KV deviation is selected there, and only those (plus the query) continue.
r = 0 is full reuse; r = 1 recomputes every non-exact token in every layer, which is exactly
full prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from daser_rag.blend.selection import (
    DEVIATION_METRICS,
    kv_deviation,
    num_selected,
    select_top,
)
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.model.kv_cache import PositionalKVCache
from daser_rag.model.rope import rerotate_keys
from daser_rag.model.runner import LayerRunner


@dataclass(frozen=True)
class BlendConfig:
    recompute_ratio: float = 0.15
    check_layer: int = 1
    deviation: str = "v"

    def __post_init__(self) -> None:
        if self.deviation not in DEVIATION_METRICS:
            raise ValueError(f"deviation must be one of {DEVIATION_METRICS}, got {self.deviation!r}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")


@dataclass
class FusionResult:
    cache: PositionalKVCache
    logits: torch.Tensor  # [1, vocab] for the last query token
    context_tokens: int
    exact_tokens: int
    reused_tokens: int  # non-exact context tokens whose stored KV was kept
    recomputed_tokens: int  # non-exact context tokens recomputed after the check layer
    query_tokens: int

    @property
    def recompute_share(self) -> float:
        cand = self.reused_tokens + self.recomputed_tokens
        return self.recomputed_tokens / cand if cand else 0.0


class _LayerFiller:
    """Writes one layer of every stored segment into the buffer, re-rotating keys on the way.

    Called just before the layer is computed. Segments that come from a `LayerLoader`
    (`StreamedSegment`, with `ready_layer`) were decoded and re-rotated in the background
    while the previous layer computed; plain `ChunkKV`s are re-rotated here, all layers at once
    on first use (a handful of kernels per segment rather than a chain per layer).
    """

    def __init__(self, runner: LayerRunner, cache: PositionalKVCache, segments: Sequence[ChunkKV]) -> None:
        self.runner = runner
        self.cache = cache
        self.placements: list[tuple[ChunkKV, int]] = []
        offset = 0
        for seg in segments:
            self.placements.append((seg, offset))
            offset += seg.num_tokens
        self.length = offset
        self._rotated: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int) -> None:
        dev, dt = self.runner.device, self.runner.dtype
        for i, (seg, offset) in enumerate(self.placements):
            ready = getattr(seg, "ready_layer", None)
            if ready is not None:
                k, v = ready(layer, offset)
                self.cache.write(layer, offset, k, v)
                continue
            if offset != seg.start_pos and i not in self._rotated:
                # all layers in one shot: one kernel chain per segment instead of one per layer
                keys = seg.keys.to(device=dev, dtype=torch.float32)
                self._rotated[i] = rerotate_keys(keys, offset - seg.start_pos, self.runner.inv_freq).to(dt)
            k = self._rotated[i][layer] if i in self._rotated else seg.keys[layer].to(device=dev, dtype=dt)
            self.cache.write(layer, offset, k, seg.values[layer].to(device=dev, dtype=dt))


@torch.inference_mode()
def fuse(
    runner: LayerRunner,
    segments: Sequence[ChunkKV],
    query_ids: torch.Tensor,
    *,
    exact_len: int,
    config: BlendConfig = BlendConfig(),
    extra_capacity: int = 0,
) -> FusionResult:
    """Build the KV buffer for `segments` + `query_ids` and return the last-token logits.

    `exact_len`: positions [0, exact_len) hold KV that is already exactly what full prefill
    would produce (the caller guarantees it); they are never candidates for recompute.
    """
    filler = _LayerFiller(runner, runner.new_cache(0), segments)
    ctx_len = filler.length
    q_len = int(query_ids.shape[0])
    if q_len == 0:
        raise ValueError("query must contain at least one token")
    total = ctx_len + q_len
    cache = runner.new_cache(total + extra_capacity)
    filler.cache = cache
    exact_len = min(exact_len, ctx_len)
    n_cand = ctx_len - exact_len
    n_sel = num_selected(n_cand, config.recompute_ratio)
    n_layers = runner.spec.num_layers

    if n_sel == 0 or config.check_layer >= n_layers:
        cache.length = ctx_len
        logits = runner.forward(query_ids, ctx_len, cache, before_layer=filler)
        return FusionResult(cache, logits, ctx_len, exact_len, n_cand, 0, q_len)

    dev = runner.device
    ctx_ids = torch.cat([seg.token_ids.to(dev) for seg in segments])
    all_ids = torch.cat([ctx_ids, query_ids.to(dev)])
    active = torch.arange(exact_len, total, device=dev)
    h = runner.embed(all_ids[active])
    cos, sin = runner.rope(active)
    plan = runner.plan_attention(active)
    selected = n_cand
    for i in range(n_layers):
        filler(i)
        _, q, k, v = runner.qkv(i, h, cos, sin)
        if i == config.check_layer and n_sel < n_cand:
            k_old, v_old = cache.view(i, ctx_len)
            dev_score = kv_deviation(k[:, :n_cand], v[:, :n_cand], k_old[:, exact_len:], v_old[:, exact_len:],
                                     config.deviation)
            keep = torch.cat([select_top(dev_score, n_sel), torch.arange(n_cand, active.shape[0], device=dev)])
            active, h, cos, sin = active[keep], h[keep], cos[keep], sin[keep]
            plan = runner.plan_attention(active)
            q, k, v = q[:, keep], k[:, keep], v[:, keep]
            selected = n_sel
        cache.write_at(i, active, k, v)
        k_all, v_all = cache.view(i, total)
        h = runner.attend_planned(i, h, q, k_all, v_all, plan)
    cache.length = total
    logits = runner.logits(h[-1:])
    return FusionResult(cache, logits, ctx_len, exact_len, n_cand - selected, selected, q_len)
