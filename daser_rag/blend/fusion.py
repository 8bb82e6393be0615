"""Assemble a prompt's KV from stored pieces and repair it.

Layout of the fused sequence: [exact run | reused chunks ... | fresh question]. The exact run
(system prefix, plus whatever chunks were computed in exactly this context) needs no repair.
Reused chunks get their keys re-rotated to their new positions. Then a share of the non-exact
tokens is recomputed (`blend/selectors.py` decides which):

* query-aware selection runs the question once over the re-positioned stored KV (a look-ahead:
  about the cost of the question itself), ranks context tokens by the attention the question
  gives them, and recomputes the chosen ones from layer 0 with the question;
* deviation selection (CacheBlend) recomputes every candidate up to the check layer, keeps the
  tokens whose K/V deviate most there, and carries only those on.

r = 0 is full reuse; r = 1 recomputes every non-exact token in every layer: full prefill.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from daser_rag.blend.config import BlendConfig
from daser_rag.blend.selectors import Signals, kv_deviation, num_selected, select
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.model.kv_cache import PositionalKVCache
from daser_rag.model.rope import rerotate_keys
from daser_rag.model.runner import LayerRunner

if TYPE_CHECKING:
    from daser_rag.calibration.adapter import Calibration

__all__ = ["BlendConfig", "FusionResult", "full_prefill", "fuse"]


@dataclass
class FusionResult:
    cache: PositionalKVCache
    logits: torch.Tensor  # [1, vocab] for the last query token
    context_tokens: int
    exact_tokens: int
    reused_tokens: int  # non-exact context tokens whose stored KV was kept
    recomputed_tokens: int  # non-exact context tokens recomputed
    query_tokens: int
    selector: str = "none"
    target_share: float = 0.0  # the share asked for (the auto budget's choice when "auto")
    calibrated: bool = False  # a calibration (daser_rag/calibration) acted on reused KV
    link_tokens: int = 0  # learned link tokens placed before the question (counted in query_tokens,
    # so context_tokens + query_tokens is still the buffer's length)
    recomputed_positions: torch.Tensor | None = None
    """Sorted context positions whose K/V were recomputed (None: none were). Calibration fitted
    at r > 0 replays exactly this selection in its differentiable student."""

    @property
    def recompute_share(self) -> float:
        cand = self.reused_tokens + self.recomputed_tokens
        return self.recomputed_tokens / cand if cand else 0.0


class _LayerFiller:
    """Writes one layer of every stored segment into the buffer, re-rotating keys on the way.

    Segments from a `LayerLoader` (with `ready_layer`) were decoded and re-rotated in the
    background while the previous layer computed; plain `ChunkKV`s are re-rotated here, all
    layers at once on first use. Each layer is written once. With a calibration, the K/V of
    segments at or past `exact_len` (reused, stale) are placed by it as they are written
    (token map, scales, biases: `Calibration.place`); exact runs are written as they are.
    Segments in `mapped` were stored with the token map applied and get the rest.
    """

    def __init__(self, runner: LayerRunner, segments: Sequence[ChunkKV], calibration: Calibration | None = None,
                 exact_len: int = 0, mapped: AbstractSet[int] = frozenset()) -> None:
        self.runner = runner
        self.calibration = calibration
        self.exact_len = exact_len
        self.mapped = mapped
        self.cache: PositionalKVCache | None = None
        self.placements: list[tuple[ChunkKV, int]] = []
        offset = 0
        for seg in segments:
            self.placements.append((seg, offset))
            offset += seg.num_tokens
        self.length = offset
        self._rotated: dict[int, torch.Tensor] = {}
        self._done: set[int] = set()
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int) -> None:
        if layer in self._done:
            return
        self._done.add(layer)
        assert self.cache is not None
        dev, dt = self.runner.device, self.runner.dtype
        for i, (seg, offset) in enumerate(self.placements):
            ready = getattr(seg, "ready_layer", None)
            if ready is not None:
                k, v = ready(layer, offset)
            else:
                if offset != seg.start_pos and i not in self._rotated:
                    keys = seg.keys.to(device=dev, dtype=torch.float32)
                    self._rotated[i] = rerotate_keys(keys, offset - seg.start_pos, self.runner.inv_freq).to(dt)
                k = self._rotated[i][layer] if i in self._rotated else seg.keys[layer].to(device=dev, dtype=dt)
                v = seg.values[layer].to(device=dev, dtype=dt)
            if self.calibration is not None and offset >= self.exact_len:
                mapped = i in self.mapped
                k, v = self.calibration.place(layer, k, v, *self.rope(offset, seg.num_tokens, mapped), mapped=mapped)
            self.cache.write(layer, offset, k, v)

    def rope(self, start: int, n: int, mapped: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """RoPE tables of positions [start, start + n) (what a key bias is rotated by and a token
        map un-rotates by; None when placing needs neither, e.g. premapped K/V without a key
        bias); cached per placement, shared by every layer."""
        if self.calibration is None or not self.calibration.needs_rope_for(mapped=mapped):
            return None, None
        if (start, n) not in self._tables:
            self._tables[(start, n)] = self.runner.rope(torch.arange(start, start + n, device=self.runner.device))
        return self._tables[(start, n)]

    def fill_all(self) -> None:
        for i in range(self.runner.spec.num_layers):
            self(i)


def _chunk_starts(segments: Sequence[ChunkKV], exact_len: int) -> list[int]:
    starts, offset = [], 0
    for seg in segments:
        if offset >= exact_len:
            starts.append(offset - exact_len)
        offset += seg.num_tokens
    return starts


def _grouped_attention(runner: LayerRunner, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The question's attention with its probabilities: ([H, Tq, L] probs, [H, Tq, D] output).

    Query heads that share a KV head are stacked along the query axis, so GQA needs no copy
    of the keys or values.
    """
    h, tq, d = q.shape
    kvh = runner.n_kv
    qg = q.float().reshape(kvh, (h // kvh) * tq, d)
    scores = torch.matmul(qg, k_all.float().transpose(1, 2)) * runner.scale  # [kvH, rep*Tq, L]
    scores = scores.view(kvh, h // kvh, tq, -1).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.view(kvh, (h // kvh) * tq, -1), v_all.float()).view(h, tq, d)
    return probs.view(h, tq, -1), out.to(v_all.dtype)


def _relevance(probs: torch.Tensor, exact_len: int, ctx_len: int, config: BlendConfig) -> torch.Tensor:
    """Collapse [H, Tq, L] attention into one relevance score per candidate context token."""
    ctx = probs[:, :, exact_len:ctx_len]
    if config.query_tokens:
        ctx = ctx[:, -config.query_tokens:]
    if config.query_norm == "row":
        ctx = ctx / ctx.sum(-1, keepdim=True).clamp_min(1e-12)
    per_head = ctx.mean(1)  # [H, n]
    return per_head.max(0).values if config.query_heads == "max" else per_head.mean(0)


def _lookahead(runner: LayerRunner, cache: PositionalKVCache, query_ids: torch.Tensor, ctx_len: int,
               exact_len: int, config: BlendConfig,
               need_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run the question over the stored (re-positioned) KV; return its logits and relevance.

    The logits are exactly the r = 0 answer, so a zero budget costs nothing extra. Without
    `need_logits` (the budget is known to be > 0) the pass stops after the last of
    `query_layers`: the layers above it add nothing to the signal, and the recompute pass
    rewrites the question's K/V at every layer anyway. Logits are then None.
    """
    n_layers = runner.spec.num_layers
    layers = set(range(n_layers) if config.query_layers is None else config.query_layers)
    depth = n_layers if need_logits or not layers else min(n_layers, max(layers) + 1)
    q_len = int(query_ids.shape[0])
    total = ctx_len + q_len
    positions = torch.arange(ctx_len, total, device=runner.device)
    cos, sin = runner.rope(positions)
    mask = runner.mask_for(positions, total)
    h = runner.embed(query_ids)
    relevance = torch.zeros(ctx_len - exact_len, dtype=torch.float32, device=runner.device)
    for i in range(depth):
        _, q, k, v = runner.qkv(i, h, cos, sin)
        cache.write(i, ctx_len, k, v)
        k_all, v_all = cache.view(i, total)
        if i in layers:
            probs, out = _grouped_attention(runner, q, k_all, v_all, mask)
            relevance += _relevance(probs, exact_len, ctx_len, config)
            h = runner.finish_layer(i, h, out)
        else:
            h = runner.attend_and_mlp(i, h, q, k_all, v_all, mask)
    return (runner.logits(h[-1:]) if depth == n_layers else None), relevance / max(1, len(layers))


def _recompute_selected(runner: LayerRunner, cache: PositionalKVCache, filler: _LayerFiller,
                        ids: torch.Tensor, active: torch.Tensor, total: int) -> torch.Tensor:
    """Recompute `active` positions (selected context + question) from layer 0 on; last logits."""
    h = runner.embed(ids[active])
    cos, sin = runner.rope(active)
    plan = runner.plan_attention(active)
    for i in range(runner.spec.num_layers):
        filler(i)
        _, q, k, v = runner.qkv(i, h, cos, sin)
        cache.write_at(i, active, k, v)
        k_all, v_all = cache.view(i, total)
        h = runner.attend_planned(i, h, q, k_all, v_all, plan)
    return runner.logits(h[-1:])


def _recompute_from_check(runner: LayerRunner, cache: PositionalKVCache, filler: _LayerFiller,
                          ids: torch.Tensor, exact_len: int, ctx_len: int, total: int, n_sel: int,
                          signals: Signals, config: BlendConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """CacheBlend: every candidate through the check layer, then only the selected ones.
    Returns the last logits and the context positions carried to the last layer.

    With `config.funnel` f > 1 the filter has two stages (CacheBlend's gradual filtering):
    f x n_sel candidates survive the check layer, and the deviation one layer later narrows
    them to n_sel.
    """
    dev = runner.device
    n_cand = ctx_len - exact_len
    active = torch.arange(exact_len, total, device=dev)
    h = runner.embed(ids[active])
    cos, sin = runner.rope(active)
    plan = runner.plan_attention(active)
    n_layers = runner.spec.num_layers
    check = min(config.check_layer, n_layers - 1)
    stages = {check: n_sel}
    if config.funnel > 1.0 and check + 1 < n_layers:
        n_first = min(n_cand, math.ceil(config.funnel * n_sel))
        if n_first > n_sel:
            stages = {check: n_first, check + 1: n_sel}
    subset = torch.arange(n_cand, device=dev)  # candidate indices still active
    for i in range(n_layers):
        filler(i)
        _, q, k, v = runner.qkv(i, h, cos, sin)
        n_cur = int(subset.shape[0])
        if i in stages and stages[i] < n_cur:
            k_old, v_old = cache.view(i, ctx_len)
            pos = active[:n_cur]
            k_old, v_old = k_old[:, pos], v_old[:, pos]
            if filler.calibration is not None:  # rank by staleness, not by what the calibration did
                tables = runner.rope(pos) if filler.calibration.needs_rope else (None, None)
                k_old, v_old = filler.calibration.unplace(i, k_old, v_old, *tables)
            deviation = kv_deviation(k[:, :n_cur], v[:, :n_cur], k_old, v_old, config.deviation)
            # Every active token went through all layers below, so its K/V here are exact: keep
            # them all (free), then carry on with the selected tokens only.
            cache.write_at(i, active, k, v)
            if n_cur == n_cand:
                signals.deviation = deviation
                chosen = select(config, signals, stages[i]).to(dev)
            else:
                sub = Signals(n_cur, None if signals.relevance is None else signals.relevance[subset],
                              deviation, sorted({int(torch.searchsorted(subset.cpu(), b)) for b in signals.chunk_starts}
                                                - {n_cur}))
                chosen = select(config, sub, stages[i]).to(dev)
            subset = subset[chosen]
            keep = torch.cat([chosen, torch.arange(n_cur, active.shape[0], device=dev)])
            active, h, cos, sin = active[keep], h[keep], cos[keep], sin[keep]
            plan = runner.plan_attention(active)
            q, k, v = q[:, keep], k[:, keep], v[:, keep]
        cache.write_at(i, active, k, v)
        k_all, v_all = cache.view(i, total)
        h = runner.attend_planned(i, h, q, k_all, v_all, plan)
    return runner.logits(h[-1:]), active[active < ctx_len]


_DEFAULT_CONFIG = BlendConfig()
"""`fuse`'s default (BlendConfig is frozen, so one shared instance is safe)."""


@torch.inference_mode()
def full_prefill(runner: LayerRunner, context_ids: torch.Tensor, query_ids: torch.Tensor, capacity: int) -> FusionResult:
    """No reuse: the whole prompt computed from scratch (the reference every mode is held to)."""
    cache = runner.new_cache(capacity)
    logits = runner.forward(torch.cat([context_ids, query_ids]), 0, cache)
    n = int(context_ids.shape[0])
    return FusionResult(cache, logits, n, n, 0, 0, int(query_ids.shape[0]))


@torch.inference_mode()
def fuse(
    runner: LayerRunner,
    segments: Sequence[ChunkKV],
    query_ids: torch.Tensor,
    *,
    exact_len: int,
    config: BlendConfig = _DEFAULT_CONFIG,
    extra_capacity: int = 0,
    calibration: Calibration | None = None,
    mapped: AbstractSet[int] = frozenset(),
) -> FusionResult:
    """Build the KV buffer for `segments` + `query_ids` and return the last-token logits.

    `exact_len`: positions [0, exact_len) hold KV that is already exactly what full prefill
    would produce (the caller guarantees it); they are never candidates for recompute.
    `calibration` (daser_rag/calibration): scales the reused KV and places its link tokens
    before the question; it is not used when nothing is reused (no candidates, or a fixed
    share that recomputes every candidate: r = 1 stays exactly full prefill), nor outside the
    regime it was fitted for (`Calibration.applies_to`: fitted at r = 0 -> r = 0 only).
    `mapped`: indices of `segments` stored with `calibration`'s token map already applied
    (`calibration/premap.py`); they are reused segments, so they need that calibration unless
    every reused token is recomputed. With a primer, every reused segment must be one of them.
    """
    ctx_len = sum(seg.num_tokens for seg in segments)
    if int(query_ids.shape[0]) == 0:
        raise ValueError("query must contain at least one token")
    exact_len = min(exact_len, ctx_len)
    n_cand = ctx_len - exact_len
    all_recomputed = n_cand > 0 and not config.is_auto and num_selected(n_cand, float(config.recompute_ratio)) >= n_cand
    if calibration is not None and (n_cand == 0 or all_recomputed or not calibration.applies_to(
            None if config.is_auto else float(config.recompute_ratio))):
        calibration = None  # nothing reused, or a regime it was not fitted for
    if mapped and not all_recomputed and (calibration is None or not calibration.prepares_chunks):
        raise ValueError("segments stored with a token map applied need the calibration with that map, "
                         "and it does not apply to this request")
    if calibration is not None and calibration.primer is not None:
        starts = itertools.accumulate((seg.num_tokens for seg in segments[:-1]), initial=0)
        raw = [i for i, off in enumerate(starts) if off >= exact_len and i not in mapped]
        if raw:
            raise ValueError(f"segments {raw} are reused raw, but this calibration's token map was fitted on chunks "
                             "computed after its primer: read them primed (calibration/premap.py)")
    n_link = calibration.link_tokens if calibration is not None else 0
    query_ids = query_ids.to(runner.device)
    q_len = int(query_ids.shape[0])
    if calibration is not None and n_link:
        runner = runner.with_link_embeddings(calibration.link)
        query_ids = torch.cat([runner.link_ids(n_link), query_ids])
    filler = _LayerFiller(runner, segments, calibration, exact_len, mapped)
    total = ctx_len + n_link + q_len
    cache = runner.new_cache(total + extra_capacity)
    filler.cache = cache

    def result(logits: torch.Tensor, n_sel: int, share: float, positions: torch.Tensor | None = None) -> FusionResult:
        cache.length = total
        return FusionResult(cache, logits, ctx_len, exact_len, n_cand - n_sel, n_sel, n_link + q_len,
                            config.selector if n_sel else "none", share, calibration is not None, n_link,
                            None if positions is None else torch.sort(positions.cpu()).values)

    if n_cand == 0 or (not config.is_auto and num_selected(n_cand, float(config.recompute_ratio)) == 0):
        cache.length = ctx_len
        logits = runner.forward(query_ids, ctx_len, cache, before_layer=filler)
        return result(logits, 0, 0.0)

    # The registry entries of the selector and the budget say which signals to gather; chunk
    # starts are free and always there (per-chunk budgets and forced chunk heads use them too).
    signals = Signals(n_cand, chunk_starts=_chunk_starts(segments, exact_len))
    budget = config.adaptive_budget
    lookahead_logits = None
    if config.needs_query_signal:
        filler.fill_all()
        # logits are needed only if the budget may come out as zero ("auto" with a zero floor)
        need_logits = budget is not None and budget.may_be_zero(config)
        lookahead_logits, signals.relevance = _lookahead(runner, cache, query_ids, ctx_len, exact_len, config,
                                                         need_logits)
    if budget is not None:
        share = budget.share(signals, config)
    else:
        share = float(config.recompute_ratio)
    n_sel = num_selected(n_cand, share)
    if n_sel == 0 and lookahead_logits is not None:
        return result(lookahead_logits, 0, share)

    ctx_ids = torch.cat([seg.token_ids.to(runner.device) for seg in segments])
    ids = torch.cat([ctx_ids, query_ids])
    if config.needs_deviation:  # the selector ranks at the check layer
        logits, chosen = _recompute_from_check(runner, cache, filler, ids, exact_len, ctx_len, total, n_sel, signals,
                                               config)
    else:
        chosen = select(config, signals, n_sel).to(runner.device) + exact_len
        active = torch.cat([chosen, torch.arange(ctx_len, total, device=runner.device)])
        logits = _recompute_selected(runner, cache, filler, ids, active, total)
    return result(logits, n_sel, share, chosen)
