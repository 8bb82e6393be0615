"""Which context tokens to recompute: signals in, a sorted index set out.

A selector sees per-candidate signals gathered during fusion (the question's attention over
the re-positioned stored KV, the K/V deviation at the check layer) and returns candidate
indices. Candidates are the non-exact context tokens, indexed from 0; the question's own
tokens are always computed fresh and never count against the budget.

What each selector needs and how it scores lives in its registry entry
(`daser_rag/blend/registry.py`); this module holds what every selector shares: the budget,
the forced chunk heads, the per-chunk ranking and the top-k.
"""

from __future__ import annotations

import itertools
import math

import torch

from daser_rag.blend.config import DEVIATION_METRICS, BlendConfig
from daser_rag.blend.registry import Signals, auto_share, get_selector

__all__ = ["Signals", "auto_share", "kv_deviation", "num_selected", "score", "select", "top_k_sorted"]


def num_selected(num_candidates: int, ratio: float) -> int:
    if num_candidates <= 0 or ratio <= 0:
        return 0
    return min(num_candidates, math.ceil(ratio * num_candidates))


def kv_deviation(
    k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, metric: str = "v"
) -> torch.Tensor:
    """Per-token squared L2 deviation summed over heads: [kvH, T, D] -> [T] (CacheBlend's HKVD)."""
    if metric not in DEVIATION_METRICS:
        raise ValueError(f"unknown deviation metric {metric!r}; choose one of {DEVIATION_METRICS}")
    out = torch.zeros(k_new.shape[1], dtype=torch.float32, device=k_new.device)
    if "k" in metric:
        out += (k_new.float() - k_old.float()).pow(2).sum(dim=(0, 2))
    if "v" in metric:
        out += (v_new.float() - v_old.float()).pow(2).sum(dim=(0, 2))
    return out


def top_k_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending (position) order."""
    if k >= score.shape[0]:
        return torch.arange(score.shape[0], device=score.device)
    return torch.topk(score, k, sorted=False).indices.sort().values


def score(config: BlendConfig, signals: Signals) -> torch.Tensor:
    """The ranking score of each candidate under `config.selector` (its registry entry decides)."""
    return get_selector(config.selector).score(signals, config)


def _within_chunk_rank(s: torch.Tensor, chunk_starts: list[int]) -> torch.Tensor:
    """Each candidate's score replaced by minus its rank fraction inside its chunk (0 = the
    chunk's best), so a global top-k takes about the same share of every chunk."""
    n = int(s.shape[0])
    bounds = sorted({0, *[b for b in chunk_starts if 0 < b < n]}) + [n]
    out = torch.empty(n, dtype=torch.float32)
    for lo, hi in itertools.pairwise(bounds):
        order = torch.argsort(s[lo:hi], descending=True)
        rank = torch.empty(hi - lo, dtype=torch.float32)
        rank[order] = torch.arange(hi - lo, dtype=torch.float32)
        out[lo:hi] = -(rank + 0.5) / (hi - lo)
    return out


def select(config: BlendConfig, signals: Signals, n_sel: int) -> torch.Tensor:
    """`n_sel` candidate indices (sorted); chunk heads are forced in and count against the budget."""
    n = signals.num_candidates
    if n_sel <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    s = score(config, signals).clone().cpu().float()
    if config.budget == "per_chunk":
        s = _within_chunk_rank(s, signals.chunk_starts)
    if config.chunk_heads > 0:
        boost = float(s.max() - s.min()) + 1.0  # lifts every head above every other candidate
        for start in signals.chunk_starts:
            s[start: min(n, start + config.chunk_heads)] += boost
    return top_k_sorted(s, min(n_sel, n))
