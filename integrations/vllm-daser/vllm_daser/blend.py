"""Selective recompute (CacheBlend, r>0) inside vLLM's worker, with vLLM's own weights.

Experimental; off unless `DASER_VLLM_BLEND=1` is set in vLLM's environment. Then the plugin
registers `DaserLlamaForCausalLM` for the `LlamaForCausalLM` architecture (vLLM's
`ModelRegistry.register_model`, a supported override; no source patch). The subclass changes
nothing in the forward pass: it only makes the served model reachable from the connector's
worker half in the same process.

After the worker has loaded a request's context (exact prefix + re-positioned chunks) and
before vLLM's forward pass computes the question, `repair()` runs daser's fusion on the paged
cache: every non-exact context token goes through the layers up to the check layer, the top-r
share by value deviation from the loaded KV is kept there, and only those continue through the
remaining layers; their fresh K/V overwrite the loaded entries in the request's blocks. Then
vLLM computes the question over the repaired cache as usual. Attention here is torch SDPA over
the context gathered from the paged cache (vLLM's attention kernels only take the scheduled
batch), so this costs more than it would inside vLLM's kernels.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import torch

_MODEL: weakref.ReferenceType[Any] | None = None


def enabled() -> bool:
    return os.environ.get("DASER_VLLM_BLEND", "0") not in ("", "0", "false", "no")


def served_model() -> Any | None:
    return _MODEL() if _MODEL is not None else None


def register_model_class() -> None:
    from vllm import ModelRegistry

    # "LlamaModel": what vLLM resolves a config without `architectures` (model_type llama) to
    for arch in ("LlamaForCausalLM", "LlamaModel"):
        ModelRegistry.register_model(arch, "vllm_daser.blend:DaserLlamaForCausalLM")


def _model_class() -> type:
    from vllm.model_executor.models.llama import LlamaForCausalLM

    class DaserLlamaForCausalLM(LlamaForCausalLM):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            global _MODEL
            _MODEL = weakref.ref(self)

    return DaserLlamaForCausalLM


def __getattr__(name: str) -> Any:  # the class is built lazily: importing vllm_daser needs no vLLM
    if name == "DaserLlamaForCausalLM":
        cls = _model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def num_selected(n_candidates: int, ratio: float) -> int:
    if n_candidates <= 0 or ratio <= 0:
        return 0
    return min(n_candidates, max(1, math.ceil(ratio * n_candidates)))


def chunk_head_positions(exact_len: int, ctx_len: int, n_sel: int, chunk_starts: list[int]) -> torch.Tensor:
    """Prompt positions of the first tokens of every re-positioned chunk, `n_sel` in all: the
    very choice daser's own `chunk_heads` selector makes (the same function decides)."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.selectors import Signals, select

    n_cand = ctx_len - exact_len
    starts = sorted({max(0, s - exact_len) for s in chunk_starts if s < ctx_len} | {0})
    return select(BlendConfig(selector="chunk_heads"), Signals(n_cand, chunk_starts=starts), n_sel) + exact_len


@torch.inference_mode()
def repair(model: Any, layout: Any, layer_modules: list[Any], caches: list[torch.Tensor], block_ids: list[int],
           token_ids: list[int], exact_len: int, ctx_len: int, ratio: float, check_layer: int,
           loaded: tuple[torch.Tensor, torch.Tensor, int] | None = None, *, selector: str = "deviation",
           chunk_starts: list[int] | None = None) -> int:
    """Recompute the top-`ratio` share of context tokens [exact_len, ctx_len) in place.

    `selector` "deviation": every candidate through layers 0..check_layer, the top share by value
    deviation carries on (CacheBlend). "chunk_heads": the first tokens of every re-positioned
    chunk (`chunk_starts`, prompt positions) from layer 0, no check pass: cheaper, and on the
    held-out grid at least as faithful per share (docs/benchmarks.md).

    `caches[i]`/`layer_modules[i]`: layer i's paged KV tensor and vLLM Attention module.
    `loaded`: (K, V [layers, kv_heads, tokens, dim], first position) as the worker just wrote
    them (tokens [first, ctx_len)); only [0, first) is read back from the paged cache.
    Returns how many tokens were recomputed after the check layer.
    """
    from vllm_daser.layout import slots_for

    lm = model.model
    n_cand = ctx_len - exact_len
    n_sel = num_selected(n_cand, ratio)
    if n_sel == 0:
        return 0
    dev = next(lm.parameters()).device
    if selector == "chunk_heads":
        active = chunk_head_positions(exact_len, ctx_len, n_sel, list(chunk_starts or [])).to(dev)
        check_layer = len(lm.layers)  # chosen up front: no check pass, no filtering
    elif selector == "deviation":
        active = torch.arange(exact_len, ctx_len, device=dev)
    else:
        raise ValueError(f"unknown in-engine selector {selector!r}")
    ids = torch.as_tensor(token_ids, device=dev)[active]
    h = lm.embed_tokens(ids)
    residual = None
    all_pos = torch.arange(ctx_len, device=dev)
    bias: torch.Tensor | None = None  # additive causal mask of the active rows (rebuilt when they shrink)
    for i, layer in enumerate(lm.layers):
        if residual is None:
            residual = h
            x = layer.input_layernorm(h)
        else:
            x, residual = layer.input_layernorm(h, residual)
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(active, q, k)
        hk, d = attn.num_kv_heads, attn.head_dim
        k3 = k.reshape(-1, hk, d).transpose(0, 1)
        v3 = v.reshape(-1, hk, d).transpose(0, 1)
        if loaded is not None:
            # the context as the worker just wrote it; only what it did not write (a local
            # prefix-cache hit, typically the system prompt) is read back from the paged cache
            first = loaded[2]
            K, V = loaded[0][i], loaded[1][i]
            if first > 0:
                Kp, Vp = layout.read(caches[i], block_ids, 0, first)
                K, V = torch.cat([Kp.to(K.dtype), K], dim=1), torch.cat([Vp.to(V.dtype), V], dim=1)
            else:
                K, V = K.clone(), V.clone()
        else:
            K, V = layout.read(caches[i], block_ids, 0, ctx_len)  # [kv_heads, ctx_len, head_dim]
        K, V = K.to(dev, k3.dtype), V.to(dev, v3.dtype)
        if i == check_layer and n_sel < active.shape[0]:
            score = ((v3.float() - V[:, active].float()) ** 2).sum(dim=(0, 2))
            keep = torch.topk(score, n_sel).indices.sort().values
            active, q, k3, v3, residual = active[keep], q[keep], k3[:, keep], v3[:, keep], residual[keep]
            bias = None
        K[:, active] = k3
        V[:, active] = v3
        hq = attn.num_heads
        if bias is None:
            # additive causal mask, built once per active set (SDPA's CPU math path spends as long
            # on mask handling as on the attention itself, so attention is spelled out here)
            bias = torch.zeros(active.shape[0], ctx_len, dtype=q.dtype, device=dev)
            bias.masked_fill_(all_pos[None, :] > active[:, None], float("-inf"))
            bias = bias.repeat(hq // hk, 1)
        # grouped-query attention as [kv_heads, group * n, d] x [kv_heads, ctx, d]: no K/V copies
        n = active.shape[0]
        q4 = q.reshape(n, hk, hq // hk, d).permute(1, 2, 0, 3).reshape(hk, (hq // hk) * n, d)
        scores = torch.baddbmm(bias.expand(hk, -1, -1), q4, K.transpose(1, 2), alpha=attn.scaling)
        o = torch.bmm(torch.softmax(scores, dim=-1), V)
        o = o.reshape(hk, hq // hk, n, d).permute(2, 0, 1, 3).reshape(n, hq * d)
        h, _ = attn.o_proj(o)
        slots = slots_for(block_ids, 0, ctx_len, layout.block_size)[active.cpu()]
        layout.write(layer_modules[i], caches[i], k3.transpose(0, 1), v3.transpose(0, 1), slots)
        h, residual = layer.post_attention_layernorm(h, residual)
        h = layer.mlp(h)
    return int(active.shape[0])
