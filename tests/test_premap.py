"""Chunk KV stored with the token map applied (calibration/premap.py): the same buffer as applying
the map at placement, keyed by the map, made once, dropped with its document."""

from __future__ import annotations

import pytest
import torch

from daser_rag import ChunkRef, Document
from tests.test_calibration import _random_calibration, _segments


def engine_after_plain_ingest(lm, store, tmp_path, make_calibration):
    """Three documents ingested with no calibration loaded (so their second entries are made on
    first reuse), then an engine with `make_calibration(plain engine)` saved to a file:
    (engine, file, documents, their refs)."""
    from daser_rag.calibration import storage
    from daser_rag.engine.generator import CacheAwareGenerator

    plain = CacheAwareGenerator(lm, store=store, calibration="off")
    path = storage.save(make_calibration(plain), tmp_path / "cal.safetensors")
    docs = [Document(f"d{i}", t) for i, t in enumerate(_segments(plain)[0])]
    assert plain.add_documents(docs).mapped_chunks == 0
    plain.close()
    gen = CacheAwareGenerator(lm, store=store, calibration=str(path), prefix_tree="off")
    return gen, path, docs, [ChunkRef(doc_id=d.doc_id) for d in docs]


def _premapped(gen, segs, cal, indices):
    from daser_rag.calibration.premap import premap

    return [premap(s, cal, gen.runner.rope) if i in indices else s for i, s in enumerate(segs)]


@pytest.mark.parametrize("selector, share", [("hybrid", 0.0), ("hybrid", 0.15), ("deviation", 0.15),
                                             ("chunk_heads", 0.15)])
def test_premapped_segments_give_the_buffer_of_mapping_at_placement(generator, selector, share):
    """The map acts on un-rotated keys and its key correction is rotated with the key, so mapping
    a chunk where it was computed and re-rotating it equals mapping it where it lands: same
    logits, same selection (the deviation selector un-places premapped KV too), same buffer."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import fuse

    gen = generator
    _, segs = _segments(gen)
    cal = _random_calibration(gen, link_tokens=0, fit_share=0.15)
    q = torch.tensor(gen.prompt.query_ids("What does the pass statement do?"))
    cfg = BlendConfig(recompute_ratio=share, selector=selector)
    exact = segs[0].num_tokens
    on_the_fly = fuse(gen.runner, segs, q, exact_len=exact, config=cfg, calibration=cal)
    mapped = {1, 2, 3}
    stored = fuse(gen.runner, _premapped(gen, segs, cal, mapped), q, exact_len=exact, config=cfg,
                  calibration=cal, mapped=mapped)
    assert stored.calibrated and on_the_fly.calibrated
    assert (stored.logits - on_the_fly.logits).abs().max().item() < 2e-3
    if share:
        assert torch.equal(stored.recomputed_positions, on_the_fly.recomputed_positions)
    n = on_the_fly.cache.length
    for i in (0, gen.runner.spec.num_layers - 1):
        (k1, v1), (k2, v2) = stored.cache.view(i, n), on_the_fly.cache.view(i, n)
        assert (k1 - k2).abs().max().item() < 2e-3 and (v1 - v2).abs().max().item() < 2e-3
    # without the map the premapped KV would be placed as if raw: that is refused, not served
    with pytest.raises(ValueError, match="token map applied"):
        fuse(gen.runner, _premapped(gen, segs, cal, mapped), q, exact_len=exact, config=cfg, mapped=mapped)


def test_mapped_keys_name_the_entry_and_the_map(generator):
    from daser_rag.calibration.premap import mapped_key

    a = _random_calibration(generator, link_tokens=0, seed=1)
    b = _random_calibration(generator, link_tokens=0, seed=2)
    key = "c" + "0" * 32
    assert mapped_key(key, a.map_digest()) != mapped_key(key, b.map_digest())
    assert mapped_key(key, a.map_digest()) != key and mapped_key("c" + "1" * 32, a.map_digest()) != mapped_key(
        key, a.map_digest())
    with pytest.raises(ValueError, match="digest of a token map"):
        mapped_key(key, "")


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_engine_maps_a_chunk_once_and_drops_it_with_its_document(lm, store, tmp_path):
    """Requests naming no selector get `calibrated_selector` under a map. First reuse under a map stores the mapped entry, later requests read it (same answer, no
    mapping); the first chunk (exact) stays raw; r = 1 maps nothing; `premap=False` answers the
    same from raw KV; editing or invalidating the document drops its mapped entries."""
    from daser_rag.calibration.premap import mapped_key
    from daser_rag.engine.generator import CacheAwareGenerator

    gen, path, docs, refs = engine_after_plain_ingest(lm, store, tmp_path, lambda plain: _random_calibration(
        plain, link_tokens=0, fit_share=0.15))
    q = "What does the pass statement do?"
    first, info1 = gen.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    assert info1["mapped_chunks"] == 2 and info1["mapped_hits"] == 0 and info1["hits"] == 3
    second, info2 = gen.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    assert info2["mapped_chunks"] == 2 and info2["mapped_hits"] == 2
    assert torch.equal(first.logits, second.logits)
    # requests that name no selector get the calibrated one (with a map it measured better)
    res = gen.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15)
    assert res.calibrated and res.selector == "chunk_heads"
    assert gen.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15, selector="hybrid").selector == "hybrid"
    assert gen.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15, calibration=False).selector == "hybrid"
    layerwise = CacheAwareGenerator(lm, store=store, calibration=str(path), layerwise=True)
    streamed, info5 = layerwise.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    assert info5["mapped_hits"] == 2 and (streamed.logits - first.logits).abs().max().item() < 1e-4
    layerwise.close()
    chosen = CacheAwareGenerator(lm, store=store, calibration=str(path), selector="deviation", prefix_tree="off")
    assert chosen.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15).selector == "deviation"
    chosen.close()
    raw = CacheAwareGenerator(lm, store=store, calibration=str(path), premap=False, calibrated_selector="",
                              prefix_tree="off")
    assert raw.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15).selector == "hybrid"
    on_the_fly, info3 = raw.prefill(q, refs, recompute_ratio=0.15, prefix_tree=False)
    assert "mapped_chunks" not in info3
    assert (on_the_fly.logits - first.logits).abs().max().item() < 2e-3
    raw.close()
    _, info4 = gen.prefill(q, refs, recompute_ratio=1.0, prefix_tree=False)
    assert "mapped_chunks" not in info4
    digest = gen.calibration.members[0].map_digest()
    keys = {d.doc_id: gen.store.index.chunk_keys(d.doc_id, "") for d in docs}
    assert not gen.store.contains(mapped_key(keys["d0"][0], digest))  # exact: never mapped
    m1, m2 = mapped_key(keys["d1"][0], digest), mapped_key(keys["d2"][0], digest)
    assert gen.store.contains(m1) and gen.store.contains(m2)
    gen.invalidate("d1")
    assert not gen.store.contains(m1) and gen.store.contains(m2)
    edited = gen.add_documents([Document("d2", docs[2].text + " Edited.")])
    assert not gen.store.contains(m2)
    # ingested with the map loaded: mapped at index time, so the first request maps nothing
    assert edited.mapped_chunks == 1 and gen.premap_contexts([ChunkRef(doc_id="d2")]) == 0
    _, info6 = gen.prefill(q, [refs[0], ChunkRef(doc_id="d2")], recompute_ratio=0.0, prefix_tree=False)
    assert info6["mapped_chunks"] == info6["mapped_hits"] == 1
    gen.close()
