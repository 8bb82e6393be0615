"""The calibration's parameters and what they do to a prompt's buffer.

`key_log_scale[l, h]` / `value_log_scale[l, h]` scale the keys / values of reused context
tokens in layer l, KV head h (exp of the stored number, so 0 is "no change"); scaling the keys
is an attention temperature on the context, scaling the values rescales what the context
contributes. `key_bias[l, h]` / `value_bias[l, h]` ([head_dim] each, optional) then shift them:
stale KV is off by a systematic amount a scale cannot express (a chunk computed after the
system prefix alone has not seen the chunks before it). The key bias is added before RoPE, so it
is rotated to each token's position like the key itself (a fixed vector in the rotated frame
would favour some distances over others). `link` holds k embeddings placed between the context
and the question.

Everything but the link tokens is baked into the K/V written to the prompt's buffer, so any
attention kernel reads it (decode steps, vLLM's paged attention) with no change.

`primer` (optional) is the one part that acts when KV is *computed*: token ids that every
reused chunk is computed after (after the system prefix), and that are not placed in the prompt.
A chunk computed after the system prefix alone reads as the first document of a conversation;
computed after some other text, it reads as a later one, which is what it is where it is
reused. The primer's KV is thrown away; the chunk's keys are re-rotated to the stored frame.
Measured at r = 0 on held-out prompts: KL 0.20 -> 0.036 with a 512-token primer, 0.025 with the
token map fitted on primed KV on top (docs/calibration.md). The primed chunk is a second store
entry (`premap.py`), like the token map's, so the raw entry stays exact for the first chunk, the
prefix tree, uncalibrated requests and vLLM.

The digest names the parameters exactly (it is part of the file's checksum and of
`GenerationResult`); `map_digest` names what the stored second entries depend on (the token
map and the primer) and is in their keys, so KV made with and without a primer, or with another
one, never share a key. `chunk_digest` is for an adapter that would change the raw entries
themselves (`daser_rag.kv.keys.chunk_key` keys it in); none does, so it is empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from daser_rag.calibration import token_map
from daser_rag.calibration.config import MAX_PRIMER_TOKENS, MAX_PRIMERS
from daser_rag.model.rope import apply_rope

VERSION = 1


def place_kv(k: torch.Tensor, v: torch.Tensor, key_scale: torch.Tensor | None, value_scale: torch.Tensor | None,
             key_bias: torch.Tensor | None, value_bias: torch.Tensor | None,
             cos: torch.Tensor | None, sin: torch.Tensor | None,
             kv_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reused K/V [kvH, T, D] of one layer as the calibration places them: corrected token by
    token by the token map ([kvH, 1 + 2D, 2D], `token_map.apply`), then scaled by the per-head
    factors ([kvH]), plus the biases ([kvH, D]; the key bias rotated by the tokens' RoPE tables
    cos/sin [T, D], which the map needs too). Differentiable in the scales and biases: the
    student fits through it; fusion and the vLLM connector place stored KV with it."""
    if kv_map is not None:
        assert cos is not None and sin is not None, "a token map needs the tokens' RoPE tables"
        k, v = token_map.apply(kv_map, k, v, cos, sin)
    if key_scale is not None:  # None: factors of 1 (nothing to multiply)
        k = k * key_scale.view(-1, 1, 1)
    if value_scale is not None:
        v = v * value_scale.view(-1, 1, 1)
    if key_bias is not None:
        assert cos is not None and sin is not None, "a key bias needs the tokens' RoPE tables"
        k = k + apply_rope(key_bias.unsqueeze(1).expand(-1, int(cos.shape[0]), -1), cos, sin)
    if value_bias is not None:
        v = v + value_bias.unsqueeze(1)
    return k, v


def unplace_kv(k: torch.Tensor, v: torch.Tensor, key_scale: torch.Tensor | None, value_scale: torch.Tensor | None,
               key_bias: torch.Tensor | None, value_bias: torch.Tensor | None,
               cos: torch.Tensor | None, sin: torch.Tensor | None, kv_map: torch.Tensor | None = None,
               map_inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored K/V back from placed ones (`place_kv` inverted; `map_inverse`:
    `token_map.inverse_matrices` of the map's layer): selection ranks tokens by how stale they
    are, not by what the calibration did to them."""
    if key_bias is not None:
        assert cos is not None and sin is not None, "a key bias needs the tokens' RoPE tables"
        k = k - apply_rope(key_bias.unsqueeze(1).expand(-1, int(cos.shape[0]), -1), cos, sin)
    if value_bias is not None:
        v = v - value_bias.unsqueeze(1)
    if key_scale is not None:
        k = k / key_scale.view(-1, 1, 1)
    if value_scale is not None:
        v = v / value_scale.view(-1, 1, 1)
    if kv_map is not None:
        assert cos is not None and sin is not None and map_inverse is not None, "undoing a token map needs its inverse"
        k, v = token_map.invert(kv_map, map_inverse, k, v, cos, sin)
    return k, v


@dataclass
class Calibration:
    fingerprint: str
    key_log_scale: torch.Tensor  # [layers, kv_heads]
    value_log_scale: torch.Tensor  # [layers, kv_heads]
    link: torch.Tensor  # [k, hidden]; k may be 0
    meta: dict[str, Any] = field(default_factory=dict)
    chunk_side: bool = False
    """True only for adapters whose tensors change stored chunk KV (none are built here yet)."""
    fit_share: float = 0.0
    """The recompute share it was fitted at, which decides where it acts (`applies_to`). Scales
    fitted for full reuse over-correct stale KV that sits beside repaired tokens (held-out grid:
    hybrid r=0.15 KL 0.039 -> 0.044), while scales fitted at r = 0.15 help at r = 0 as well
    (0.116 -> 0.095, as much as an r = 0 fit): docs/calibration.md."""
    key_bias: torch.Tensor | None = None
    """[layers, kv_heads, head_dim], added to reused keys before RoPE (None: none)."""
    value_bias: torch.Tensor | None = None
    """[layers, kv_heads, head_dim] (None: none). Biases enter the digest only when present, so
    a scales-only file keeps the checksum it was written with."""
    kv_map: torch.Tensor | None = None
    """[layers, kv_heads, 1 + 2 head_dim, 2 head_dim]: the token map (`token_map.py`), applied
    before the scales and biases (None: none; in the digest only when present)."""
    primer: torch.Tensor | None = None
    """[P] int64 token ids every reused chunk is computed after, or [K, P]: K primers, the chunk's
    K/V averaged over the K computations (None: none; in the digest only when present). A token map fitted with a primer was fitted on primed KV, so it is only ever
    applied to primed chunks (`prepares_chunks`, fusion checks)."""
    _memo: dict[str, tuple[tuple[Any, ...] | None, Any]] = field(default_factory=dict, init=False, repr=False,
                                                                   compare=False)
    """Values derived from the tensors (digests, the map's inverse), each with the `_state` it
    was computed in: reused only while that state holds (`_memoized`)."""

    @classmethod
    def identity(cls, fingerprint: str, layers: int, kv_heads: int, hidden: int, link_tokens: int = 0,
                 link_init: torch.Tensor | None = None, head_dim: int = 0) -> Calibration:
        """No change at all; `link_init` ([hidden]) seeds every link token's embedding;
        `head_dim` > 0 adds zero biases (to be fitted)."""
        link = torch.zeros(link_tokens, hidden)
        if link_tokens and link_init is not None:
            link = link_init.detach().float().reshape(1, hidden).repeat(link_tokens, 1).clone()
        kb = torch.zeros(layers, kv_heads, head_dim) if head_dim else None
        vb = torch.zeros(layers, kv_heads, head_dim) if head_dim else None
        return cls(fingerprint, torch.zeros(layers, kv_heads), torch.zeros(layers, kv_heads), link,
                   key_bias=kb, value_bias=vb)

    @property
    def has_biases(self) -> bool:
        return self.key_bias is not None or self.value_bias is not None

    @property
    def needs_rope(self) -> bool:
        """Placing needs the tokens' RoPE tables (a key bias is rotated, a token map un-rotates)."""
        return self.key_bias is not None or self.kv_map is not None

    @property
    def link_tokens(self) -> int:
        return int(self.link.shape[0])

    @property
    def prepares_chunks(self) -> bool:
        """Reused chunks are read from a second store entry made for this calibration (primed
        and/or token-mapped, `premap.py`), never placed raw."""
        return self.kv_map is not None or self.primer is not None

    def primer_ids(self) -> list[int]:
        """The one primer's ids (empty without one); a ValueError for an ensemble (`primers`)."""
        rows = self.primers()
        if len(rows) > 1:
            raise ValueError(f"this calibration averages over {len(rows)} primers, not one")
        return rows[0] if rows else []

    def primers(self) -> list[list[int]]:
        """The primers a reused chunk is computed after, its K/V averaged over them: one row for
        a [P] primer, K for a [K, P] ensemble (empty without one)."""
        if self.primer is None:
            return []
        rows = self.primer.tolist()
        return [[int(i) for i in r] for r in (rows if self.primer.dim() == 2 else [rows])]

    def primer_members(self) -> list[Calibration]:
        """One single-primer calibration per primer row (`[self]` for one primer, none without):
        the vLLM control plane computes a chunk after each member (keyed by the member's
        `primer_digest`, so an ensemble shares entries with a one-primer calibration of the same
        row) and stores their mean under this calibration's `primer_digest`."""
        rows = self.primers()
        if len(rows) <= 1:
            return [self] if rows else []
        return [dataclasses.replace(self, primer=torch.tensor(r, dtype=torch.int64), kv_map=None, meta={})
                for r in rows]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"key_log_scale": self.key_log_scale.detach().float().contiguous(),
               "value_log_scale": self.value_log_scale.detach().float().contiguous(),
               "link": self.link.detach().float().contiguous()}
        for name in ("key_bias", "value_bias", "kv_map"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().float().contiguous()
        if self.primer is not None:
            out["primer"] = self.primer.detach().to(torch.int64).contiguous()
        return out

    def _state(self) -> tuple[Any, ...] | None:
        """What the digest and the map's inverse depend on: the fingerprint, the fitted share, each
        tensor object (held, so its id cannot be reused) and its in-place version counter. None
        (nothing is memoized) when a tensor is an inference tensor, which has no version counter."""
        tensors = tuple(getattr(self, n) for n in
                        ("key_log_scale", "value_log_scale", "link", "key_bias", "value_bias", "kv_map", "primer"))
        if any(t is not None and t.is_inference() for t in tensors):
            return None
        return self.fingerprint, self.fit_share, tensors, tuple(None if t is None else t._version for t in tensors)

    def _same_state(self, memo: tuple[Any, ...] | None) -> bool:
        now = self._state()
        return (memo is not None and now is not None and memo[0] == now[0] and memo[1] == now[1]
                and memo[3] == now[3] and all(a is b for a, b in zip(memo[2], now[2])))

    def _memoized(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, reused while no tensor of this calibration changes (`_same_state`)."""
        memo = self._memo.get(name)
        if memo is not None and self._same_state(memo[0]):
            return memo[1]
        value = compute()
        self._memo[name] = (self._state(), value)
        return value

    def digest(self) -> str:
        """blake2b over the version, the fingerprint and every tensor's shape and bytes. Memoized
        while nothing changes: the vLLM planner names a calibration by it on every request, and
        with a token map it hashes 6 MB."""
        def compute() -> str:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"daser-calibration-v{VERSION}\0{self.fingerprint}\0".encode())
            if self.fit_share:  # files fitted at r = 0 keep the digest they always had
                h.update(f"fit_share:{self.fit_share!r}\0".encode())
            for name, t in sorted(self.tensors().items()):
                h.update(f"{name}:{tuple(t.shape)}\0".encode())
                h.update(t.numpy().tobytes())
            return h.hexdigest()

        return str(self._memoized("digest", compute))

    def map_digest(self) -> str:
        """Names the token map and the primer alone (and the model they were fitted for): what
        chunk KV stored primed and/or mapped is keyed by (`calibration/premap.py`), so
        calibrations that share them (refits of the scales) share those entries. Empty without
        either. A map-only calibration keeps the digest it had before primers existed."""
        kv_map, primer = self.kv_map, self.primer
        if kv_map is None and primer is None:
            return ""

        def compute() -> str:
            h = hashlib.blake2b(digest_size=16)
            if kv_map is not None:
                t = kv_map.detach().float().contiguous()
                h.update(f"daser-token-map-v1\0{self.fingerprint}\0{tuple(t.shape)}\0".encode())
                h.update(t.cpu().numpy().tobytes())
            else:
                h.update(f"daser-primed-v1\0{self.fingerprint}\0".encode())
            if primer is not None:
                if primer.dim() == 2:  # an ensemble: its shape too ([2, 256] is not [512] of the same ids)
                    h.update(f"\0primers:{tuple(primer.shape)}".encode())
                h.update(b"\0primer\0" + primer.detach().to(torch.int64).cpu().numpy().astype("<i8").tobytes())
            return h.hexdigest()

        return str(self._memoized("map_digest", compute))

    def primer_digest(self) -> str:
        """Names the primer alone (and the model): what a chunk computed after the primer but not
        token-mapped is keyed by. It is the `map_digest` a primer-only calibration has, so the
        embedded engine (which stores such chunks for a primer-only calibration) and the vLLM
        connector (which stores primed chunks unmapped and maps them as it loads them,
        control/planner.py) share those entries. Empty without a primer."""
        if self.primer is None:
            return ""
        return str(self._memoized("primer_digest",
                                  lambda: dataclasses.replace(self, kv_map=None, meta={}).map_digest()))

    @property
    def chunk_digest(self) -> str:
        """What chunk keys include: empty while the adapter leaves stored chunk KV unchanged."""
        return self.digest() if self.chunk_side else ""

    def _layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                torch.Tensor | None, torch.Tensor | None]:
        """One layer's factors and biases on `like`'s device and dtype; factors of exactly 1 (a map
        fitted alone) are None, so placing premapped KV costs no multiply."""
        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=like.device, dtype=like.dtype)

        unit_k, unit_v = self._memoized("unit_scales", lambda: (
            not bool(self.key_log_scale.detach().any()), not bool(self.value_log_scale.detach().any())))
        return (None if unit_k else to(self.key_log_scale[layer].exp()),
                None if unit_v else to(self.value_log_scale[layer].exp()),
                None if self.key_bias is None else to(self.key_bias[layer]),
                None if self.value_bias is None else to(self.value_bias[layer]))

    def needs_rope_for(self, *, mapped: bool) -> bool:
        """`needs_rope` for K/V stored with the map applied already (then only a key bias needs
        the tables)."""
        return self.key_bias is not None if mapped else self.needs_rope

    def place(self, layer: int, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, mapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's reused K/V [kvH, T, D] as placed in a prompt (`place_kv`); cos/sin: the
        RoPE tables [T, D] of the tokens' positions there (needed when `needs_rope`).
        `mapped`: the K/V were stored with this calibration's token map already applied
        (`premap.py`), so only the scales and biases are left to place."""
        return place_kv(k, v, *self._layer(layer, k), cos, sin,
                        None if self.kv_map is None or mapped else self.kv_map[layer])

    def unplace(self, layer: int, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None = None,
                sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`place` undone: the stored K/V (what selection compares fresh K/V with)."""
        if self.kv_map is None:
            return unplace_kv(k, v, *self._layer(layer, k), cos, sin)
        kv_map = self.kv_map
        inverse = self._memoized("map_inverse", lambda: token_map.inverse_matrices(kv_map))
        return unplace_kv(k, v, *self._layer(layer, k), cos, sin, self.kv_map[layer], inverse[layer])

    def check_shape(self, layers: int, kv_heads: int, hidden: int, head_dim: int | None = None,
                    vocab: int | None = None) -> None:
        """The tensors fit a model of this shape (a mismatching file is an error, not a guess);
        `vocab`: the model's vocabulary size, which primer ids must lie in."""
        want: dict[str, tuple[int, ...]] = {"key_log_scale": (layers, kv_heads), "value_log_scale": (layers, kv_heads)}
        for name in ("key_bias", "value_bias"):
            t = getattr(self, name)
            if t is not None:
                want[name] = (layers, kv_heads, head_dim if head_dim is not None else int(t.shape[-1]))
        if self.kv_map is not None:
            d = head_dim if head_dim is not None else (int(self.kv_map.shape[-1]) // 2)
            want["kv_map"] = (layers, kv_heads, 1 + 2 * d, 2 * d)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"calibration tensor {name} has shape {got}, the model needs {shape}")
        if self.primer is not None:
            p = self.primer
            if (p.dim() not in (1, 2) or p.dtype != torch.int64 or not 1 <= int(p.shape[-1]) <= MAX_PRIMER_TOKENS
                    or (p.dim() == 2 and not 1 <= int(p.shape[0]) <= MAX_PRIMERS)):
                raise ValueError(f"calibration primer must be 1 to {MAX_PRIMER_TOKENS} int64 token ids, or 1 to "
                                 f"{MAX_PRIMERS} rows of them, got {p.dtype} of shape {tuple(p.shape)}")
            if vocab is not None and (int(p.min()) < 0 or int(p.max()) >= vocab):
                raise ValueError(f"calibration primer holds token ids outside this model's vocabulary [0, {vocab})")
        if self.link.dim() != 2 or (self.link_tokens and int(self.link.shape[1]) != hidden):
            raise ValueError(f"calibration link tokens have shape {tuple(self.link.shape)}, the model needs [k, {hidden}]")
        for name, t in self.tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"calibration tensor {name} holds non-finite numbers")

    def factors(self) -> tuple[list[list[float]], list[list[float]]]:
        """(key, value) factors [layers][kv_heads] as plain numbers: what a vLLM plan carries to the
        connector, which scales the re-positioned segments it loads (vllm_daser/connector.py)."""
        return self.key_log_scale.exp().tolist(), self.value_log_scale.exp().tolist()

    def bias_bytes(self) -> tuple[list[int], bytes, bytes] | None:
        """(shape, key bias, value bias) as little-endian float32 bytes, what a vLLM plan carries
        (`daser_rag.control.wire.plan_params(bias=)`); None without biases (a missing one is zeros)."""
        if not self.has_biases:
            return None
        like = self.key_bias if self.key_bias is not None else self.value_bias
        assert like is not None

        def raw(t: torch.Tensor | None) -> bytes:
            t = torch.zeros_like(like) if t is None else t
            return t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()

        return [int(d) for d in like.shape], raw(self.key_bias), raw(self.value_bias)

    def applies_to(self, share: float | None) -> bool:
        """Whether a request recomputing `share` of its reused tokens (None: an adaptive budget,
        share not known before the look-ahead) may use it: an r = 0 fit only where nothing is
        recomputed; an r > 0 fit wherever something is reused (r < 1)."""
        if self.fit_share > 0:
            return share is None or 0.0 <= share < 1.0
        return share == 0.0

    def without_link(self) -> Calibration:
        return dataclasses.replace(self, link=self.link[:0], meta=dict(self.meta))

    def without_scales(self) -> Calibration:
        """Only the link tokens: no scales, biases, token map or primer."""
        return dataclasses.replace(self, key_log_scale=torch.zeros_like(self.key_log_scale),
                                   value_log_scale=torch.zeros_like(self.value_log_scale), key_bias=None,
                                   value_bias=None, kv_map=None, primer=None, meta=dict(self.meta))

    def map_only(self) -> Calibration:
        """Only the token map and the primer: no scales, biases or link tokens (what the KL fit
        starts from)."""
        return dataclasses.replace(self, key_log_scale=torch.zeros_like(self.key_log_scale),
                                   value_log_scale=torch.zeros_like(self.value_log_scale), key_bias=None,
                                   value_bias=None, link=self.link[:0], meta=dict(self.meta))


@dataclass(frozen=True)
class CalibrationSet:
    """An engine's calibrations, at most one per regime (full reuse; a recompute share): each
    request gets the one fitted for its regime, else one that applies to it, else none."""

    members: tuple[Calibration, ...]

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a calibration set holds at least one calibration")
        regimes = [c.fit_share > 0 for c in self.members]
        if len(set(regimes)) != len(regimes):
            raise ValueError("a calibration set holds at most one calibration fitted at r = 0 and one at r > 0, "
                             f"got fit shares {[c.fit_share for c in self.members]}")
        if len({c.fingerprint for c in self.members}) != 1:
            raise ValueError("the calibrations of one engine must be made for the same model")

    @property
    def fingerprint(self) -> str:
        return self.members[0].fingerprint

    def pick(self, share: float | None) -> Calibration | None:
        """The member for a request recomputing `share` (None: an adaptive budget): the one fitted
        for its regime first (r = 0 -> the r = 0 fit), else any that applies, else None."""
        usable = [c for c in self.members if c.applies_to(share)]
        own = [c for c in usable if (c.fit_share > 0) == (share != 0.0)]
        ranked = own or usable
        return ranked[0] if ranked else None

    def describe(self) -> str:
        return ", ".join(f"r={c.fit_share:g}" + (" with biases" if c.has_biases else "")
                         + (" with a token map" if c.kv_map is not None else "")
                         + ("" if c.primer is None else f" with a {int(c.primer.shape[-1])}-token primer"
                            if c.primer.dim() == 1 else f" with {int(c.primer.shape[0])} {int(c.primer.shape[-1])}-token primers")
                         + (f" {c.link_tokens} link tokens" if c.link_tokens else "")
                         for c in self.members)


def calibration_for_request(loaded: CalibrationSet | None, requested: bool | None, share: float | None,
                            ratio: object = None) -> Calibration | None:
    """The calibration a request gets, on either engine: none when it asks for none (False) or
    the engine has none for its regime; `requested=True` without one is an InvalidInputError,
    never a silently uncalibrated answer (a request that reuses nothing, r = 1, is exempt)."""
    from daser_rag.errors import InvalidInputError

    if requested is False:
        return None
    if loaded is None:
        if requested:
            raise InvalidInputError("calibration=true, but this engine has no calibration loaded "
                                    "(run `daser-rag calibrate`, then start it with calibration='auto' or a path)")
        return None
    picked = loaded.pick(share)
    if requested and picked is None and share != 1.0:
        raise InvalidInputError(f"calibration=true, but this engine has no calibration fitted for recompute share "
                                f"{share if ratio is None else ratio} (it has {loaded.describe()}; "
                                "`daser-rag calibrate --fit-share` fits one for r > 0)")
    return picked
