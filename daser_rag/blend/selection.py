"""Which tokens to recompute: CacheBlend's high-KV-deviation (HKVD) selection.

At the check layer every candidate token's K/V is computed fresh (cheap: one layer) and
compared with the reused K/V. Tokens whose reused KV deviates most are the ones whose
missing cross-attention matters; only they are carried through the remaining layers.
"""

from __future__ import annotations

import math

import torch


def num_selected(num_candidates: int, ratio: float) -> int:
    if num_candidates <= 0 or ratio <= 0:
        return 0
    return min(num_candidates, math.ceil(ratio * num_candidates))


def kv_deviation(k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """Per-token squared L2 deviation of K and V, summed over heads: [kvH, T, D] -> [T]."""
    import os
    mode = os.environ.get("DASER_DEV", "kv")
    dk = (k_new.float() - k_old.float()).pow(2).sum(dim=(0, 2))
    dv = (v_new.float() - v_old.float()).pow(2).sum(dim=(0, 2))
    if mode == "k":
        return dk
    if mode == "v":
        return dv
    if mode == "rel":
        return dk / k_old.float().pow(2).sum(dim=(0, 2)).clamp_min(1e-6) + dv / v_old.float().pow(2).sum(dim=(0, 2)).clamp_min(1e-6)
    return dk + dv


def select_top(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest deviations, in ascending (position) order."""
    if k >= deviation.shape[0]:
        return torch.arange(deviation.shape[0], device=deviation.device)
    return torch.topk(deviation, k, sorted=False).indices.sort().values
