"""Chunk KV stored with the token map already applied: the map is paid once per chunk, not per request.

The token map (`token_map.py`) corrects each reused token from its own stored K/V only, and the
key's correction is rotated with the key. RoPE is linear, so applying the map at the positions
a chunk was computed at and re-rotating the result to where the chunk lands gives the K/V that
applying it there gives: the mapped chunk can be stored once and placed anywhere. On this 2-core
machine the map's product (~4.5 GFLOP for 1,536 reused tokens) took full reuse from 10.6x to 8.1x
of full prefill's speed; stored mapped, a reused chunk costs what an uncalibrated one does.

A calibration with a primer (`adapter.py`) makes that second entry from the chunk computed after
[system prefix, primer] instead of from the raw entry (`ChunkComputer.compute_primed`), then maps
it when it has a map too; the key names the primer as well (`Calibration.map_digest`).

The mapped KV is a second entry, not a replacement: exact placements (the first chunk after the
system prefix, prefix-tree nodes), uncalibrated requests, other maps and vLLM read the raw one.
Its key names the raw entry's key and the map (`Calibration.map_digest`), so KV mapped by one map
is never placed as raw or as another map's; it is registered under its document like prefix-tree
nodes (`KVStore.add_derived`), so invalidating the document drops it with the raw entry, and the
store's tier caps and eviction bound it like any entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from daser_rag.calibration import token_map
from daser_rag.kv.chunk_kv import ChunkKV

if TYPE_CHECKING:
    from daser_rag.calibration.adapter import Calibration

RopeTables = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mapped_key(key: str, map_digest: str) -> str:
    """Store key of chunk `key`'s KV with the map named `map_digest` applied."""
    if not map_digest:
        raise ValueError("a mapped entry needs the digest of a token map")
    h = hashlib.blake2b(digest_size=16)
    h.update(b"daser-mapped-v1\0" + key.encode() + b"\0" + map_digest.encode())
    return "m" + h.hexdigest()


@torch.inference_mode()
def premap(kv: ChunkKV, calibration: Calibration, rope: RopeTables) -> ChunkKV:
    """`kv` with `calibration`'s token map applied at the positions it was computed at (float32;
    the store's codec encodes it like any entry), keyed as its second entry. `rope(positions)`
    gives the RoPE tables. With a primer, `kv` must be the chunk computed after it (the caller's
    job: the raw entry was not); without a map it is only re-keyed."""
    kv_map = calibration.kv_map
    digest = calibration.map_digest()
    if not digest:
        raise ValueError("this calibration has no token map or primer to store chunks with")
    if kv_map is None:
        return ChunkKV(mapped_key(kv.key, digest), kv.token_ids, kv.start_pos, kv.keys, kv.values,
                       {**kv.meta, "primed": digest, "raw_key": kv.key})
    n = kv.num_tokens
    cos, sin = rope(torch.arange(kv.start_pos, kv.start_pos + n))
    cos, sin = cos.float(), sin.float()
    keys, values = [], []
    for layer in range(int(kv.keys.shape[0])):
        k, v = token_map.apply(kv_map[layer], kv.keys[layer].to(cos.device, torch.float32),
                               kv.values[layer].to(cos.device, torch.float32), cos, sin)
        keys.append(k)
        values.append(v)
    return ChunkKV(mapped_key(kv.key, digest), kv.token_ids, kv.start_pos, torch.stack(keys), torch.stack(values),
                   {**kv.meta, "token_map": digest, "raw_key": kv.key})
