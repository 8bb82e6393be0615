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


DEVIATION_METRICS = ("v", "k", "kv")


def kv_deviation(
    k_new: torch.Tensor, v_new: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, metric: str = "v"
) -> torch.Tensor:
    """Per-token squared L2 deviation summed over heads: [kvH, T, D] -> [T].

    metric "v" (values only) is the default: on the Python-reference fidelity set it gave the
    lowest KL to full prefill (0.106 vs 0.119 for K+V and 0.121 for K, r=0.15, 10 prompts).
    """
    if metric not in DEVIATION_METRICS:
        raise ValueError(f"unknown deviation metric {metric!r}; choose one of {DEVIATION_METRICS}")
    out = torch.zeros(k_new.shape[1], dtype=torch.float32, device=k_new.device)
    if "k" in metric:
        out += (k_new.float() - k_old.float()).pow(2).sum(dim=(0, 2))
    if "v" in metric:
        out += (v_new.float() - v_old.float()).pow(2).sum(dim=(0, 2))
    return out


def select_top(deviation: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest deviations, in ascending (position) order."""
    if k >= deviation.shape[0]:
        return torch.arange(deviation.shape[0], device=deviation.device)
    return torch.topk(deviation, k, sorted=False).indices.sort().values
