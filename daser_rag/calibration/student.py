"""The reuse path, differentiable in the calibration's parameters (the model stays frozen).

Same arithmetic as `fuse` with a calibration: the stored (re-rotated) context KV, its reused
positions placed by the calibration (`adapter.place_kv`: the token map when there is one, then
scaled per layer and KV head, biases added), then [link tokens | question | answer] run through the
model over it with LayerRunner's own blocks. Only the tail is computed at r = 0, so a step
costs about a forward and backward over ~20-60 tokens, not over the whole prompt. Fitted at
r > 0, the example's selected context tokens are recomputed with the tail from layer 0, over
the scaled stale KV, their fresh K/V replacing the stale ones layer by layer (what
`fuse`'s repair pass does): the scales are fitted for stale KV that sits next to repaired KV.
"""

from __future__ import annotations

import torch

from daser_rag.calibration.adapter import place_kv
from daser_rag.calibration.examples import ReuseExample
from daser_rag.model.runner import LayerRunner


def student_logits(runner: LayerRunner, ex: ReuseExample, key_log_scale: torch.Tensor,
                   value_log_scale: torch.Tensor, link: torch.Tensor, n_last: int,
                   key_bias: torch.Tensor | None = None, value_bias: torch.Tensor | None = None,
                   kv_map: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n_last, vocab] at the last `n_last` tail positions (link tokens excluded);
    `kv_map`: a token map (fixed, fitted by regression) applied before the scales and biases."""
    c = ex.context_tokens
    k_link = int(link.shape[0])
    h = runner.embed(ex.tail_ids)
    if k_link:
        h = torch.cat([link.to(h.dtype), h])
    t = int(h.shape[0])
    positions = torch.arange(c, c + t, device=runner.device)
    sel = ex.selected.to(runner.device) if ex.selected is not None and ex.recomputed else None
    if sel is not None:
        assert ex.context_ids is not None, "an example with selected positions carries its context ids"
        h = torch.cat([runner.embed(ex.context_ids.to(runner.device)[sel]), h])
        positions = torch.cat([sel, positions])
    n_sel = 0 if sel is None else int(sel.shape[0])
    cos, sin = runner.rope(positions)
    needs_rope = key_bias is not None or kv_map is not None
    ctx_cos, ctx_sin = runner.rope(torch.arange(c, device=runner.device)) if needs_rope else (None, None)
    mask = runner.mask_for(positions, c + t)
    reused = ex.reused.to(runner.device).view(1, -1, 1)
    for i in range(runner.spec.num_layers):
        _, q, k, v = runner.qkv(i, h, cos, sin)
        k_pl, v_pl = place_kv(ex.keys[i], ex.values[i], key_log_scale[i].exp(), value_log_scale[i].exp(),
                              None if key_bias is None else key_bias[i], None if value_bias is None else value_bias[i],
                              ctx_cos, ctx_sin, None if kv_map is None else kv_map[i].detach())
        k_ctx, v_ctx = torch.where(reused, k_pl, ex.keys[i]), torch.where(reused, v_pl, ex.values[i])
        if sel is not None:  # the repaired tokens' fresh K/V replace their stale ones
            k_ctx = k_ctx.index_copy(1, sel, k[:, :n_sel])
            v_ctx = v_ctx.index_copy(1, sel, v[:, :n_sel])
        k_all = torch.cat([k_ctx, k[:, n_sel:]], dim=1)
        v_all = torch.cat([v_ctx, v[:, n_sel:]], dim=1)
        h = runner.attend_and_mlp(i, h, q, k_all, v_all, mask)
    return runner.logits(h[-n_last:])


def kl_loss(teacher_logp: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    p_log = teacher_logp.float()
    q_log = torch.log_softmax(student.float(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def example_kl(runner: LayerRunner, ex: ReuseExample, key_log_scale: torch.Tensor, value_log_scale: torch.Tensor,
               link: torch.Tensor, key_bias: torch.Tensor | None = None,
               value_bias: torch.Tensor | None = None, kv_map: torch.Tensor | None = None) -> torch.Tensor:
    n = int(ex.teacher_logp.shape[0])
    return kl_loss(ex.teacher_logp, student_logits(runner, ex, key_log_scale, value_log_scale, link, n,
                                                   key_bias, value_bias, kv_map))
