"""Device (GPU) tier: decoded-ready entries kept in accelerator memory.

Without it every request would copy all of its chunks' KV over PCIe (for an 8B model, 128 KB
per token), which costs more than prefill itself on a fast GPU. Same budget and eviction
rules as the host tier; entries are the stored codec's tensors, so decode is a cast on device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from daser_rag.kv.codecs import EncodedKV
from daser_rag.kv.policies import EvictionPolicy
from daser_rag.kv.tiers.host import HostTier


class DeviceTier(HostTier):
    name = "device"

    def __init__(
        self,
        capacity_bytes: int,
        device: Any,
        policy: EvictionPolicy | None = None,
        *,
        is_protected: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(capacity_bytes, policy, is_protected=is_protected)
        self.device = torch.device(device)

    def put(self, enc: EncodedKV) -> None:
        if enc.nbytes > self.capacity_bytes:
            return
        moved = EncodedKV(key=enc.key, codec=enc.codec, start_pos=enc.start_pos,
                          tensors={n: t.to(self.device) for n, t in enc.tensors.items()}, meta=dict(enc.meta))
        super().put(moved)
