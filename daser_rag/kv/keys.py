"""Content keys. A key is a hash of everything that determines the KV bytes, so changed text,
another model, another system prefix or another tenant can never hit an old entry."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return b"".join(int(i).to_bytes(4, "little", signed=False) for i in ids)


def prefix_digest(fingerprint: str, prefix_ids: Sequence[int], salt: str = "") -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-prefix-v1\0")
    h.update(fingerprint.encode())
    h.update(b"\0" + salt.encode() + b"\0")
    h.update(_ids_bytes(prefix_ids))
    return h.hexdigest()


def chunk_key(fingerprint: str, prefix_ids: Sequence[int], chunk_ids: Sequence[int], salt: str = "",
              adapter: str = "") -> str:
    """Key of a chunk's KV when computed right after `prefix_ids` (its stored positions follow).

    `adapter`: the digest of an adapter that changes stored chunk KV (daser_rag/calibration's
    `chunk_digest`), so KV made with and without it, or with another one, never share a key.
    Empty (no such adapter) keeps the key every earlier version wrote.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-chunk-v1\0")
    h.update(prefix_digest(fingerprint, prefix_ids, salt).encode())
    h.update(_ids_bytes(chunk_ids))
    if adapter:
        h.update(b"\0adapter\0" + adapter.encode())
    return "c" + h.hexdigest()


def prefix_key(fingerprint: str, prefix_ids: Sequence[int], salt: str = "") -> str:
    return "p" + prefix_digest(fingerprint, prefix_ids, salt)


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
