"""What a request tells the connector: which store entries make up its prompt's KV.

A plan is an ordered list of segments `(key, num_tokens[, save_key])` that tile the start of
the prompt: segment i covers the tokens right after segment i-1. The entry under `key` holds
those tokens' KV; the connector moves it to the segment's place in the prompt, re-rotating
the keys when the entry was computed at other positions (a chunk computed once after the
system prefix, reused anywhere: full reuse, r=0). The longest run of stored segments is
loaded as vLLM's external prefix hit; vLLM computes the rest.

`save_key` says where vLLM's own computation of the segment may be stored: the key of KV
computed *in exactly this context* (a prefix-tree node hashes the whole path above it). It
defaults to `key` (an exact plan: every entry is exact in place). When a segment is loaded
from an entry that is not its save key (re-positioned KV, approximate), nothing computed
after it is exact, so the connector saves nothing past it. A `null` save key: never saved.
It travels in
`SamplingParams.extra_args["kv_transfer_params"]["daser"]` (with `vllm serve`: the request
body's `kv_transfer_params`), so it works for any prompt vLLM sees, without the connector
having to guess chunk boundaries inside plain token ids.

Requests without a plan fall back to fixed-size blocks keyed by a chained hash of all tokens
up to the block end (a persistent, cross-process prefix cache for plain prompts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daser_rag.control.wire import (  # noqa: F401 - OFF_PARAMS and plan_params re-exported; written in the core
    OFF_PARAMS,
    PLAN_FIELD,
    engine_signals,
    in_engine_selectors,
    plan_params,
)


@dataclass(frozen=True)
class Segment:
    key: str
    num_tokens: int
    save_key: str | None = None  # where vLLM's computation of these tokens may be stored
    exact: bool = True  # loading `key` here gives exact KV (key == save_key)


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    save: bool = True  # False for blended KV: what vLLM computes on top of it is not exact
    doc_ids: tuple[str, ...] = ()
    recompute: tuple[float, int, str] | None = None  # (ratio, check layer, selector): in-engine recompute
    prefetch_id: str | None = None  # the prefetch message that pinned this request's entries (prefetch.py)
    scales: tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]] | None = None
    """A calibration's (key, value) factors [layers][kv_heads] for re-positioned segments."""
    bias: tuple[tuple[int, int, int], bytes, bytes] | None = None
    """A calibration's (shape [layers, kv_heads, head_dim], key bias, value bias) as float32
    little-endian bytes, added after the scales (the key bias rotated to each token's position)."""
    token_map: str | None = None
    """The digest of a calibration with a token map, published in the store directory
    (daser_rag/calibration/storage.py `publish`); applied before the scales."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)


ENGINE_SIGNALS = engine_signals()
"""What the connector's worker can gather inside vLLM (see `daser_rag.control.wire.engine_signals`)."""

IN_ENGINE_SELECTORS = in_engine_selectors()
"""Selectors the worker can run inside vLLM: a live view of daser's selector registry
(daser_rag/blend/registry.py), every selector that needs only `ENGINE_SIGNALS`. Today
"deviation" (ranked at the check layer, CacheBlend), "chunk_heads" and "random" (chosen up
front, no check pass)."""


CONTROL_FIELDS = ("prefetch", "release", "stats")
"""A daser field with one of these is a control message to the connector (prefetch.py), not a plan."""


@dataclass(frozen=True)
class Control:
    """A control message: pin and load `keys` for request `prefetch` (a prefetch message), end the
    pin of request `release`, and/or answer with the connector's stats (`stats`)."""

    prefetch: str | None = None
    keys: tuple[str, ...] = ()
    ttl_s: float | None = None
    release: str | None = None
    stats: bool = False


def parse_control(kv_transfer_params: Mapping[str, Any] | None) -> Control | None:
    """The control message a request carries, None when it carries none. Raises PlanError on a
    malformed one (the connector then ignores it, loudly)."""
    raw = (kv_transfer_params or {}).get(PLAN_FIELD)
    if not isinstance(raw, Mapping) or not any(k in raw for k in CONTROL_FIELDS):
        return None
    pf, rel = raw.get("prefetch"), raw.get("release")
    out = Control(stats=bool(raw.get("stats", False)))
    if rel is not None:
        if not isinstance(rel, str) or not rel:
            raise PlanError(f"bad 'release' {rel!r}: expected a request id")
        out = Control(release=rel, stats=out.stats)
    if pf is not None:
        if not isinstance(pf, Mapping) or not isinstance(pf.get("id"), str) or not pf["id"]:
            raise PlanError(f"bad 'prefetch' {pf!r}: expected {{'id': str, 'keys': [store key, ...], 'ttl_s': s}}")
        keys = pf.get("keys")
        if not isinstance(keys, Sequence) or isinstance(keys, (str, bytes)) or not all(_is_key(k) for k in keys):
            raise PlanError(f"bad prefetch keys {keys!r}: expected a list of store keys")
        ttl = pf.get("ttl_s")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise PlanError(f"bad prefetch ttl_s {ttl!r}: expected seconds > 0")
        out = Control(pf["id"], tuple(keys), None if ttl is None else float(ttl), out.release, out.stats)
    return out


class PlanError(ValueError):
    """A request carried a daser plan that cannot be used (the message says why)."""


def parse_plan(kv_transfer_params: Mapping[str, Any] | None, prompt_len: int) -> Plan | None:
    """The request's plan, None when it has none. Raises PlanError on a malformed one."""
    if not kv_transfer_params or PLAN_FIELD not in kv_transfer_params:
        return None
    raw = kv_transfer_params[PLAN_FIELD]
    if not isinstance(raw, Mapping):
        raise PlanError(f"kv_transfer_params[{PLAN_FIELD!r}] must be an object, got {type(raw).__name__}")
    if raw.get("off") or any(k in raw for k in CONTROL_FIELDS):
        return Plan((), save=False)  # neither loads nor saves: bypassed, or a control message
    segs = raw.get("segments")
    if not isinstance(segs, Sequence) or isinstance(segs, (str, bytes)) or not segs:
        raise PlanError("a daser plan needs a non-empty 'segments' list of [key, num_tokens]")
    out = []
    for s in segs:
        if not (isinstance(s, Sequence) and len(s) in (2, 3) and _is_key(s[0])
                and isinstance(s[1], int) and not isinstance(s[1], bool) and s[1] > 0
                and (len(s) == 2 or s[2] is None or _is_key(s[2]))):
            raise PlanError(f"bad plan segment {s!r}: expected [store key, positive token count(, save key|null)]")
        save_key = s[0] if len(s) == 2 else s[2]
        out.append(Segment(s[0], s[1], save_key, save_key == s[0]))
    rc = raw.get("recompute")
    recompute = None
    if rc is not None:
        ratio, layer, sel = ((rc.get("ratio"), rc.get("check_layer", 1), rc.get("selector", "deviation"))
                             if isinstance(rc, Mapping) else (None, None, None))
        if (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0
                or not isinstance(layer, int) or isinstance(layer, bool) or layer < 0
                or sel not in IN_ENGINE_SELECTORS):
            raise PlanError(f"bad 'recompute' {rc!r}: expected {{'ratio': 0..1, 'check_layer': int >= 0, "
                            f"'selector': one of {IN_ENGINE_SELECTORS}}}")
        recompute = (float(ratio), layer, sel) if ratio > 0 else None
    pid = raw.get("prefetch_id")
    if pid is not None and (not isinstance(pid, str) or not pid or len(pid) > 200):
        raise PlanError(f"bad 'prefetch_id' {pid!r}: expected a non-empty string")
    tm = raw.get("token_map")
    if tm is not None and not (isinstance(tm, str) and len(tm) == 32 and all(c in "0123456789abcdef" for c in tm)):
        raise PlanError(f"bad 'token_map' {tm!r}: expected a calibration digest (32 hex digits)")
    plan = Plan(tuple(out), bool(raw.get("save", True)), tuple(str(d) for d in raw.get("doc_ids", ())), recompute,
                pid, _parse_scales(raw.get("scales")), _parse_bias(raw.get("bias")), tm)
    if plan.token_map is not None and plan.scales is None:
        raise PlanError("bad 'token_map': it comes with the calibration's 'scales'")
    if plan.bias is not None and (plan.scales is None or plan.bias[0][:2] != (len(plan.scales[0]),
                                                                                 len(plan.scales[0][0]))):
        raise PlanError("bad 'bias': it comes with 'scales' of the same [layers][kv_heads] shape")
    if plan.num_tokens > prompt_len:
        raise PlanError(f"plan covers {plan.num_tokens} tokens but the prompt has only {prompt_len}")
    return plan


def _parse_scales(raw: Any) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]] | None:
    """{"k": [[f, ...] per layer], "v": [...]} with the same rectangular shape, finite and > 0."""
    if raw is None:
        return None
    import math

    def table(rows: Any) -> tuple[tuple[float, ...], ...]:
        if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or not rows:
            raise PlanError(f"bad 'scales' {raw!r}: expected {{'k': [[factor per KV head] per layer], 'v': ...}}")
        out = []
        for row in rows:
            if (not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or not row
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                               for x in row)):
                raise PlanError(f"bad 'scales' row {row!r}: expected finite factors > 0")
            out.append(tuple(float(x) for x in row))
        if len({len(r) for r in out}) != 1:
            raise PlanError("bad 'scales': every layer needs the same number of KV heads")
        return tuple(out)

    if not isinstance(raw, Mapping):
        raise PlanError(f"bad 'scales' {raw!r}: expected an object with 'k' and 'v'")
    k, v = table(raw.get("k")), table(raw.get("v"))
    if len(k) != len(v) or len(k[0]) != len(v[0]):
        raise PlanError("bad 'scales': 'k' and 'v' must have the same [layers][kv_heads] shape")
    return k, v


_MAX_BIAS_VALUES = 1 << 22
"""4M numbers (16 MB of float32 per tensor): well past any model's layers x kv_heads x head_dim."""


def _parse_bias(raw: Any) -> tuple[tuple[int, int, int], bytes, bytes] | None:
    """{"shape": [layers, kv_heads, head_dim], "k": base64 float32, "v": base64 float32}, finite."""
    if raw is None:
        return None
    import base64
    import binascii
    import math
    import struct

    want = "{'shape': [layers, kv_heads, head_dim], 'k': base64 float32, 'v': base64 float32}"
    shape = raw.get("shape") if isinstance(raw, Mapping) else None
    if (not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
            or shape[0] * shape[1] * shape[2] > _MAX_BIAS_VALUES):
        raise PlanError(f"bad 'bias': expected {want}, got shape {shape!r}")
    n = shape[0] * shape[1] * shape[2]
    out = []
    for name in ("k", "v"):
        text = raw.get(name)
        try:
            blob = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            blob = None
        if blob is None or len(blob) != 4 * n:
            raise PlanError(f"bad 'bias' {name!r}: expected base64 of {n} float32 numbers ({want})")
        if not all(math.isfinite(x) for x in struct.unpack(f"<{n}f", blob)):
            raise PlanError(f"bad 'bias' {name!r}: holds non-finite numbers")
        out.append(blob)
    return (shape[0], shape[1], shape[2]), out[0], out[1]


def _is_key(k: Any) -> bool:
    if not isinstance(k, str) or not k:
        return False
    if "/" in k or "\\" in k or k.startswith(".") or len(k) > 200:
        raise PlanError(f"bad store key {k!r} in plan")
    return True


def block_chain_segments(namespace: str, token_ids: Sequence[int], block_size: int) -> list[Segment]:
    """One segment per full block; key i depends on every token of blocks 0..i."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-vllm-block-v1\0" + namespace.encode() + b"\0")
    out = []
    for b in range(len(token_ids) // block_size):
        blk = token_ids[b * block_size:(b + 1) * block_size]
        h.update(b"".join(int(t).to_bytes(4, "little") for t in blk))
        key = "b" + h.copy().hexdigest()
        out.append(Segment(key, block_size, key))
    return out


def save_limit(segments: Sequence[Segment], loaded: int) -> int:
    """How many leading segments may be saved when the first `loaded` ones were loaded.

    After a segment loaded from a re-positioned (approximate) entry, nothing vLLM computes is
    the exact KV of its path any more, so saving stops there.
    """
    for i, s in enumerate(segments[:loaded]):
        if not s.exact:
            return i
    return len(segments)


def stored_run(segments: Sequence[Segment], contains: Any, limit: int) -> tuple[int, int]:
    """(number of leading stored segments, tokens they cover) with the covered span <= limit.

    A segment that would cross `limit` still counts: the connector loads only its first part.
    """
    n = end = 0
    for s in segments:
        if end >= limit or not contains(s.key):
            break
        n += 1
        end += s.num_tokens
    return n, min(end, limit)
