"""The token map: a per-token correction of stale KV, fitted by regression on full prefill's KV.

Scales and biases correct what every stale token shares. What is left is token-specific (what
each token would have drawn from the chunks before it), and a good part of it is predictable
from the token's own stored key and value: per layer and KV head, an affine map

    [k; v]  ->  [k; v] + W0 + W^T [k; v]      (keys before RoPE, W0 [2D], W [2D, 2D])

fitted in closed form (ridge) on *every* reused token of the training prompts against full
prefill's K/V: thousands of rows of supervision per prompt instead of a KL on a few answer
tokens, so 1.5M numbers do not overfit 16 prompts (held-out r = 0 KL on the Language
Reference 0.202 -> 0.065, against 0.093 for scales + biases fitted by KL;
`benchmarks/probes/kv_regression.py`). Features of the preceding chunks (their mean K/V, an
attention read of them) were measured to add nothing.

`TokenMapStats` accumulates the normal equations while the teacher runs (calibration's
`prepare`), `solve` turns them into the map tensor `[layers, kv_heads, 1 + 2D, 2D]` (row 0
is W0), `apply` / `invert` place and un-place one layer's K/V. Keys arrive rotated to their
positions in the prompt; the map acts on them un-rotated and rotates them back, so the
correction does not depend on where a chunk lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daser_rag.model.rope import apply_rope


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys [H, T, D] before RoPE from keys rotated by the tables cos/sin [T, D] (exact inverse
    of `apply_rope`, also for tables that carry an attention scaling factor: cos^2 + sin^2 is
    that factor squared, the same for every entry)."""
    out = apply_rope(k, cos, -sin)
    scale2 = float(cos[0, 0] * cos[0, 0] + sin[0, 0] * sin[0, 0]) if cos.numel() else 1.0
    return out if abs(scale2 - 1.0) < 1e-6 else out / scale2


def _features(k_pre: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[H, T, 1 + 2D]: a constant, the key before RoPE, the value (what the regression sees)."""
    one = torch.ones(*k_pre.shape[:-1], 1, dtype=k_pre.dtype, device=k_pre.device)
    return torch.cat([one, k_pre, v], -1)


def apply(layer_map: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K/V [H, T, D] (keys rotated by cos/sin [T, D]) corrected by `layer_map`
    [H, 1 + 2D, 2D]. RoPE is linear, so the key's correction is rotated and added to the
    stored key (one rotation fewer than rotating the corrected key back)."""
    d = int(k.shape[-1])
    w = layer_map.to(dtype=k.dtype, device=k.device)
    z = torch.cat([unrotate(k, cos, sin), v], -1)
    delta = torch.baddbmm(w[:, :1, :], z, w[:, 1:, :])  # W0 + [k; v] W, one fused call per layer
    return k + apply_rope(delta[..., :d], cos, sin), v + delta[..., d:]


def inverse_matrices(kv_map: torch.Tensor) -> torch.Tensor:
    """(I + W)^-1 per layer and KV head [L, H, 2D, 2D], what `invert` needs (float64 solve)."""
    w = kv_map[:, :, 1:, :].double()
    eye = torch.eye(int(w.shape[-1]), dtype=torch.float64)
    inverse: torch.Tensor = torch.linalg.inv(eye + w)
    return inverse.float()


def invert(layer_map: torch.Tensor, layer_inverse: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply` undone: the stored K/V from corrected ones (selection ranks by staleness)."""
    d = int(k.shape[-1])
    z = torch.cat([unrotate(k, cos, sin), v], -1) - layer_map[:, :1, :].to(dtype=k.dtype, device=k.device)
    z = z @ layer_inverse.to(dtype=k.dtype, device=k.device)
    return apply_rope(z[..., :d], cos, sin), z[..., d:]


@dataclass
class TokenMapStats:
    """Normal equations of the per-layer, per-head regression, accumulated in float64:
    `xtx` [L, H, F, F], `xty` [L, H, F, 2D] (F = 1 + 2D), over `rows` reused tokens."""

    xtx: torch.Tensor
    xty: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int) -> TokenMapStats:
        f = 1 + 2 * head_dim
        return cls(torch.zeros(layers, kv_heads, f, f, dtype=torch.float64),
                   torch.zeros(layers, kv_heads, f, 2 * head_dim, dtype=torch.float64))

    @torch.inference_mode()
    def add(self, layer: int, stale_k: torch.Tensor, stale_v: torch.Tensor, full_k: torch.Tensor,
            full_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """One layer of one prompt: the reused tokens' stale K/V and full prefill's, [H, R, D]
        each (keys rotated by cos/sin [R, D])."""
        k_pre = unrotate(stale_k.float(), cos, sin)
        x = _features(k_pre, stale_v.float()).double()
        y = torch.cat([unrotate(full_k.float(), cos, sin) - k_pre, full_v.float() - stale_v.float()], -1).double()
        self.xtx[layer] += x.transpose(1, 2) @ x
        self.xty[layer] += x.transpose(1, 2) @ y
        if layer == 0:
            self.rows += int(x.shape[1])

    def solve(self, ridge: float) -> torch.Tensor:
        """The map [L, H, F, 2D]: ridge regression, the penalty `ridge` times the mean feature
        energy of each layer and head (the constant is not penalised). Cholesky: the system is
        symmetric positive definite (a batched LU in MKL fails at this size)."""
        if self.rows == 0:
            raise ValueError("no reused tokens were seen: nothing to fit a token map on")
        f = int(self.xtx.shape[-1])
        scale = self.xtx.diagonal(dim1=-2, dim2=-1)[..., 1:].mean(-1).clamp(min=1e-12)
        reg = torch.eye(f, dtype=torch.float64) * ridge
        reg[0, 0] = 1e-9
        chol = torch.linalg.cholesky((self.xtx + reg * scale[..., None, None]).contiguous())
        return torch.cholesky_solve(self.xty.contiguous(), chol).float()
