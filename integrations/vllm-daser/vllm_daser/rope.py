"""The RoPE inverse frequencies of the model vLLM serves, for re-rotating stored keys.

The connector's worker moves a stored chunk's post-RoPE keys to their new positions with
`daser_rag.model.rope.rerotate_keys`, which needs the model's inverse frequencies. They come
from the Hugging Face config vLLM loaded, computed as transformers does. Only rotations
(neox-style, full head dim, attention scaling 1) can be re-applied; anything else raises
ValueError and the connector then serves entries only at the positions they were computed at.
"""

from __future__ import annotations

from typing import Any

import torch


def inv_freq_for(hf_config: Any) -> torch.Tensor:
    cfg = getattr(hf_config, "text_config", None) or hf_config
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial rotary embeddings are not supported")
    if rope_type == "default":
        base = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ValueError(f"unknown rope type {rope_type!r}")
    inv_freq, scaling = fn(cfg, "cpu")
    if abs(float(scaling) - 1.0) > 1e-9:
        raise ValueError(f"rope type {rope_type!r} scales attention ({scaling}); re-rotation would not be exact")
    return inv_freq.to(torch.float32)
