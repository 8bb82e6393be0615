"""A calibration with an ensemble of primers (what `daser-rag calibrate` writes) served by
`daser-rag serve --engine vllm`: the control plane finds it (`auto`, in the cache dir, named by
daser's own engine's fingerprint of the model), has vLLM compute every chunk after each primer
at ingest and stores their mean, and vLLM's answers equal daser's own calibrated ones; editing
a document re-primes it and the answer follows the new text. One spawned instance; its own module so the
two-instance plane of test_control_plane_vllm.py is down before this one starts.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.test_control_plane_vllm import COPPER, LIGHTHOUSE, MAX, ORCHARD, chat, control_plane
from tests.test_control_plane_vllm import pytestmark as _marks

pytestmark = _marks


@pytest.fixture(scope="module")
def primed_plane(tmp_path_factory, lm):
    from daser_rag.calibration import storage
    from daser_rag.calibration.adapter import Calibration
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.files import ModelFiles

    base = tmp_path_factory.mktemp("control-plane-primer")
    files = ModelFiles(None, dtype="float32")  # what spawned instances serve (settings: vllm.dtype)
    gen = CacheAwareGenerator(lm, store=KVStore(base / "embedded", codec="fp32"), chunk_tokens=256,
                              prefix_tree="off")
    spec, g = files.spec, torch.Generator().manual_seed(5)
    # as `daser-rag calibrate` writes it: named by daser's own engine's fingerprint, in the cache dir;
    # the control plane names the same weights by the files vLLM serves and must still find it
    cal = Calibration(gen.fingerprint, 0.1 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      0.1 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      torch.zeros(0, spec.hidden_size), fit_share=0.15,
                      kv_map=0.02 * torch.randn(spec.num_layers, spec.num_kv_heads, 1 + 2 * spec.head_dim,
                                                2 * spec.head_dim, generator=g),
                      primer=torch.tensor(gen.prompt.chunk_ids(ORCHARD + " " + COPPER)[:48],
                                          dtype=torch.int64).view(2, 24))  # an ensemble: 2 primers
    assert gen.fingerprint != files.fingerprint
    storage.save(cal, storage.default_path(base / "cache", gen.fingerprint, 0.15))
    with control_plane(base, spawn=1) as p:
        yield {**p, "gen": gen, "cal": cal}
    gen.close()


def test_primer_calibration_through_vllm_equals_daser_and_follows_edits(primed_plane):
    from daser_rag import Document
    from daser_rag.calibration.adapter import CalibrationSet

    url, gen = primed_plane["url"], primed_plane["gen"]
    r = httpx.post(url + "/v1/documents", json={"documents": [
        {"id": "light", "text": LIGHTHOUSE}, {"id": "copper", "text": COPPER}, {"id": "orchard", "text": ORCHARD}]},
        timeout=300)
    assert r.status_code == 200, r.text
    rep = r.json()["report"]
    assert rep["chunks"] == 3 and rep["mapped_chunks"] == 3  # every chunk primed at ingest, by vLLM
    # the adapters' path (/v1/chunks, add_chunks) primes at index time too
    r = httpx.post(url + "/v1/chunks", json={"documents": [{"id": "note", "texts": [
        "A short note on tide tables and their use by harbour pilots."]}]}, timeout=300)
    assert r.status_code == 200 and r.json()["report"]["mapped"] == 1, r.text
    q = "Who built the Corran lighthouse?"
    refs = [{"id": "copper"}, {"id": "orchard"}, {"id": "light"}]

    def daser(light: str) -> list[int]:
        gen.calibration = CalibrationSet((primed_plane["cal"],))
        try:
            out = gen.generate(q, [Document("copper", COPPER), Document("orchard", ORCHARD), Document("light", light)],
                               recompute_ratio=0.0, max_new_tokens=MAX)
        finally:
            gen.calibration = None
        assert out.calibrated
        return list(out.token_ids)

    full = chat(url, q, refs, use_cache=False)["daser"]
    gen_full = gen.generate(q, [Document("copper", COPPER), Document("orchard", ORCHARD), Document("light", LIGHTHOUSE)],
                            use_cache=False, max_new_tokens=MAX)
    assert full["token_ids"] == list(gen_full.token_ids)  # the same prompt on both engines
    got = chat(url, q, refs, recompute_ratio=0.0)["daser"]
    assert got["calibrated"] and got["mode"] == "blend" and got["cache_misses"] == 0 and got["cache_hits"] == 3
    assert got["exact_tokens"] + got["reused_tokens"] == got["context_tokens"]  # vLLM computed only the question
    ours = daser(LIGHTHOUSE)
    n = min(len(got["token_ids"]), len(ours))
    assert n >= 8 and got["token_ids"][:n] == ours[:n], (got["token_ids"], ours)
    # an edit re-primes the changed chunk at ingest; the old primed entry never answers
    edited = LIGHTHOUSE.replace("the engineer Mary Tulloch", "the stonemason Ewan Rask")
    r = httpx.post(url + "/v1/documents", json={"documents": [{"id": "light", "text": edited}]}, timeout=300)
    assert r.status_code == 200 and r.json()["report"]["mapped_chunks"] == 1, r.text
    again = chat(url, q, refs, recompute_ratio=0.0)["daser"]
    assert again["calibrated"] and again["cache_misses"] == 0
    ours2 = daser(edited)
    n = min(len(again["token_ids"]), len(ours2))
    assert n >= 8 and again["token_ids"][:n] == ours2[:n] and ours2 != ours, (again["token_ids"], ours2)
