"""Which context tokens to recompute: signals in, a sorted index set out.

A selector sees per-candidate signals gathered during fusion (the question's attention over
the re-positioned stored KV, the K/V deviation at the check layer) and returns candidate
indices. Candidates are the non-exact context tokens, indexed from 0; the question's own
tokens are always computed fresh and never count against the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from daser_rag.blend.config import DEVIATION_METRICS, BlendConfig


@dataclass
class Signals:
    num_candidates: int
    relevance: torch.Tensor | None = None  # [n] question attention, normalized to sum 1
    deviation: torch.Tensor | None = None  # [n] K/V deviation at the check layer
    chunk_starts: list[int] = field(default_factory=list)  # candidate index of each non-exact chunk's start


def num_selected(num_candidates: int, ratio: float) -> int:
    if num_candidates <= 0 or ratio <= 0:
        return 0
    return min(num_candidates, math.ceil(ratio * num_candidates))


def auto_share(relevance: torch.Tensor, coverage: float, floor: float, cap: float) -> float:
    """Smallest share of candidates whose relevance covers `coverage` of the mass, in [floor, cap].

    Focused questions (attention on a few tokens) get a small budget; diffuse ones a larger one.
    """
    n = int(relevance.shape[0])
    if n == 0:
        return 0.0
    mass = torch.sort(relevance.float(), descending=True).values.cumsum(0)
    total = float(mass[-1])
    if total <= 0:
        return floor
    k = int(torch.searchsorted(mass, torch.tensor(coverage * total, dtype=mass.dtype)).item()) + 1
    return min(cap, max(floor, k / n))


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


def _normalized(x: torch.Tensor) -> torch.Tensor:
    x = x.float().clamp_min(0)
    s = float(x.sum())
    return x / s if s > 0 else torch.full_like(x, 1.0 / max(1, x.shape[0]))


def score(config: BlendConfig, signals: Signals) -> torch.Tensor:
    """The ranking score of each candidate under `config.selector`."""
    sel = config.selector
    if sel == "deviation":
        assert signals.deviation is not None
        return signals.deviation.float()
    if sel == "query":
        assert signals.relevance is not None
        return signals.relevance.float()
    if sel == "hybrid":
        assert signals.relevance is not None and signals.deviation is not None
        # both normalized to distributions; the product favours tokens the question reads
        # AND whose stored KV is wrong (the square root keeps the product's scale comparable)
        return (_normalized(signals.relevance) * _normalized(signals.deviation)).sqrt()
    if sel == "chunk_heads":
        # rank by position within the chunk: every chunk's k-th token before any chunk's (k+1)-th
        pos = torch.arange(signals.num_candidates, dtype=torch.float32)
        starts = torch.zeros(signals.num_candidates, dtype=torch.float32)
        for start in signals.chunk_starts:
            starts[start:] = float(start)
        return -(pos - starts)
    if sel == "random":
        g = torch.Generator().manual_seed(config.seed + signals.num_candidates)
        return torch.rand(signals.num_candidates, generator=g)
    raise ValueError(f"unknown selector {sel!r}")


def _within_chunk_rank(s: torch.Tensor, chunk_starts: list[int]) -> torch.Tensor:
    """Each candidate's score replaced by minus its rank fraction inside its chunk (0 = the
    chunk's best), so a global top-k takes about the same share of every chunk."""
    n = int(s.shape[0])
    bounds = sorted({0, *[b for b in chunk_starts if 0 < b < n]}) + [n]
    out = torch.empty(n, dtype=torch.float32)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
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
