"""Rotary position embedding helpers, including re-rotation of stored keys.

Keys are cached *after* RoPE. Because RoPE at position p is a rotation R(p) and
R(p') = R(p' - p) R(p), a key stored at p is moved to p' by one more rotation of
(p' - p); no recompute of the key projection is needed, and the result is exact up
to float rounding. Angles for the re-rotation are formed in float64 so the error
stays well below the fp32 rounding of the original RoPE.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim], computed exactly as transformers does (fp32 angles)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin


def rerotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys [..., T, D] by `delta` positions (scalar or per-token [T])."""
    if isinstance(delta, int):
        if delta == 0:
            return keys
        # one shift for every token: a single [1, D] rotation broadcast over the tokens
        d = torch.tensor([float(delta)], dtype=torch.float64, device=keys.device)
    else:
        d = delta.to(device=keys.device, dtype=torch.float64)
    freqs = d[:, None] * inv_freq.to(device=keys.device, dtype=torch.float64)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(keys.dtype)
    sin = emb.sin().to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin
