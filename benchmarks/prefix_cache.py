"""Exact prefix caching on our runner: the baseline a serving engine gives you for free.

This mirrors vLLM's automatic prefix caching: KV is kept per full block of `block_size`
tokens, keyed by a hash of *every token up to the end of that block*, so a block is reused
only when the whole prompt before it is identical. A request reuses the longest run of
cached blocks from the start of its prompt and computes everything after it in full; at
least the last prompt token is always computed (its logits are needed). The result is
exact (up to the storage dtype), and in RAG traffic, where the same documents come back
in a different order or after a different first document, it mostly misses: that is the
comparison this baseline exists for.

Blocks are stored in fp16 by default (the same bytes per token as the default chunk codec),
so the "cache bytes" column compares like with like.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from daser_rag.model.kv_cache import PositionalKVCache


class PrefixCache:
    def __init__(self, runner: Any, *, block_size: int = 16, dtype: torch.dtype = torch.float16,
                 capacity_bytes: int = 4 << 30) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.runner = runner
        self.block_size = block_size
        self.dtype = dtype
        self.capacity_bytes = capacity_bytes
        # hash -> (tag, tensor [2, layers, kv_heads, block, head_dim]); LRU order
        self._blocks: OrderedDict[bytes, tuple[str, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    # -- keys ------------------------------------------------------------------------------
    def _chain(self, ids: Sequence[int]) -> list[bytes]:
        """Hash of each full block, chained so a block's hash covers all tokens before it."""
        out: list[bytes] = []
        prev = b"daser-prefix-v1"
        bs = self.block_size
        for start in range(0, len(ids) - bs + 1, bs):
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(array("q", ids[start:start + bs]).tobytes())
            prev = h.digest()
            out.append(prev)
        return out

    # -- queries ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, ids: Sequence[int]) -> int:
        """Number of leading prompt tokens covered by cached blocks (never the last token)."""
        n = 0
        for h in self._chain(ids):
            if h not in self._blocks:
                break
            n += 1
        return min(n * self.block_size, max(len(ids) - 1, 0)) // self.block_size * self.block_size

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], *, extra_capacity: int = 0) -> tuple[PositionalKVCache, torch.Tensor, int]:
        """KV and last-token logits for `ids`: cached blocks copied in, the rest computed.

        Returns (cache, logits [1, vocab], number of prompt tokens served from the cache).
        """
        if not ids:
            raise ValueError("empty prompt")
        runner = self.runner
        hit = self.match(ids)
        cache = runner.new_cache(len(ids) + extra_capacity)
        if hit:
            chain = self._chain(ids[:hit])
            blocks = []
            for h in chain:
                self._blocks.move_to_end(h)
                blocks.append(self._blocks[h][1])
            kv = torch.cat(blocks, dim=3).to(runner.device, runner.dtype)  # [2, L, H, hit, D]
            for i in range(runner.spec.num_layers):
                cache.write(i, 0, kv[0, i], kv[1, i])
            cache.length = hit
        rest = torch.tensor(list(ids[hit:]), dtype=torch.long)
        logits = runner.forward(rest, 0, cache) if hit == 0 else self._forward_after(rest, hit, cache)
        return cache, logits, hit

    def _forward_after(self, ids: torch.Tensor, start: int, cache: PositionalKVCache) -> torch.Tensor:
        """The uncached rest of a prompt, attending to the cached run before it.

        runner.forward would use one explicit [T, start+T] mask here, which makes the CPU
        attention kernel visit every masked-out key (measured: computing 3/4 of a 3000-token
        prompt that way cost as much as all of it). Grouping queries by position, as the blend
        path does, skips most of that, so the baseline is not handicapped by our kernel choice.
        """
        runner = self.runner
        end = start + int(ids.shape[0])
        cache.ensure(end)
        positions = torch.arange(start, end, device=runner.device)
        cos, sin = runner.rope(positions)
        h = runner.embed(ids)
        plan = runner.plan_attention(positions, groups=8)
        for i in range(runner.spec.num_layers):
            _, q, k, v = runner.qkv(i, h, cos, sin)
            cache.write(i, start, k, v)
            k_all, v_all = cache.view(i, end)
            h = runner.attend_planned(i, h, q, k_all, v_all, plan)
        cache.length = max(cache.length, end)
        return runner.logits(h[-1:])

    # -- updates ---------------------------------------------------------------------------
    def insert(self, ids: Sequence[int], cache: PositionalKVCache, *, tag: str = "") -> int:
        """Keep the full blocks of a just-served prompt (what a server does after prefill)."""
        bs = self.block_size
        added = 0
        for j, h in enumerate(self._chain(ids)):
            if h in self._blocks:
                self._blocks.move_to_end(h)
                continue
            s = j * bs
            k = torch.stack([cache.keys[i][:, s:s + bs] for i in range(self.runner.spec.num_layers)])
            v = torch.stack([cache.values[i][:, s:s + bs] for i in range(self.runner.spec.num_layers)])
            block = torch.stack([k, v]).to("cpu", self.dtype).contiguous()
            self._blocks[h] = (tag, block)
            self._bytes += block.numel() * block.element_size()
            added += 1
        self._evict()
        return added

    def insert_kv(self, ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, *, tag: str = "") -> int:
        """Insert precomputed KV ([layers, kv_heads, T, head_dim]) for the prompt `ids`."""
        cache = PositionalKVCache(keys.shape[0], keys.shape[1], keys.shape[3], keys.shape[2],
                                  dtype=keys.dtype, device=keys.device)
        for i in range(keys.shape[0]):
            cache.write(i, 0, keys[i], values[i])
        cache.length = keys.shape[2]
        return self.insert(ids, cache, tag=tag)

    def drop(self, tag: str) -> int:
        """Forget every block inserted with `tag` (resets a trace to its primed state)."""
        gone = [h for h, (t, _) in self._blocks.items() if t == tag]
        for h in gone:
            _, block = self._blocks.pop(h)
            self._bytes -= block.numel() * block.element_size()
        return len(gone)

    def _evict(self) -> None:
        while self._bytes > self.capacity_bytes and self._blocks:
            _, (_, block) = self._blocks.popitem(last=False)
            self._bytes -= block.numel() * block.element_size()
            self.evictions += 1
