"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seeded generator.

Numerically safe for every temperature `GenerationParams` accepts (any finite number >= 0):

* temperatures below `MIN_TEMPERATURE` (1e-5) decode greedily. That is their limit anyway (as
  T -> 0 sampling concentrates on the argmax), and dividing float32 logits by 1e-40 or 1e-300
  overflows to inf (1e-300 even rounds to 0.0 in float32), whose softmax is NaN;
* logits are shifted so their maximum is 0 before dividing, so a large logit over a small
  temperature gives a very negative number (or -inf, probability 0), never +inf;
* temperatures above `MAX_TEMPERATURE` (1e4) sample as 1e4 does: already uniform over the
  candidates for any real logits, while 1e39 would round to inf in float32 (and -inf / inf is
  NaN for a masked logit).
"""

from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-5
"""Positive temperatures below this decode greedily (see the module docstring)."""
MAX_TEMPERATURE = 1e4
"""Larger temperatures are clamped to this (see the module docstring)."""


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    logits = logits.reshape(-1).float()
    if not temperature >= MIN_TEMPERATURE:  # 0, tiny, or NaN: the greedy limit
        return int(torch.argmax(logits))
    top = logits.max()
    if not torch.isfinite(top):  # an overflowed (+inf) or empty (all -inf / NaN) row: nothing to sample
        return int(torch.argmax(logits))
    logits = (logits - top) / min(float(temperature), MAX_TEMPERATURE)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
