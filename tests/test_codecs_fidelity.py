"""Codec fidelity: int8 halves bf16's bytes and keeps next-token top-1 agreement >= 99%."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.codecs import decode, encode, from_bytes, to_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_codec_recorded_and_bytes():
    kv = ChunkKV("c1", torch.arange(128), 5, torch.randn(30, 3, 128, 64), torch.randn(30, 3, 128, 64))
    sizes = {}
    for c in ("bf16", "int8", "fp8"):
        enc = from_bytes(to_bytes(encode(kv, c)), expect_key="c1")
        assert enc.codec == c
        sizes[c] = enc.nbytes
        err = (decode(enc).keys - kv.keys).abs().max().item()
        assert err < (0.05 if c == "bf16" else 0.2), (c, err)
    assert sizes["int8"] / sizes["bf16"] <= 0.53  # int8 payload + fp32 per-channel/per-token scales
    assert decode(encode(kv.__class__("c", kv.token_ids, 5, kv.keys.bfloat16(), kv.values.bfloat16()), "bf16")).keys.equal(
        kv.keys.bfloat16().float())  # bf16 is lossless from bf16


@pytest.mark.slow  # ~45 s of teacher-forced decoding: CI's slow step runs it
@pytest.mark.parametrize("codec", ["int8"])
def test_int8_top1_agreement_vs_bf16(lm, codec):
    from benchmarks.codecs import codec_fidelity

    res = codec_fidelity(lm, codecs=("bf16", codec), items=3, steps=7, ratio=0.15, chunk_tokens=128)
    r = res["codecs"][codec]
    assert res["positions"] == 24
    assert r["top1_agreement"] >= 0.99, r
    assert r["bytes_vs_reference"] <= 0.53, r
