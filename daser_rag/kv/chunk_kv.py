"""ChunkKV: the stored attention state of one chunk, and the positions it was computed at."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ChunkKV:
    """Per-layer K/V of one chunk (post-RoPE keys), shape [layers, kv_heads, tokens, head_dim].

    `start_pos` is the absolute position of the first token when the KV was computed; the
    fusion step re-rotates keys from there to wherever the chunk lands in a prompt.
    """

    key: str
    token_ids: torch.Tensor  # int64 [T]
    start_pos: int
    keys: torch.Tensor
    values: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def mean_kv(runs: Sequence[ChunkKV], key: str | None = None) -> ChunkKV:
    """The mean of several computations of one chunk (the same tokens at the same positions, after
    different predecessors), in float32, in the first run's dtype, named `key` (the first's key
    by default): a primer ensemble's entry (calibration/adapter.py), made by daser's own engine
    and by the vLLM control plane alike. A ValueError if the runs are not of one chunk at one
    place."""
    if not runs:
        raise ValueError("mean_kv needs at least one run")
    first = runs[0]
    for r in runs[1:]:
        same = (r.start_pos == first.start_pos and r.keys.shape == first.keys.shape
                and r.values.shape == first.values.shape and r.token_ids.shape == first.token_ids.shape
                and bool(r.token_ids.eq(first.token_ids).all()))
        if not same:
            raise ValueError(f"cannot average {r.key} with {first.key}: not the same tokens at the same positions "
                             f"(start {r.start_pos} vs {first.start_pos}, shapes {tuple(r.keys.shape)} vs "
                             f"{tuple(first.keys.shape)})")
    if len(runs) == 1:
        return first if key is None else dataclasses.replace(first, key=key)
    keys = torch.stack([r.keys.float() for r in runs]).mean(0).to(first.keys.dtype)
    values = torch.stack([r.values.float() for r in runs]).mean(0).to(first.values.dtype)
    return dataclasses.replace(first, key=first.key if key is None else key, keys=keys, values=values)
