"""KV codecs and the checksummed wire format shared by the disk and remote tiers.

Entries carry their codec name, so a store can hold mixed codecs and readers never guess.
Quantizers follow KIVI's observation: key outliers live in channels (scale per channel),
value outliers in tokens (scale per token).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from daser_rag.errors import CorruptEntryError
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag import settings

MAGIC = b"DASERKV1"
_DIGEST_LEN = 32  # hex chars of blake2b-16

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = settings.CODECS
_FP8_MAX = 448.0


@dataclass
class EncodedKV:
    """A ChunkKV in storage form: named tensors plus metadata (codec, shapes, positions)."""

    key: str
    codec: str
    start_pos: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.tensors.items() if n != "token_ids")


def _q_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale.to(torch.float32)


def _q_fp8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / _FP8_MAX
    return (x / scale).to(torch.float8_e4m3fn), scale.to(torch.float32)


def encode(kv: ChunkKV, codec: str) -> EncodedKV:
    if codec not in CODECS:
        raise ValueError(f"unknown KV codec {codec!r}; choose one of {CODECS}")
    k = kv.keys.detach().to("cpu")
    v = kv.values.detach().to("cpu")
    tensors: dict[str, torch.Tensor] = {"token_ids": kv.token_ids.to("cpu", torch.int64)}
    if codec in _FLOAT_DTYPES:
        tensors["k"] = k.to(_FLOAT_DTYPES[codec]).contiguous()
        tensors["v"] = v.to(_FLOAT_DTYPES[codec]).contiguous()
    else:
        quant = _q_int8 if codec == "int8" else _q_fp8
        kf, vf = k.float(), v.float()
        tensors["k"], tensors["k_scale"] = quant(kf, dim=2)  # per channel (over tokens)
        tensors["v"], tensors["v_scale"] = quant(vf, dim=3)  # per token (over channels)
    return EncodedKV(key=kv.key, codec=codec, start_pos=kv.start_pos, tensors=tensors, meta=dict(kv.meta))


def decode(enc: EncodedKV, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ChunkKV:
    t = enc.tensors
    if enc.codec in _FLOAT_DTYPES:
        k, v = t["k"], t["v"]
    else:
        k = t["k"].to(torch.float32) * t["k_scale"]
        v = t["v"].to(torch.float32) * t["v_scale"]
    return ChunkKV(
        key=enc.key,
        token_ids=t["token_ids"].to(device),
        start_pos=enc.start_pos,
        keys=k.to(device=device, dtype=dtype),
        values=v.to(device=device, dtype=dtype),
        meta=dict(enc.meta),
    )


# -- wire format ------------------------------------------------------------------------
_DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int8: "int8", torch.int64: "int64", torch.float8_e4m3fn: "float8_e4m3fn",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def to_bytes(enc: EncodedKV) -> bytes:
    """MAGIC | digest | u64 header length | header JSON | payload. The digest covers all after it."""
    parts: list[bytes] = []
    spec = []
    offset = 0
    for name, tensor in enc.tensors.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        spec.append({"name": name, "dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                     "offset": offset, "nbytes": len(raw)})
        parts.append(raw)
        offset += len(raw)
    header = json.dumps(
        {"key": enc.key, "codec": enc.codec, "start_pos": enc.start_pos, "tensors": spec, "meta": enc.meta},
        sort_keys=True,
    ).encode()
    body = struct.pack("<Q", len(header)) + header + b"".join(parts)
    digest = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    return MAGIC + digest + body


def from_bytes(blob: bytes | memoryview, expect_key: str | None = None) -> EncodedKV:
    """Parse and verify. Any truncation, bit flip or key mismatch raises CorruptEntryError."""
    mv = memoryview(blob)
    head = len(MAGIC) + _DIGEST_LEN
    if len(mv) < head + 8 or bytes(mv[: len(MAGIC)]) != MAGIC:
        raise CorruptEntryError("bad magic or truncated header")
    digest = bytes(mv[len(MAGIC):head])
    body = mv[head:]
    if hashlib.blake2b(body, digest_size=16).hexdigest().encode() != digest:
        raise CorruptEntryError("checksum mismatch")
    (hlen,) = struct.unpack("<Q", body[:8])
    try:
        header = json.loads(bytes(body[8 : 8 + hlen]))
    except ValueError as exc:
        raise CorruptEntryError(f"unreadable header: {exc}") from exc
    if expect_key is not None and header["key"] != expect_key:
        raise CorruptEntryError(f"entry holds key {header['key']}, expected {expect_key}")
    payload = body[8 + hlen :]
    tensors: dict[str, torch.Tensor] = {}
    for s in header["tensors"]:
        raw = payload[s["offset"] : s["offset"] + s["nbytes"]]
        if len(raw) != s["nbytes"]:
            raise CorruptEntryError("payload truncated")
        dtype = _NAME_DTYPES[s["dtype"]]
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if s["nbytes"] else torch.empty(0, dtype=torch.uint8)
        tensors[s["name"]] = buf.view(dtype).reshape(s["shape"])
    return EncodedKV(key=header["key"], codec=header["codec"], start_pos=header["start_pos"],
                     tensors=tensors, meta=header.get("meta", {}))
