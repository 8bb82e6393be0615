"""Layer-by-layer forward over HF Llama-family weights with explicit positions and masks.

transformers' forward hides the per-layer loop behind a cache object that assumes contiguous
prefixes. Blending needs to (a) stop after a check layer, (b) continue with only a subset of
tokens at arbitrary positions, and (c) attend against a KV buffer filled from storage. So we
reuse the HF modules (projections, norms, MLP) but own the loop, in the spirit of gpt-fast.
Batch size is 1: a request is one sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from daser_rag.model.kv_cache import PositionalKVCache
from daser_rag.model.loader import LoadedModel
from daser_rag.model.rope import apply_rope, rope_cos_sin


class LayerRunner:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.spec = lm.spec
        hf = lm.hf_model
        self.body: Any = hf.model
        self.layers = list(self.body.layers)
        self.lm_head = hf.lm_head
        rot = self.body.rotary_emb
        self.inv_freq: torch.Tensor = rot.inv_freq.detach().to(torch.float32)
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.device = lm.device
        self.dtype = lm.dtype
        self.n_heads = self.spec.num_heads
        self.n_kv = self.spec.num_kv_heads
        self.head_dim = self.spec.head_dim
        self.scale = self.head_dim ** -0.5
        window = getattr(hf.config, "sliding_window", None)
        use_window = getattr(hf.config, "use_sliding_window", True)
        self.max_positions = self.spec.max_positions
        if window and use_window and window < self.max_positions:
            # We attend over the full context; capping the window keeps that exact.
            self.max_positions = int(window)
        self.vocab_size = int(self.body.embed_tokens.num_embeddings)
        self._link: torch.Tensor | None = None  # rows for ids >= vocab_size (with_link_embeddings)

    # -- building blocks ---------------------------------------------------------------
    def new_cache(self, capacity: int) -> PositionalKVCache:
        return PositionalKVCache(
            self.spec.num_layers, self.n_kv, self.head_dim, capacity, dtype=self.dtype, device=self.device
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self._link is None:
            out: torch.Tensor = self.body.embed_tokens(ids)
            return out
        extra = ids >= self.vocab_size
        out = self.body.embed_tokens(ids.clamp(max=self.vocab_size - 1))
        if bool(extra.any()):
            out = out.clone()
            out[extra] = self._link[ids[extra] - self.vocab_size].to(out.dtype)
        return out

    def with_link_embeddings(self, link: torch.Tensor) -> LayerRunner:
        """A shallow copy (same weights) whose ids vocab_size + j embed as `link[j]`: learned link
        tokens (daser_rag/calibration) ride through every pass as ordinary ids."""
        other = copy.copy(self)
        other._link = link.detach().to(device=self.device, dtype=self.dtype)
        return other

    def link_ids(self, k: int) -> torch.Tensor:
        """The ids `with_link_embeddings` maps to its k link embeddings."""
        return torch.arange(self.vocab_size, self.vocab_size + k, device=self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions.to(self.device), self.inv_freq.to(self.device), self.rope_scaling, self.dtype)

    def qkv(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (normed input, q [H,T,D], k [kvH,T,D], v [kvH,T,D]) with RoPE applied to q and k."""
        blk = self.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        t = x.shape[0]
        q = attn.q_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(t, -1, self.head_dim).transpose(0, 1)
        q_norm = getattr(attn, "q_norm", None)
        if q_norm is not None:  # Qwen3
            q = q_norm(q)
            k = attn.k_norm(k)
        return x, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=None if mask is None else mask.unsqueeze(0).unsqueeze(0),
            is_causal=causal and mask is None, scale=self.scale, enable_gqa=self.n_heads != self.n_kv,
        )[0]

    def finish_layer(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP: everything after attention in a decoder block."""
        blk = self.layers[layer]
        t = attn_out.shape[1]
        h = h + blk.self_attn.o_proj(attn_out.transpose(0, 1).reshape(t, -1))
        out: torch.Tensor = h + blk.mlp(blk.post_attention_layernorm(h))
        return out

    def attend_and_mlp(
        self,
        layer: int,
        h: torch.Tensor,
        q: torch.Tensor,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        return self.finish_layer(layer, h, self._sdpa(q, k_all, v_all, mask, causal))

    def plan_attention(self, positions: torch.Tensor, groups: int = 4, min_group: int = 64) -> list[tuple[slice, int, torch.Tensor]]:
        """Split sorted query positions into groups that each attend only to keys they can see.

        An explicit mask makes the CPU kernel visit every key; a query at position p only
        needs keys [0, p]. Grouping queries by position and cutting each group's key range
        at its last position skips most of the masked-out work (about 1/3 of attention for
        tokens spread over the context). The plan is built once and reused by every layer.
        """
        t = int(positions.shape[0])
        n = max(1, min(groups, t // min_group))
        bounds = [round(i * t / n) for i in range(n + 1)]
        plan = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos = positions[a:b]
            kv_len = int(pos[-1]) + 1
            plan.append((slice(a, b), kv_len, self.mask_for(pos, kv_len)))
        return plan

    def attend_planned(self, layer: int, h: torch.Tensor, q: torch.Tensor, k_all: torch.Tensor,
                       v_all: torch.Tensor, plan: list[tuple[slice, int, torch.Tensor]]) -> torch.Tensor:
        outs = [self._sdpa(q[:, sl], k_all[:, :kv_len], v_all[:, :kv_len], mask) for sl, kv_len, mask in plan]
        return self.finish_layer(layer, h, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.body.norm(h))
        return out.float()

    @staticmethod
    def mask_for(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Boolean mask [T, kv_len]: a query at position p sees keys at positions <= p."""
        return torch.arange(kv_len, device=positions.device)[None, :] <= positions[:, None]

    # -- whole passes --------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        start: int,
        cache: PositionalKVCache,
        *,
        all_logits: bool = False,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run a contiguous run of tokens at positions [start, start+T) against `cache`.

        The cache must already hold positions [0, start). Used for full prefill, for the
        exact prefix, for chunk precompute and for decode steps.
        """
        t = ids.shape[0]
        end = start + t
        cache.ensure(end)
        positions = torch.arange(start, end, device=self.device)
        cos, sin = self.rope(positions)
        h = self.embed(ids)
        mask = None if start == 0 else (self.mask_for(positions, end) if t > 1 else None)
        for i in range(self.spec.num_layers):
            if before_layer is not None:
                before_layer(i)
            _, q, k, v = self.qkv(i, h, cos, sin)
            cache.write(i, start, k, v)
            k_all, v_all = cache.view(i, end)
            h = self.attend_and_mlp(i, h, q, k_all, v_all, mask, causal=(start == 0 and t > 1))
        cache.length = max(cache.length, end)
        return self.logits(h if all_logits else h[-1:])
