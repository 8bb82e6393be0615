"""Reused chunks computed after a primer (calibration/adapter.py, `primer`): the chunk's K/V are
what a forward over [system prefix, primer, chunk] computes; the primed entry is a second store
entry keyed by the primer, read for every reused chunk and never confused with raw KV; a file's
primer is checked like every other tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from daser_rag import ChunkRef, Document
from daser_rag.context import SHARED_TENANT
from tests.test_calibration import _random_calibration, _segments
from tests.test_premap import engine_after_plain_ingest


def _primer(gen, n=40):
    from daser_rag.corpus import python_reference_corpus

    text = python_reference_corpus(("del",))[0].text
    return torch.tensor(gen.prompt.chunk_ids(text)[:n], dtype=torch.int64)


def _with_primer(cal, primer, token_map=True):
    return dataclasses.replace(cal, primer=primer, kv_map=cal.kv_map if token_map else None, meta={})


def test_primed_chunk_is_the_chunk_of_a_forward_over_prefix_primer_chunk(generator):
    gen = generator
    chunks, _ = _segments(gen)
    ids = gen.prompt.chunk_ids(chunks[1])
    primer = _primer(gen).tolist()
    kv = gen.computer.compute_primed(ids, "k", [primer])
    pre = len(gen.prompt.prefix_ids)
    assert kv.start_pos == pre + len(primer) and kv.num_tokens == len(ids)
    seq = torch.tensor(list(gen.prompt.prefix_ids) + primer + list(ids))
    cache = gen.runner.new_cache(len(seq))
    gen.runner.forward(seq, 0, cache)
    for i in (0, gen.runner.spec.num_layers - 1):
        k, v = cache.view(i, len(seq))
        assert (kv.keys[i] - k[:, kv.start_pos:]).abs().max().item() < 1e-4
        assert (kv.values[i] - v[:, kv.start_pos:]).abs().max().item() < 1e-4
    # and it differs from the chunk computed after the prefix alone (the point of a primer)
    plain = gen.computer.compute(ids, "p")
    assert (plain.values[-1] - kv.values[-1]).abs().max().item() > 1e-2


def test_an_ensemble_of_primers_averages_the_chunks_kv(generator):
    """Several primers (one length): the chunk's K/V are the mean of its computations after each,
    at the positions past the primer; primers of different lengths are refused."""
    gen = generator
    chunks, _ = _segments(gen)
    ids = gen.prompt.chunk_ids(chunks[1])
    a = _primer(gen, 30).tolist()
    b = gen.prompt.chunk_ids(chunks[2])[:30]
    both = gen.computer.compute_primed(ids, "k", [a, b])
    ka, kb = gen.computer.compute_primed(ids, "k", [a]), gen.computer.compute_primed(ids, "k", [b])
    assert both.start_pos == ka.start_pos == len(gen.prompt.prefix_ids) + 30
    assert (both.keys - (ka.keys + kb.keys) / 2).abs().max().item() < 1e-5
    assert (both.values - (ka.values + kb.values) / 2).abs().max().item() < 1e-5
    assert (both.values - ka.values).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="one length"):
        gen.computer.compute_primed(ids, "k", [a, b[:20]])


def test_ensemble_primers_in_files_keys_training_and_vllm(generator, tmp_path):
    """A [K, P] primer round-trips, is named by its shape too (its entries never meet those of
    one primer of the same ids), is chosen from K training prompts, and is taken by the vLLM
    engine (named or found by `auto`): the control plane averages it (next test)."""
    from daser_rag.calibration import storage
    from daser_rag.calibration.train import choose_primer
    from daser_rag.control.vllm_engine import vllm_calibration
    from daser_rag.model.files import ModelFiles

    gen = generator
    flat = _primer(gen, 40)
    cal = _with_primer(_random_calibration(gen, link_tokens=0), flat.view(2, 20))
    assert cal.primers() == [flat[:20].tolist(), flat[20:].tolist()]
    back = storage.load_for(storage.save(cal, tmp_path / "k2.safetensors"), gen.runner, gen.fingerprint)
    assert back.primers() == cal.primers() and back.digest() == cal.digest()
    single = _with_primer(cal, flat)
    assert single.map_digest() != cal.map_digest() and single.primer_digest() != cal.primer_digest()
    with pytest.raises(ValueError, match="not one"):
        cal.primer_ids()
    nine = _with_primer(cal, flat[:36].view(9, 4))
    with pytest.raises(ValueError, match="rows"):
        nine.check_shape(gen.runner.spec.num_layers, gen.runner.spec.num_kv_heads, gen.runner.spec.hidden_size,
                         gen.runner.spec.head_dim)
    # each member is the one-primer calibration of its row: an ensemble shares their entries
    members = cal.primer_members()
    assert [m.primer_ids() for m in members] == cal.primers()
    assert members[1].primer_digest() == _with_primer(cal, flat[20:], token_map=False).primer_digest()
    assert single.primer_members() == [single] and _with_primer(cal, None).primer_members() == []

    class Spec:
        def __init__(self, chunks):
            self.chunks = chunks

    specs = [Spec(["Alpha text about bees. " * 10]), Spec(["Beta text on wasps. " * 3])]
    rows = choose_primer(gen, specs, 64, 2)
    assert len(rows) == 2 and len(rows[0]) == len(rows[1]) <= 64 and rows[0] != rows[1]
    assert choose_primer(gen, specs, 64) == (tuple(gen.prompt.chunk_ids(specs[0].chunks[0])[:64]),)
    files = ModelFiles(None, dtype="float32")
    path = storage.save(dataclasses.replace(cal, fingerprint=files.fingerprint, fit_share=0.15),
                        storage.default_path(tmp_path, files.fingerprint, 0.15))
    named = vllm_calibration(str(path), files, tmp_path)
    assert named is not None and named.members[0].primers() == cal.primers()
    found = vllm_calibration("auto", files, tmp_path)
    assert found is not None and len(found.members[0].primers()) == 2


def test_planner_averages_a_primer_ensemble_as_the_embedded_engine_does(generator, caplog):
    """On the vLLM path a re-positioned chunk under a primer ensemble loads the ensemble's entry
    (the key the embedded engine stores its averaged entry under); a missing one is a plan of one
    primed prefill per primer (each saved under its member's key) whose mean the control plane
    stores: equal to the embedded engine's entry. Missing or mismatched parts make no entry; the
    mean and its parts go with their document."""
    from daser_rag.control.ensemble import store_mean
    from daser_rag.control.planner import Planner
    from daser_rag.kv.chunk_kv import mean_kv

    gen = generator
    flat = _primer(gen, 40)
    cal = _with_primer(_random_calibration(gen, link_tokens=0), flat.view(2, 20))
    gen.add_documents([Document("a", "Alpha text about bees."), Document("b", "Beta text about wasps.")])
    planner = Planner.for_generator(gen)
    ctx = [ChunkRef(doc_id="a"), ChunkRef(doc_id="b")]
    plan = planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=cal)
    kb = plan.chunk_keys[1]
    key = planner.primed_key(kb, cal)
    assert plan.calibrated and [s[0] for s in plan.kv_transfer_params["daser"]["segments"]][2] == key
    (pf,) = plan.prefill
    members = cal.primer_members()
    assert pf.key == key and not pf.prompt_ids and [p.key for p in pf.parts] == [
        planner.primed_key(kb, m) for m in members]
    chunk = plan.chunks[1]
    for part, m in zip(pf.parts, members):  # each part is a one-primer prefill
        assert part == planner.primed_prefill_plan(chunk, m, SHARED_TENANT) and not part.parts
        assert part.prompt_ids == list(gen.prompt.prefix_ids) + m.primer_ids() + list(chunk.token_ids)
    assert pf.compute_tokens == sum(len(p.prompt_ids) for p in pf.parts)
    # what vLLM's connector would save for each part (daser's own computation of it)
    ids = list(chunk.token_ids)
    runs = [gen.computer.compute_primed(ids, p.key, [m.primer_ids()]) for p, m in zip(pf.parts, members)]
    gen.store.put(runs[0])
    with caplog.at_level("WARNING"):
        assert not store_mean(gen.store, pf) and not gen.store.contains(key)
    assert "1 of its 2 parts" in caplog.text
    gen.store.put(dataclasses.replace(runs[1], start_pos=runs[1].start_pos + 1))  # not the same place
    assert not store_mean(gen.store, pf) and not gen.store.contains(key)
    gen.store.delete(runs[1].key)
    gen.store.put(runs[1])
    assert store_mean(gen.store, pf)
    made = gen.store.get(key)
    embedded = gen.computer.compute_primed(ids, key, cal.primers())
    assert made.start_pos == embedded.start_pos == len(gen.prompt.prefix_ids) + 20
    assert (made.keys - embedded.keys).abs().max().item() < 1e-4
    assert (made.values - embedded.values).abs().max().item() < 1e-4
    assert (made.values - runs[0].values).abs().max().item() > 1e-3  # the mean, not one part
    assert torch.equal(mean_kv(runs, key).values, made.values)
    assert not planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=cal).prefill
    # the mean and its parts are registered under the chunk's document: invalidating it drops all
    assert planner.primed_entries(kb, cal) == [key] + [p.key for p in pf.parts]
    gen.invalidate("b")
    assert not any(gen.store.contains(k) for k in planner.primed_entries(kb, cal))


@pytest.mark.parametrize("token_map", [False, True])
def test_fusion_places_primed_segments_and_refuses_raw_ones(generator, token_map):
    """Primed (and mapped) entries are placed like any re-positioned chunk; with the primer's
    calibration, a reused chunk read raw is refused, never placed with a map fitted on primed KV."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import fuse
    from daser_rag.calibration.premap import premap

    gen = generator
    chunks, segs = _segments(gen)
    cal = _with_primer(_random_calibration(gen, link_tokens=0, fit_share=0.15, biases=False), _primer(gen),
                       token_map)
    cal = dataclasses.replace(cal, key_log_scale=torch.zeros_like(cal.key_log_scale),
                              value_log_scale=torch.zeros_like(cal.value_log_scale))
    q = torch.tensor(gen.prompt.query_ids("What does the pass statement do?"))
    exact = segs[0].num_tokens + segs[1].num_tokens
    primed = [gen.computer.compute_primed(gen.prompt.chunk_ids(c), s.key, cal.primers())
              for c, s in zip(chunks[1:], segs[2:])]
    stored = segs[:2] + [premap(p, cal, gen.runner.rope) for p in primed]
    cfg = BlendConfig(recompute_ratio=0.0)
    got = fuse(gen.runner, stored, q, exact_len=exact, config=cfg, calibration=cal, mapped={2, 3})
    assert got.calibrated
    if not token_map:  # the primed chunks placed as they are: the buffer of placing them uncalibrated
        ref = fuse(gen.runner, segs[:2] + primed, q, exact_len=exact, config=cfg)
        assert torch.equal(got.logits, ref.logits)
    plain = fuse(gen.runner, segs, q, exact_len=exact, config=cfg)
    assert (got.logits - plain.logits).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="primer"):
        fuse(gen.runner, segs, q, exact_len=exact, config=cfg, calibration=cal)
    with pytest.raises(ValueError, match="primer"):
        fuse(gen.runner, stored[:3] + segs[3:], q, exact_len=exact, config=cfg, calibration=cal, mapped={2})


def test_primed_keys_name_the_primer(generator):
    from daser_rag.calibration.premap import mapped_key

    gen = generator
    base = _random_calibration(gen, link_tokens=0)
    a, b = _with_primer(base, _primer(gen, 40)), _with_primer(base, _primer(gen, 41))
    alone = _with_primer(base, _primer(gen, 40), token_map=False)
    digests = {base.map_digest(), a.map_digest(), b.map_digest(), alone.map_digest()}
    assert len(digests) == 4 and "" not in digests
    key = "c" + "0" * 32
    assert len({mapped_key(key, d) for d in digests} | {key}) == 5
    assert base.map_digest() == dataclasses.replace(base, meta={}).map_digest()  # a map alone keeps its digest
    assert a.digest() != base.digest() and a.prepares_chunks and alone.prepares_chunks


def _save_raw(cal, path):
    """`storage.save`, but with the primer tensor written as it is (save normalizes it to int64)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from daser_rag.calibration import storage

    storage.save(cal, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    tensors["primer"] = cal.primer.contiguous()
    save_file(tensors, str(path), metadata=meta)


def test_primer_file_roundtrip_and_refusals(generator, tmp_path):
    from daser_rag.calibration import storage
    from daser_rag.calibration.storage import CalibrationFileError

    gen = generator
    cal = _with_primer(_random_calibration(gen, link_tokens=0), _primer(gen))
    path = storage.save(cal, tmp_path / "cal.safetensors")
    back = storage.load_for(path, gen.runner, gen.fingerprint)
    assert torch.equal(back.primer, cal.primer) and back.primer.dtype == torch.int64
    assert back.digest() == cal.digest() and back.map_digest() == cal.map_digest()
    vocab = gen.runner.spec.vocab_size
    bad = {"float ids": cal.primer.float(), "3-d ids": cal.primer.view(1, 1, -1), "empty": cal.primer[:0],
           "outside the vocabulary": cal.primer + vocab, "9 primers": cal.primer[:36].view(9, 4)}
    for what, primer in bad.items():
        p = tmp_path / f"bad-{what}.safetensors"
        # the file's own header and checksum, its primer tensor swapped: only the primer's check can refuse it
        _save_raw(dataclasses.replace(cal, primer=primer), p)
        with pytest.raises(CalibrationFileError, match="primer"):
            storage.load_for(p, gen.runner, gen.fingerprint)


def test_planner_loads_primed_entries_for_re_positioned_chunks(generator):
    """On the vLLM path a re-positioned chunk under a primer loads its primed entry (computed after
    [system prefix, primer], not token-mapped: the connector maps it as it loads it); the exact
    first chunk stays raw. A missing primed entry is a prefill plan over [prefix, primer, chunk]
    that saves the primer's part as an entry of its own; the embedded engine stores a primer-only
    calibration's entries under the same key, so the plan finds them; invalidating the document
    drops the entry; a primer that cannot fit the window with a chunk is refused."""
    from daser_rag.calibration.adapter import CalibrationSet
    from daser_rag.calibration.premap import mapped_key
    from daser_rag.control.planner import Planner
    from daser_rag.errors import InvalidInputError

    gen = generator
    cal = _with_primer(_random_calibration(gen, link_tokens=0), _primer(gen))
    gen.add_documents([Document("a", "Alpha text about bees."), Document("b", "Beta text about wasps."),
                       Document("c", "Gamma text about ants.")])
    planner = Planner.for_generator(gen)
    ctx = [ChunkRef(doc_id="a"), ChunkRef(doc_id="b"), ChunkRef(doc_id="c")]
    plan = planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=cal)
    assert plan.calibrated
    segs = [s[0] for s in plan.kv_transfer_params["daser"]["segments"]]
    ka, kb, kc = plan.chunk_keys
    pb, pc = planner.primed_key(kb, cal), planner.primed_key(kc, cal)
    assert segs[1:] == [ka, pb, pc] and pb == mapped_key(kb, cal.primer_digest()) != mapped_key(kb, cal.map_digest())
    assert [pf.key for pf in plan.prefill] == [pb, pc]  # the raw entries are stored; the primed ones not yet
    pf = plan.prefill[0]
    n_pre, primer = len(gen.prompt.prefix_ids), cal.primer_ids()
    assert pf.prompt_ids == list(gen.prompt.prefix_ids) + primer + list(plan.chunks[1].token_ids)
    assert [s[1:] for s in pf.kv_transfer_params["daser"]["segments"]] == [
        [n_pre], [len(primer)], [plan.chunks[1].num_tokens]]
    assert pf.kv_transfer_params["daser"]["segments"][1][0] == planner.key(primer, "")  # the primer as an entry
    # uncalibrated (or without the primer) the same request loads raw entries
    assert [s[0] for s in planner.reuse("Q?", ctx, tenant=SHARED_TENANT).kv_transfer_params["daser"]["segments"]][2:] \
        == [kb, kc]
    # the embedded engine, primer-only calibration: stores the entries the plan names
    gen.calibration = CalibrationSet((_with_primer(cal, cal.primer, token_map=False),))
    try:
        gen.premap_contexts(ctx[1:])
    finally:
        gen.calibration = None
    assert gen.store.contains(pb) and gen.store.contains(pc)
    assert not planner.reuse("Q?", ctx, tenant=SHARED_TENANT, calibration=cal).prefill
    gen.invalidate("c")  # the planner registered the primed entry under its document
    assert not gen.store.contains(pc) and gen.store.contains(pb)
    big = Planner(gen.tokenizer, gen.fingerprint, gen.store, context_window=gen.context_window,
                  chunk_tokens=gen.context_window - n_pre - 64, prompt=gen.prompt)
    assert big.reuse("Q?", ctx[:2], tenant=SHARED_TENANT, calibration=cal).calibrated  # 40 primer tokens fit
    with pytest.raises(InvalidInputError, match="primer"):  # 100 do not
        big.reuse("Q?", ctx[:2], tenant=SHARED_TENANT, calibration=_with_primer(cal, _primer(gen, 100)))


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_engine_reads_primed_entries_and_drops_them_with_their_document(lm, store, tmp_path):
    """First reuse under a primer computes and stores the primed entry (a miss), later requests
    read it (the same logits); the exact first chunk stays raw; `premap=False` still reads primed
    entries (a primer cannot act at placement); r = 1 is exactly full prefill; invalidating or
    editing a document drops its primed entries."""
    from daser_rag.calibration.premap import mapped_key
    from daser_rag.engine.generator import CacheAwareGenerator

    gen, path, docs, refs = engine_after_plain_ingest(lm, store, tmp_path, lambda plain: _with_primer(
        _random_calibration(plain, link_tokens=0, fit_share=0.15), _primer(plain)))
    q = "What does the pass statement do?"
    first, info1 = gen.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    # the two reused chunks were computed after the primer: misses, though their raw entries are stored
    assert info1["mapped_chunks"] == 2 and info1["mapped_hits"] == 0 and info1["hits"] == 1
    second, info2 = gen.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    assert info2["mapped_hits"] == 2 and info2["hits"] == 3 and torch.equal(first.logits, second.logits)
    raw = CacheAwareGenerator(lm, store=store, calibration=str(path), premap=False, prefix_tree="off")
    again, info3 = raw.prefill(q, refs, recompute_ratio=0.15, selector="hybrid", prefix_tree=False)
    assert info3["mapped_hits"] == 2 and torch.equal(again.logits, first.logits)
    raw.close()
    full, _ = gen.prefill(q, refs, use_cache=False)
    r1, info4 = gen.prefill(q, refs, recompute_ratio=1.0, prefix_tree=False)
    assert "mapped_chunks" not in info4 and not r1.calibrated  # nothing reused: no primer, no map
    assert (r1.logits - full.logits).abs().max().item() < 1e-3  # full prefill, up to the split into passes
    off = gen.generate(q, refs, max_new_tokens=1, recompute_ratio=0.15, calibration=False)
    assert not off.calibrated
    digest = gen.calibration.members[0].map_digest()
    keys = {d.doc_id: gen.store.index.chunk_keys(d.doc_id, "") for d in docs}
    assert not gen.store.contains(mapped_key(keys["d0"][0], digest))  # exact: never primed
    m1, m2 = mapped_key(keys["d1"][0], digest), mapped_key(keys["d2"][0], digest)
    assert gen.store.contains(m1) and gen.store.contains(m2)
    gen.invalidate("d1")
    assert not gen.store.contains(m1) and gen.store.contains(m2)
    edited = gen.add_documents([Document("d2", docs[2].text + " Edited.")])
    assert not gen.store.contains(m2) and edited.mapped_chunks == 1  # primed at index time
    gen.close()


def test_vllm_engine_takes_a_primer_and_refuses_link_tokens(generator, tmp_path, caplog):
    """`daser-rag calibrate` adds a primer by default and the vLLM engine carries it (named or
    found by `auto`); link tokens cannot go into vLLM: named, an error; found by `auto`, skipped
    with the reason."""
    from daser_rag.calibration import storage
    from daser_rag.calibration.storage import CalibrationFileError
    from daser_rag.control.vllm_engine import vllm_calibration
    from daser_rag.model.files import ModelFiles

    gen = generator
    files = ModelFiles(None, dtype="float32")
    base = dataclasses.replace(_random_calibration(gen, link_tokens=0), fingerprint=files.fingerprint)
    primed = dataclasses.replace(_with_primer(base, _primer(gen)), fit_share=0.15)
    path = storage.default_path(tmp_path, files.fingerprint, 0.15)
    storage.save(primed, path)
    named = vllm_calibration(str(path), files, tmp_path)
    assert named is not None and named.members[0].primer_ids() == primed.primer_ids()
    found = vllm_calibration("auto", files, tmp_path)
    assert found is not None and found.members[0].primer is not None
    linked = dataclasses.replace(_random_calibration(gen, link_tokens=2), fingerprint=files.fingerprint)
    link_path = storage.default_path(tmp_path, files.fingerprint, 0.0)
    storage.save(linked, link_path)
    with pytest.raises(CalibrationFileError, match="link tokens"):
        vllm_calibration(str(link_path), files, tmp_path)
    with caplog.at_level("WARNING"):
        kept = vllm_calibration("auto", files, tmp_path)
    assert "link tokens" in caplog.text and kept is not None and [c.fit_share for c in kept.members] == [0.15]


@pytest.mark.slow  # minutes: CI's slow step runs it
def test_primer_lowers_held_out_kl_below_the_map_alone(lm, store):
    """Calibrated with and without the primer on the same reference topics (the same prompts), full
    reuse, judged on 20 prompts built only from documents neither run trained on: the primer (with
    the map fitted on primed KV) beats the map alone, in the mean and on most prompts."""
    from daser_rag.calibration.train import CalibrationConfig, calibrate
    from daser_rag.corpus import python_reference_corpus
    from daser_rag.engine.generator import CacheAwareGenerator

    small = CacheAwareGenerator(lm, store=store, chunk_tokens=160)  # ~700-token prompts: a CPU-sized run
    docs = python_reference_corpus()
    runs = {}
    for tokens in (0, 512):
        cfg = CalibrationConfig(train_prompts=12, held_out_prompts=20, chunks_per_document=1, fit_share=0.0,
                                answer_tokens=8, primer_tokens=tokens, primers=1)  # one primer vs none
        runs[tokens] = calibrate(small, docs, cfg)
    plain, primed = runs[0], runs[512]
    assert primed.calibration.primer is not None and plain.calibration.primer is None
    assert primed.held_out_documents == plain.held_out_documents and len(primed.held_out_after) == 20
    assert primed.held_out_before == plain.held_out_before  # "before" is the unprimed store either way
    assert primed.accepted and primed.kl_after < 0.9 * plain.kl_after, (plain.kl_after, primed.kl_after)
    wins = sum(a < b for a, b in zip(primed.held_out_after, plain.held_out_after))
    assert wins >= 12, (plain.held_out_after, primed.held_out_after)


def test_add_chunks_primes_at_index_time_as_add_documents_does(generator):
    """The adapters' ingestion path (`add_chunks`: the LlamaIndex vector store, the service's
    /v1/chunks) stores each chunk's primed (and mapped) entry at index time, as `add_documents`
    does, so no request pays for it; the entries go with their document. Without a calibration
    nothing more is made."""
    from daser_rag.calibration.adapter import CalibrationSet
    from daser_rag.calibration.premap import mapped_key

    gen = generator
    texts = ["Alpha text about bees and hives.", "Beta text about wasps and nests."]
    plain = gen.add_chunks({"plain": ["Gamma text about ants."]})
    assert plain.mapped == 0 and plain.computed == 1
    cal = _with_primer(_random_calibration(gen, link_tokens=0), _primer(gen))
    gen.calibration = CalibrationSet((cal,))
    try:
        rep = gen.add_chunks({"a": texts})
        assert rep.mapped == 2 and rep.computed == 2
        made = [mapped_key(k, cal.map_digest()) for k in rep.keys["a"]]
        assert all(gen.store.contains(k) for k in made)
        again = gen.add_chunks({"a": texts})
        assert again.mapped == 0 and again.computed == 0  # stored: nothing made twice
        assert gen.add_chunks({"b": ["Delta text."]}, precompute=False).mapped == 0
    finally:
        gen.calibration = None
    gen.invalidate("a")
    assert not any(gen.store.contains(k) for k in made)
