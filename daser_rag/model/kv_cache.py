"""A preallocated per-layer KV buffer indexed by absolute position.

Index == position, so blending can write fresh KV for an arbitrary subset of positions
and decoding can append without re-allocating per token.
"""

from __future__ import annotations

import torch


class PositionalKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        self.keys = [torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # number of valid positions [0, length)

    def ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, int(self.capacity * 1.5) + 16)
        for i in range(len(self.keys)):
            for buf in (self.keys, self.values):
                old = buf[i]
                grown = torch.zeros(old.shape[0], new_cap, old.shape[2], dtype=old.dtype, device=old.device)
                grown[:, : self.capacity] = old
                buf[i] = grown
        self.capacity = new_cap

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a contiguous run of positions [start, start+T)."""
        t = k.shape[-2]
        self.keys[layer][:, start : start + t] = k
        self.values[layer][:, start : start + t] = v

    def write_at(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys[layer][:, positions] = k
        self.values[layer][:, positions] = v

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :length], self.values[layer][:, :length]
