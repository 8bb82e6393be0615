"""ChunkKV: the stored attention state of one chunk, and the positions it was computed at."""

from __future__ import annotations

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
