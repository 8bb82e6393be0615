"""Selective recompute (CacheBlend, r>0) inside vLLM's worker, with vLLM's own weights.

Experimental; off unless `DASER_VLLM_BLEND=1` is set in vLLM's environment. Then the plugin
registers `DaserLlamaForCausalLM` for the `LlamaForCausalLM` architecture (vLLM's
`ModelRegistry.register_model`, a supported override; no source patch). The subclass changes
nothing in the forward pass: it only makes the served model reachable from the connector's
worker half in the same process.

After the worker has loaded a request's context (exact prefix + re-positioned chunks) and
before vLLM's forward pass computes the question, `repair()` runs daser's fusion on the paged
cache with vLLM's loaded weights: the selected context tokens go through the layers (CacheBlend
deviation: every candidate up to the check layer, then the top-r share; chunk heads: the first
tokens of every chunk, chosen up front), and each layer's fresh K/V overwrites the loaded
entries in the request's blocks. Their attention runs in vLLM's own CPU paged-attention kernel
straight from those blocks (each contiguous run of selected tokens is one pseudo-request over
the request's block table, causal within the run), so nothing is gathered or masked in torch;
layouts whose kernel daser does not call (CUDA) use torch attention over the loaded K/V.
Then vLLM computes the question over the repaired cache as usual.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from daser_rag.blend.registry import Selector, Signal, Signals, get_selector
from daser_rag.blend.selectors import num_selected  # the budget daser's own fusion takes
from vllm_daser.plan import ENGINE_SIGNALS

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


def engine_selector(name: str) -> Selector:
    """The registry entry of an in-engine selector; ValueError when it needs a signal the worker
    cannot gather (`plan.ENGINE_SIGNALS`)."""
    sel = get_selector(name)
    if not sel.signals <= ENGINE_SIGNALS:
        raise ValueError(f"unknown in-engine selector {name!r}")
    return sel


def _candidate_starts(exact_len: int, ctx_len: int, chunk_starts: list[int]) -> list[int]:
    """Chunk starts (prompt positions) as candidate indices, the first candidate always one."""
    return sorted({max(0, s - exact_len) for s in chunk_starts if s < ctx_len} | {0})


def upfront_positions(selector: str, exact_len: int, ctx_len: int, n_sel: int, chunk_starts: list[int]) -> torch.Tensor:
    """Prompt positions a selector that needs no check pass picks, `n_sel` in all: the very
    choice daser's own fusion makes for it (the same function decides)."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.selectors import select

    n_cand = ctx_len - exact_len
    starts = _candidate_starts(exact_len, ctx_len, chunk_starts)
    return select(BlendConfig(selector=selector), Signals(n_cand, chunk_starts=starts), n_sel) + exact_len


def chunk_head_positions(exact_len: int, ctx_len: int, n_sel: int, chunk_starts: list[int]) -> torch.Tensor:
    """Prompt positions of the first tokens of every re-positioned chunk, `n_sel` in all."""
    return upfront_positions("chunk_heads", exact_len, ctx_len, n_sel, chunk_starts)


def check_layer_keep(selector: Selector, deviation: torch.Tensor, n_sel: int, exact_len: int, ctx_len: int,
                     chunk_starts: list[int]) -> torch.Tensor:
    """Which of the candidates (all active at the check layer) carry on, sorted: the top `n_sel`
    by the selector's registry score of their value `deviation` there (for "deviation" the
    score is the deviation itself: CacheBlend)."""
    from daser_rag.blend.config import BlendConfig

    signals = Signals(int(deviation.shape[0]), deviation=deviation,
                      chunk_starts=_candidate_starts(exact_len, ctx_len, chunk_starts))
    score = selector.score(signals, BlendConfig(selector=selector.name)).to(deviation.device)
    return torch.topk(score, n_sel).indices.sort().values


def _runs(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sorted positions into maximal contiguous runs: (query_start_loc, seq_lens), int32.

    A run [a, b) attends to keys [0, b) with a causal mask over its own rows: exactly what a
    paged-attention kernel computes for a request whose last b - a tokens are scheduled, so every
    run becomes one pseudo-request over the same blocks (chunk heads: one run per chunk)."""
    pos = active.cpu()
    cut = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cut, torch.tensor([pos.numel()])])
    return bounds.to(torch.int32), (pos[bounds[1:] - 1] + 1).to(torch.int32)


class _PagedAttention:
    """The active rows' attention through vLLM's own CPU paged-attention kernel.

    Reads the context straight from the request's blocks (the loaded KV with this layer's fresh
    rows already written), causal within each run, so nothing is gathered or masked in torch."""

    def __init__(self, layout: Any, block_ids: list[int], n_heads: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.layout, self.blocks = layout, torch.as_tensor(block_ids, dtype=torch.int32)
        self.n_heads, self.n_kv, self.head_dim, self.dtype = n_heads, n_kv, head_dim, dtype

    def set_active(self, active: torch.Tensor, layer: Any) -> None:
        from vllm import _custom_ops as ops
        from vllm import envs

        self.qsl, self.seq_lens = _runs(active)
        n_runs = self.seq_lens.numel()
        self.table = self.blocks[None, :].expand(n_runs, -1).contiguous()
        self.sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=n_runs, num_heads=self.n_heads, num_kv_heads=self.n_kv, head_dim=self.head_dim,
            seq_lens=self.seq_lens, dtype=self.dtype, query_start_loc=self.qsl, causal=True,
            sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.layout.cache_dtype)

    def __call__(self, q: torch.Tensor, layer: Any, cache: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops

        n = q.shape[0]
        out = torch.empty(n, self.n_heads, self.head_dim, dtype=q.dtype, device=q.device)
        kc, vc = self.layout.kv_views(cache)
        ops.cpu_attention_with_kv_cache(
            query=q.reshape(n, self.n_heads, self.head_dim), key_cache=kc, value_cache=vc, output=out,
            query_start_loc=self.qsl, seq_lens=self.seq_lens, scale=layer.impl.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.table, softcap=0.0,
            scheduler_metadata=self.sched, s_aux=None, k_scale=getattr(layer, "_k_scale_float", 1.0),
            v_scale=getattr(layer, "_v_scale_float", 1.0), kv_cache_dtype=self.layout.cache_dtype)
        return out.reshape(n, self.n_heads * self.head_dim)


def _torch_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, active: torch.Tensor,
                     bias: torch.Tensor | None, n_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention of the active rows over K, V [kv_heads, ctx, d] (layouts whose
    kernel daser cannot call, e.g. CUDA). Returns (output [n, heads * d], the mask for reuse)."""
    hk, ctx_len, d = K.shape
    n, g = active.shape[0], n_heads // hk
    if bias is None:  # additive causal mask, rebuilt only when the active set changes
        bias = torch.zeros(n, ctx_len, dtype=q.dtype, device=q.device)
        bias.masked_fill_(torch.arange(ctx_len, device=q.device)[None, :] > active[:, None], float("-inf"))
        bias = bias.repeat(g, 1)
    # [kv_heads, group * n, d] x [kv_heads, ctx, d]: no K/V copies per query head
    q4 = q.reshape(n, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * n, d)
    scores = torch.baddbmm(bias.expand(hk, -1, -1), q4, K.transpose(1, 2), alpha=scale)
    o = torch.bmm(torch.softmax(scores, dim=-1), V)
    return o.reshape(hk, g, n, d).permute(2, 0, 1, 3).reshape(n, n_heads * d), bias


@torch.inference_mode()
def repair(model: Any, layout: Any, layer_modules: list[Any], caches: list[torch.Tensor], block_ids: list[int],
           token_ids: list[int], exact_len: int, ctx_len: int, ratio: float, check_layer: int,
           loaded: tuple[torch.Tensor, torch.Tensor, int] | None = None, *, selector: str = "deviation",
           chunk_starts: list[int] | None = None, paged_attention: bool | None = None,
           stored_value: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> int:
    """Recompute the top-`ratio` share of context tokens [exact_len, ctx_len) in place.

    `selector`: a registered selector that needs only `plan.ENGINE_SIGNALS`; its registry entry
    decides. One that needs the deviation ("deviation"): every candidate through layers
    0..check_layer, the top share by its score of the value deviation carries on (CacheBlend).
    Others ("chunk_heads": the first tokens of every re-positioned chunk, `chunk_starts` in
    prompt positions): chosen up front, recomputed from layer 0, no check pass; chunk heads are
    cheaper and on the held-out grid at least as faithful per share (docs/benchmarks.md).

    `caches[i]`/`layer_modules[i]`: layer i's paged KV tensor and vLLM Attention module.
    `loaded`: (K, V [layers, kv_heads, tokens, dim], first position) as the worker just wrote
    them (tokens [first, ctx_len)); the torch attention path updates it in place.
    `paged_attention`: attend through vLLM's CPU paged-attention kernel straight from the
    request's blocks (default where the layout is vLLM's CPU one), else torch attention over
    `loaded` (plus [0, first) read back from the cache).
    `stored_value(layer, rows)`: the stored V of loaded rows [n, kv_heads, d] the worker placed
    with a calibration (the plan's scales and biases undone): the check layer ranks how stale a
    token is, not what the calibration did to it (daser's own fusion does the same).
    Each layer's fresh K/V is written before that layer's attention; the last layer stops there
    (only its K/V is kept, so its attention and MLP would be wasted).
    Returns how many tokens were recomputed after the check layer.
    """
    from vllm_daser.layout import CpuPagedLayout, slots_for

    lm = model.model
    n_cand = ctx_len - exact_len
    n_sel = num_selected(n_cand, ratio)
    if n_sel == 0:
        return 0
    dev = next(lm.parameters()).device
    sel = engine_selector(selector)  # its registry entry says whether it ranks at the check layer
    starts = list(chunk_starts or [])
    if sel.needs(Signal.DEVIATION):
        active = torch.arange(exact_len, ctx_len, device=dev)
    else:
        active = upfront_positions(selector, exact_len, ctx_len, n_sel, starts).to(dev)
        check_layer = len(lm.layers)  # chosen up front: no check pass, no filtering
    if paged_attention is None:
        paged_attention = isinstance(layout, CpuPagedLayout)
    if loaded is None and not paged_attention:
        raise ValueError("torch attention needs the loaded K/V (`loaded`)")
    a0 = lm.layers[0].self_attn
    paged = _PagedAttention(layout, block_ids, a0.num_heads, a0.num_kv_heads, a0.head_dim,
                            next(lm.parameters()).dtype) if paged_attention else None
    all_slots = slots_for(block_ids, 0, ctx_len, layout.block_size)
    ids = torch.as_tensor(token_ids, device=dev)[active]
    h = lm.embed_tokens(ids)
    residual = None
    bias: torch.Tensor | None = None
    stale = True  # the active set changed since the attention set-up
    last = len(lm.layers) - 1
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
        k3, v3 = k.reshape(-1, hk, d), v.reshape(-1, hk, d)  # [n, kv_heads, d]
        if i == check_layer and n_sel < active.shape[0]:
            old_v = _loaded_rows(layout, caches[i], block_ids, loaded, i, active)
            if stored_value is not None:
                old_v = stored_value(i, old_v)
            deviation = ((v3.float() - old_v.float()) ** 2).sum(dim=(1, 2))
            keep = check_layer_keep(sel, deviation, n_sel, exact_len, ctx_len, starts)
            active, q, k3, v3, residual = active[keep], q[keep], k3[keep], v3[keep], residual[keep]
            bias, stale = None, True
        layout.write(layer_modules[i], caches[i], k3, v3, all_slots[active.cpu()])
        if i == last:
            break
        if paged is not None:
            if stale:
                paged.set_active(active, layer_modules[i])
                stale = False
            o = paged(q, layer_modules[i], caches[i])
        else:
            assert loaded is not None
            K, V = _context_kv(layout, caches[i], block_ids, loaded, i)
            K[:, active] = k3.transpose(0, 1).to(K.dtype)
            V[:, active] = v3.transpose(0, 1).to(V.dtype)
            o, bias = _torch_attention(q, K.to(dev, q.dtype), V.to(dev, q.dtype), active, bias,
                                       attn.num_heads, attn.scaling)
        h, _ = attn.o_proj(o)
        h, residual = layer.post_attention_layernorm(h, residual)
        h = layer.mlp(h)
    return int(active.shape[0])


def _context_kv(layout: Any, cache: torch.Tensor, block_ids: list[int],
                loaded: tuple[torch.Tensor, torch.Tensor, int], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i's context K/V [kv_heads, ctx, d] for torch attention: the loaded tensors
    (updated in place, the caller no longer needs them) behind whatever the worker did not
    write (a local prefix-cache hit, typically the system prompt), read back from the cache."""
    first = loaded[2]
    K, V = loaded[0][i], loaded[1][i]
    if first > 0:
        Kp, Vp = layout.read(cache, block_ids, 0, first)
        return torch.cat([Kp.to(K.dtype), K], dim=1), torch.cat([Vp.to(V.dtype), V], dim=1)
    return K, V


def _loaded_rows(layout: Any, cache: torch.Tensor, block_ids: list[int],
                 loaded: tuple[torch.Tensor, torch.Tensor, int] | None, i: int,
                 active: torch.Tensor) -> torch.Tensor:
    """The loaded V of the active rows at layer i ([n, kv_heads, d]), before they are overwritten."""
    if loaded is not None and int(active.min()) >= loaded[2]:
        return loaded[1][i][:, (active - loaded[2]).to(loaded[1].device)].transpose(0, 1)
    end = int(active.max()) + 1
    _, V = layout.read(cache, block_ids, 0, end)
    return V[:, active.cpu()].transpose(0, 1)
