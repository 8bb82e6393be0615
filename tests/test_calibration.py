"""Calibration (issue 19): exactness where nothing is reused, the file's checks, chunk keys."""

from __future__ import annotations

import pytest
import torch

from daser_rag.corpus import python_reference_corpus


def _segments(gen, topics=("pass", "break", "continue")):
    docs = python_reference_corpus(topics)
    chunks = [gen.split(d.text)[0] for d in docs]
    segs = [gen.computer.prefix()] + [gen.computer.compute(gen.prompt.chunk_ids(c), f"t{i}") for i, c in enumerate(chunks)]
    return chunks, segs


def _random_calibration(gen, link_tokens=3, seed=0, fit_share=0.0, biases=True, token_map=True):
    """Random scales, link tokens and (by default) key/value biases and a token map: every part
    a test can see."""
    from daser_rag.calibration.adapter import Calibration

    g = torch.Generator().manual_seed(seed)
    spec = gen.runner.spec
    shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    return Calibration(gen.fingerprint, 0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                       0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                       0.05 * torch.randn(link_tokens, spec.hidden_size, generator=g), fit_share=fit_share,
                       key_bias=0.3 * torch.randn(shape, generator=g) if biases else None,
                       value_bias=0.1 * torch.randn(shape, generator=g) if biases else None,
                       kv_map=_random_map(spec.num_layers, spec.num_kv_heads, spec.head_dim, g) if token_map else None)


def _random_map(layers, heads, d, g):
    """A token map with a moderate correction (I + W stays well conditioned)."""
    return 0.02 * torch.randn(layers, heads, 1 + 2 * d, 2 * d, generator=g)


def test_token_map_corrects_keys_before_rope_and_unplace_undoes():
    """A stored key is R(p) k_raw; the token map corrects [k_raw; v] by W0 + W^T [k_raw; v] and
    rotates the key back: the same token placed anywhere gets the same correction, turned with
    its position. Scales and biases act after it; `unplace` gives the stored K/V back."""
    from daser_rag.calibration.adapter import place_kv, unplace_kv
    from daser_rag.calibration.token_map import inverse_matrices
    from daser_rag.model.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    heads, n, d = 3, 7, 8
    raw_k, v = torch.randn(heads, n, d, generator=g), torch.randn(heads, n, d, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    w = _random_map(1, heads, d, g)
    ks, vs = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.5, 1.0, 0.25])
    kb, vb = torch.randn(heads, d, generator=g), torch.randn(heads, d, generator=g)
    z = torch.cat([raw_k, v], -1)
    fixed = z + w[0, :, :1, :] + z @ w[0, :, 1:, :]
    for start in (0, 100, 3000):
        cos, sin = rope_cos_sin(torch.arange(start, start + n), inv_freq, 1.0, torch.float32)
        pk, pv = place_kv(apply_rope(raw_k, cos, sin), v, ks, vs, kb, vb, cos, sin, w[0])
        want_k = apply_rope(fixed[..., :d] * ks.view(-1, 1, 1) + kb.unsqueeze(1), cos, sin)
        assert torch.allclose(pk, want_k, atol=1e-4)
        assert torch.allclose(pv, fixed[..., d:] * vs.view(-1, 1, 1) + vb.unsqueeze(1), atol=1e-5)
        bk, bv = unplace_kv(pk, pv, ks, vs, kb, vb, cos, sin, w[0], inverse_matrices(w)[0])
        assert torch.allclose(bk, apply_rope(raw_k, cos, sin), atol=1e-4) and torch.allclose(bv, v, atol=1e-4)


def test_token_map_regression_recovers_an_affine_correction():
    """The normal equations accumulated token by token and solved in closed form give back the
    affine map that produced the targets (noise-free, ridge ~0), and rows count once per token."""
    from daser_rag.calibration.token_map import TokenMapStats, apply
    from daser_rag.model.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(1)
    layers, heads, d = 2, 2, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    w = _random_map(layers, heads, d, g) * 5
    stats = TokenMapStats.empty(layers, heads, d)
    for start in (0, 40, 90):
        cos, sin = rope_cos_sin(torch.arange(start, start + 30), inv_freq, 1.0, torch.float32)
        for i in range(layers):
            k = apply_rope(torch.randn(heads, 30, d, generator=g), cos, sin)
            v = torch.randn(heads, 30, d, generator=g)
            fk, fv = apply(w[i], k, v, cos, sin)
            stats.add(i, k, v, fk, fv, cos, sin)
    assert stats.rows == 90
    assert torch.allclose(stats.solve(1e-9), w, atol=1e-3)
    with pytest.raises(ValueError, match="no reused tokens"):
        TokenMapStats.empty(1, 1, 2).solve(1e-2)


def test_key_bias_is_added_before_rope_and_place_undoes():
    """A stored key is R(p) k_raw; placed, it is R(p) (s k_raw + b): the bias turns with the
    token's position like the key does. `unplace` gives the stored K/V back (selection ranks
    staleness with it)."""
    from daser_rag.calibration.adapter import place_kv, unplace_kv
    from daser_rag.model.rope import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    heads, n, d = 3, 7, 8
    raw_k, v = torch.randn(heads, n, d, generator=g), torch.randn(heads, n, d, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_cos_sin(torch.arange(100, 100 + n), inv_freq, 1.0, torch.float32)
    k = apply_rope(raw_k, cos, sin)
    ks, vs = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.5, 1.0, 0.25])
    kb, vb = torch.randn(heads, d, generator=g), torch.randn(heads, d, generator=g)
    pk, pv = place_kv(k, v, ks, vs, kb, vb, cos, sin)
    want = apply_rope(raw_k * ks.view(-1, 1, 1) + kb.unsqueeze(1), cos, sin)
    assert torch.allclose(pk, want, atol=1e-5)
    assert torch.allclose(pv, v * vs.view(-1, 1, 1) + vb.unsqueeze(1), atol=1e-6)
    bk, bv = unplace_kv(pk, pv, ks, vs, kb, vb, cos, sin)
    assert torch.allclose(bk, k, atol=1e-5) and torch.allclose(bv, v, atol=1e-5)


def test_r1_with_calibration_equals_full_prefill(generator):
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import full_prefill, fuse

    gen = generator
    chunks, segs = _segments(gen)
    q = torch.tensor(gen.prompt.query_ids("What does the pass statement do?"))
    ctx = torch.tensor(list(gen.prompt.prefix_ids) + [i for c in chunks for i in gen.prompt.chunk_ids(c)])
    full = full_prefill(gen.runner, ctx, q, len(ctx) + len(q))
    cal = _random_calibration(gen, fit_share=0.15)  # fitted for r > 0: r = 1 is in no calibration's regime
    for selector in ("hybrid", "deviation", "chunk_heads"):
        fused = fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens,
                     config=BlendConfig(recompute_ratio=1.0, selector=selector), calibration=cal)
        assert not fused.calibrated and fused.link_tokens == 0
        assert fused.cache.length == full.cache.length
        assert (fused.logits - full.logits).abs().max().item() < 1e-3
        for i in range(gen.runner.spec.num_layers):
            k1, v1 = fused.cache.view(i, fused.cache.length)
            k2, v2 = full.cache.view(i, full.cache.length)
            assert (k1 - k2).abs().max().item() < 1e-3
            assert (v1 - v2).abs().max().item() < 1e-3


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_calibration_acts_at_r0_and_identity_changes_nothing(generator):
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import fuse
    from daser_rag.calibration.adapter import Calibration

    gen = generator
    _, segs = _segments(gen)
    q = torch.tensor(gen.prompt.query_ids("What does the pass statement do?"))
    cfg = BlendConfig(recompute_ratio=0.0)
    plain = fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens, config=cfg)
    spec = gen.runner.spec
    ident = Calibration.identity(gen.fingerprint, spec.num_layers, spec.num_kv_heads, spec.hidden_size)
    same = fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens, config=cfg, calibration=ident)
    assert same.calibrated and (same.logits - plain.logits).abs().max().item() < 1e-5
    cal = _random_calibration(gen)
    moved = fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens, config=cfg, calibration=cal)
    assert moved.calibrated and moved.link_tokens == 3 and moved.query_tokens == plain.query_tokens + 3
    assert moved.cache.length == plain.cache.length + 3
    assert (moved.logits - plain.logits).abs().max().item() > 1e-2
    # the exact system prefix is never scaled
    n = segs[0].num_tokens
    k1, _ = moved.cache.view(0, n)
    k2, _ = plain.cache.view(0, n)
    assert torch.equal(k1, k2)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_student_matches_fuse_at_r0(generator):
    """The differentiable training path computes what serving computes (same KL target)."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import fuse
    from daser_rag.calibration.examples import PromptSpec, exact_length, prepare
    from daser_rag.calibration.student import student_logits

    gen = generator
    chunks, segs = _segments(gen)
    question = "What does the pass statement do?"
    ex = prepare(gen, PromptSpec(question, tuple(chunks)), answer_tokens=2)
    cal = _random_calibration(gen)
    q = torch.tensor(gen.prompt.query_ids(question))
    # serving's exact run: the prefix and the first chunk (engine/assemble.py), never scaled
    fused = fuse(gen.runner, segs, q, exact_len=exact_length(segs), config=BlendConfig(recompute_ratio=0.0),
                 calibration=cal)
    assert int((~ex.reused).sum()) == exact_length(segs)
    with torch.no_grad():
        got = student_logits(gen.runner, ex, cal.key_log_scale, cal.value_log_scale, cal.link, 2,
                             cal.key_bias, cal.value_bias, cal.kv_map)
    # tail = question + first answer token: the second-to-last row is the question's last token
    assert (got[0] - fused.logits[-1]).abs().max().item() < 1e-3


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_student_matches_fuse_at_r_above_zero(generator):
    """Fitted at r > 0, the student repairs the tokens serving repairs, over the same scaled stale
    KV: its logits are serving's (chunk_heads: a selection that does not depend on the scales)."""
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import fuse
    from daser_rag.calibration.examples import PromptSpec, exact_length, prepare
    from daser_rag.calibration.student import student_logits

    gen = generator
    chunks, segs = _segments(gen)
    question = "What does the pass statement do?"
    blend = BlendConfig(recompute_ratio=0.15, selector="chunk_heads")
    ex = prepare(gen, PromptSpec(question, tuple(chunks)), answer_tokens=2, blend=blend)
    cal = _random_calibration(gen, fit_share=0.15)
    q = torch.tensor(gen.prompt.query_ids(question))
    fused = fuse(gen.runner, segs, q, exact_len=exact_length(segs), config=blend, calibration=cal)
    assert fused.calibrated
    assert ex.recomputed == fused.recomputed_tokens > 0
    assert torch.equal(ex.selected, fused.recomputed_positions)
    with torch.no_grad():
        got = student_logits(gen.runner, ex, cal.key_log_scale, cal.value_log_scale, cal.link, 2,
                             cal.key_bias, cal.value_bias, cal.kv_map)
        at_r0 = prepare(gen, PromptSpec(question, tuple(chunks)), answer_tokens=2)
        r0 = student_logits(gen.runner, at_r0, cal.key_log_scale, cal.value_log_scale, cal.link, 2,
                            cal.key_bias, cal.value_bias, cal.kv_map)
    assert (got[0] - fused.logits[-1]).abs().max().item() < 1e-3
    assert (r0[0] - fused.logits[-1]).abs().max().item() > 1e-2  # the repair matters: not the r=0 student


def test_calibration_file_roundtrip_and_refusals(generator, tmp_path):
    from daser_rag.calibration import storage

    gen = generator
    spec = gen.runner.spec
    cal = _random_calibration(gen)
    path = storage.save(cal, tmp_path / "cal.safetensors")
    back = storage.load_for(path, gen.runner, gen.fingerprint)
    assert back.digest() == cal.digest() and back.link_tokens == 3 and back.fit_share == 0.0
    r15 = storage.save(_random_calibration(gen, fit_share=0.15), tmp_path / "r15.safetensors")
    assert storage.load_for(r15, gen.runner, gen.fingerprint).fit_share == 0.15
    # the regime is covered by the checksum: a file relabelled to another regime is refused
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(r15), framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(tensors, str(relabelled), metadata={**header, "fit_share": "0.0"})
    with pytest.raises(storage.CalibrationFileError, match="checksum"):
        storage.load_for(relabelled, gen.runner, gen.fingerprint)
    with pytest.raises(storage.CalibrationFileError, match="made for model"):
        storage.load_for(path, gen.runner, "another-model")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a flipped bit in the tensor data
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(storage.CalibrationFileError, match="checksum"):
        storage.load_for(bad, gen.runner, gen.fingerprint)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:50])
    with pytest.raises(storage.CalibrationFileError, match="corrupt"):
        storage.load_for(cut, gen.runner, gen.fingerprint)
    with pytest.raises(storage.CalibrationFileError, match="does not exist"):
        storage.load_for(tmp_path / "none.safetensors", gen.runner, gen.fingerprint)
    with pytest.raises(storage.CalibrationFileError, match="shape"):
        storage.load(path, fingerprint=gen.fingerprint, layers=3, kv_heads=3, hidden=576)
    with pytest.raises(storage.CalibrationFileError, match="key_bias has shape"):
        storage.load(path, fingerprint=gen.fingerprint, layers=spec.num_layers, kv_heads=spec.num_kv_heads,
                     hidden=spec.hidden_size, head_dim=spec.head_dim * 2)
    # biases are in the checksum; a file without them keeps the digest scales-only files always had
    assert torch.equal(back.key_bias, cal.key_bias) and torch.equal(back.value_bias, cal.value_bias)
    plain = _random_calibration(gen, biases=False, token_map=False)
    assert set(plain.tensors()) == {"key_log_scale", "value_log_scale", "link"}
    assert plain.digest() != _random_calibration(gen).digest()
    back_plain = storage.load_for(storage.save(plain, tmp_path / "plain.safetensors"), gen.runner, gen.fingerprint)
    assert back_plain.key_bias is None and back_plain.digest() == plain.digest()
    moved = tmp_path / "bias-edited.safetensors"
    save_file({**{k: v for k, v in cal.tensors().items()}, "value_bias": cal.value_bias + 0.01}, str(moved),
              metadata=dict(safe_open(str(path), framework="pt").metadata()))
    with pytest.raises(storage.CalibrationFileError, match="checksum"):
        storage.load_for(moved, gen.runner, gen.fingerprint)
    extra = tmp_path / "extra.safetensors"
    save_file({**cal.tensors(), "query_bias": torch.zeros(2)}, str(extra),
              metadata=dict(safe_open(str(path), framework="pt").metadata()))
    with pytest.raises(storage.CalibrationFileError, match="does not know"):
        storage.load_for(extra, gen.runner, gen.fingerprint)
    # the token map: loaded as written, in the checksum, its shape checked against the model
    assert back.kv_map is not None and torch.equal(back.kv_map, cal.kv_map)
    no_map = _random_calibration(gen, token_map=False)
    assert no_map.digest() != cal.digest() and "kv_map" not in no_map.tensors()
    header = dict(safe_open(str(path), framework="pt").metadata())
    edited = tmp_path / "map-edited.safetensors"
    save_file({**cal.tensors(), "kv_map": cal.kv_map * 1.01}, str(edited), metadata=header)
    with pytest.raises(storage.CalibrationFileError, match="checksum"):
        storage.load_for(edited, gen.runner, gen.fingerprint)
    narrow = _random_calibration(gen)
    narrow.kv_map = narrow.kv_map[:, :, :-2, :]
    wrong = storage.save(narrow, tmp_path / "map-shape.safetensors")
    with pytest.raises(storage.CalibrationFileError, match="kv_map has shape"):
        storage.load_for(wrong, gen.runner, gen.fingerprint)


def test_chunk_keys_include_chunk_side_adapters_only(generator):
    from daser_rag.kv.keys import chunk_key

    gen = generator
    ids = gen.prompt.chunk_ids("Some chunk text.")
    cal = _random_calibration(gen)
    plain = chunk_key(gen.fingerprint, gen.prompt.prefix_ids, ids)
    # placement-time adapters leave stored KV unchanged: same KV, same key
    assert chunk_key(gen.fingerprint, gen.prompt.prefix_ids, ids, adapter=cal.chunk_digest) == plain
    cal.chunk_side = True  # an adapter whose tensors change stored chunk KV
    keyed = chunk_key(gen.fingerprint, gen.prompt.prefix_ids, ids, adapter=cal.chunk_digest)
    assert keyed != plain
    other = _random_calibration(gen, seed=1)
    other.chunk_side = True
    assert chunk_key(gen.fingerprint, gen.prompt.prefix_ids, ids, adapter=other.chunk_digest) not in (plain, keyed)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_engine_uses_calibration_per_request_and_reports_it(lm, store, tmp_path):
    from daser_rag.calibration import storage
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.errors import InvalidInputError

    plain = CacheAwareGenerator(lm, store=store)
    chunks, _ = _segments(plain)
    q = "What does the pass statement do?"
    with pytest.raises(InvalidInputError, match="no calibration loaded"):
        plain.generate(q, chunks, max_new_tokens=2, calibration=True)
    assert plain.generate(q, chunks, max_new_tokens=2).calibrated is False
    path = storage.save(_random_calibration(plain), tmp_path / "cal.safetensors")
    gen = CacheAwareGenerator(lm, store=store, calibration=str(path))
    on = gen.generate(q, chunks, max_new_tokens=4, recompute_ratio=0.0)
    off = gen.generate(q, chunks, max_new_tokens=4, recompute_ratio=0.0, calibration=False)
    assert on.calibrated and not off.calibrated
    assert off.token_ids == plain.generate(q, chunks, max_new_tokens=4, recompute_ratio=0.0).token_ids
    assert not gen.generate(q, chunks, max_new_tokens=4, recompute_ratio=1.0).calibrated  # nothing reused
    assert not gen.generate(q, chunks, max_new_tokens=4, use_cache=False).calibrated
    # "auto" finds nothing in an empty cache dir; a file for another model is an error
    assert CacheAwareGenerator(lm, store=store, calibration="off").calibration is None
    other = _random_calibration(plain)
    other.fingerprint = "another-model"
    bad = storage.save(other, tmp_path / "other.safetensors")
    with pytest.raises(storage.CalibrationFileError, match="made for model"):
        CacheAwareGenerator(lm, store=store, calibration=str(bad))


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_each_request_gets_the_calibration_fitted_for_its_regime(lm, store, tmp_path):
    """Scales fitted for full reuse over-correct stale KV beside repaired tokens, so an r = 0
    calibration serves only r = 0 requests; one fitted at r > 0 serves r > 0 requests and r = 0
    ones when there is no r = 0 fit. GenerationResult.calibrated says when a request got none."""
    from daser_rag.calibration import storage
    from daser_rag.calibration.adapter import CalibrationSet
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.errors import InvalidInputError

    # the tree off: these generators share one store, and one's background nodes would serve
    # another's repeats exactly (this test is about calibration regimes, compared on blending)
    plain = CacheAwareGenerator(lm, store=store, prefix_tree="off")
    chunks, _ = _segments(plain)
    q = "What does the pass statement do?"
    r0, r15 = _random_calibration(plain, seed=1), _random_calibration(plain, seed=2, fit_share=0.15)
    only_r0 = CacheAwareGenerator(lm, store=store, prefix_tree="off", calibration=r0)
    assert only_r0.generate(q, chunks, max_new_tokens=2, recompute_ratio=0.0).calibrated
    at_r15 = only_r0.generate(q, chunks, max_new_tokens=4, recompute_ratio=0.15)
    assert not at_r15.calibrated  # not its regime: served uncalibrated, and says so
    assert at_r15.token_ids == plain.generate(q, chunks, max_new_tokens=4, recompute_ratio=0.15).token_ids
    with pytest.raises(InvalidInputError, match="no calibration fitted for recompute share 0.15"):
        only_r0.generate(q, chunks, max_new_tokens=2, recompute_ratio=0.15, calibration=True)
    only_r15 = CacheAwareGenerator(lm, store=store, prefix_tree="off", calibration=r15)
    assert only_r15.generate(q, chunks, max_new_tokens=2, recompute_ratio=0.0).calibrated
    assert only_r15.generate(q, chunks, max_new_tokens=2, recompute_ratio=0.15).calibrated
    assert not only_r15.generate(q, chunks, max_new_tokens=2, recompute_ratio=1.0).calibrated
    # `daser-rag calibrate` writes one file per regime; "auto" loads both and picks per request
    root = store.root
    storage.save(r0, storage.default_path(root, plain.fingerprint))
    storage.save(r15, storage.default_path(root, plain.fingerprint, 0.15))
    both = CacheAwareGenerator(lm, store=store, prefix_tree="off", calibration="auto")
    assert isinstance(both.calibration, CalibrationSet) and len(both.calibration.members) == 2
    assert both.calibration.pick(0.0) is not None and both.calibration.pick(0.0).fit_share == 0.0
    assert both.calibration.pick(0.3).fit_share == 0.15 and both.calibration.pick(None).fit_share == 0.15
    assert both.calibration.pick(1.0) is None
    fused = {r: both.generate(q, chunks, max_new_tokens=3, recompute_ratio=r) for r in (0.0, 0.15, 1.0)}
    assert fused[0.0].calibrated and fused[0.15].calibrated and not fused[1.0].calibrated
    with pytest.raises(storage.CalibrationFileError, match="at most one"):
        CacheAwareGenerator(lm, store=store, prefix_tree="off", calibration=[r15, _random_calibration(plain, seed=3, fit_share=0.3)])


@pytest.mark.slow
def test_calibrate_refuses_what_does_not_beat_no_adapter(lm, store, tmp_path):
    """0 steps, no link tokens and no primer leave the identity: no better than no adapter on
    held-out documents, so refused and no file is written (exit 1), while the curve still is."""
    import argparse

    from daser_rag.calibration.command import add_arguments, run
    from daser_rag.engine.generator import CacheAwareGenerator

    small = CacheAwareGenerator(lm, store=store, chunk_tokens=48)  # tiny prompts: a fast default test
    docs = python_reference_corpus(("pass", "break", "continue", "del", "return", "global"))
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--steps", "0", "--link-tokens", "0", "--no-token-map", "--primer-tokens", "0",
                          "--train-prompts", "1",
                          "--held-out-prompts", "2",
                          "--out", str(tmp_path / "cal.safetensors")])
    assert run(args, small, docs) == 1
    assert not (tmp_path / "cal.safetensors").exists()
    assert (tmp_path / "cal.curve.csv").read_text().startswith("step,batch_kl,seconds")


@pytest.mark.slow
def test_a_kl_stage_that_loses_to_the_token_map_alone_is_dropped(lm, store):
    """Scales fitted by KL on top of the token map are kept only if they beat the map alone on
    the held-out prompts; a ruinous KL stage (huge learning rate) leaves the map alone."""
    from daser_rag.calibration.train import CalibrationConfig, calibrate
    from daser_rag.engine.generator import CacheAwareGenerator

    small = CacheAwareGenerator(lm, store=store, chunk_tokens=48)
    docs = python_reference_corpus(("pass", "break", "continue", "del", "return", "global"))
    cfg = CalibrationConfig(scales=True, biases=False, steps=2, lr_scale=5.0, train_prompts=2, held_out_prompts=2,
                            fit_share=0.0, answer_tokens=4)
    rep = calibrate(small, docs, cfg)
    assert "the map alone is kept" in rep.reason
    assert rep.calibration.kv_map is not None and not rep.calibration.has_biases
    assert torch.equal(rep.calibration.key_log_scale, torch.zeros_like(rep.calibration.key_log_scale))
    assert rep.held_out_after == rep.held_out_map_only


@pytest.mark.slow
def test_trained_calibration_improves_kl_on_documents_it_never_saw(lm, store):
    """Self-distillation on some reference topics; judged on 20 prompts built only from held-out
    topics. Asserted: accepted, mean KL lower, and lower on most of the 20 prompts."""
    from daser_rag.calibration.train import CalibrationConfig, calibrate
    from daser_rag.engine.generator import CacheAwareGenerator

    small = CacheAwareGenerator(lm, store=store, chunk_tokens=160)  # ~700-token prompts: a CPU-sized run
    docs = python_reference_corpus()
    cfg = CalibrationConfig(link_tokens=4, steps=25, train_prompts=12, held_out_prompts=20, chunks_per_document=1,
                            fit_share=0.0, answer_tokens=8, primers=1)  # one primer: CI time (the default run has 4)
    rep = calibrate(small, docs, cfg)
    assert len(rep.held_out_after) == 20
    assert not set(rep.train_documents) & set(rep.held_out_documents)
    assert rep.accepted, rep.reason
    assert rep.kl_after < 0.9 * rep.kl_before, (rep.kl_before, rep.kl_after)
    assert rep.improved_share >= 0.6, rep.held_out_after


@pytest.mark.slow
def test_default_calibration_fitted_at_r015_improves_kl_there_on_documents_it_never_saw(lm, store):
    """The default run (the token map, checked at the repair requests get with it: chunk_heads
    r = 0.15) on some reference topics; judged there on 20 prompts built only from held-out topics.
    Without a map the check replays the engine's own selector (hybrid)."""
    from daser_rag.calibration.train import CalibrationConfig, calibrate
    from daser_rag.engine.generator import CacheAwareGenerator

    small = CacheAwareGenerator(lm, store=store, chunk_tokens=160)  # ~700-token prompts: a CPU-sized run
    cfg = CalibrationConfig(steps=25, train_prompts=12, held_out_prompts=20, chunks_per_document=1)
    assert cfg.fit_share == 0.15 and cfg.fit_selector == "chunk_heads" and cfg.link_tokens == 0
    assert CalibrationConfig(token_map=False).fit_selector == "hybrid"
    assert cfg.token_map and not cfg.scales and not cfg.biases  # the default: the token map alone
    rep = calibrate(small, python_reference_corpus(), cfg)
    assert len(rep.held_out_after) == 20
    assert not set(rep.train_documents) & set(rep.held_out_documents)
    assert rep.calibration.fit_share == 0.15 and rep.calibration.kv_map is not None
    assert rep.accepted, rep.reason
    assert rep.kl_after < 0.95 * rep.kl_before, (rep.kl_before, rep.kl_after)
    assert rep.improved_share >= 0.6, (rep.held_out_before, rep.held_out_after)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_deviation_ranks_staleness_not_the_calibrations_scaling(generator, monkeypatch):
    """The check layer compares fresh K/V with the stored ones before scaling: the same tokens
    are chosen with and without a calibration (it changes how they are read, not which)."""
    from daser_rag.blend import fusion
    from daser_rag.blend.config import BlendConfig

    gen = generator
    _, segs = _segments(gen)
    q = torch.tensor(gen.prompt.query_ids("What does the pass statement do?"))
    seen = []
    real = fusion.kv_deviation

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(fusion, "kv_deviation", spy)
    cfg = BlendConfig(recompute_ratio=0.15, selector="deviation")
    fusion.fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens, config=cfg)
    cal = _random_calibration(gen, fit_share=0.15)
    assert fusion.fuse(gen.runner, segs, q, exact_len=segs[0].num_tokens, config=cfg, calibration=cal).calibrated
    assert len(seen) == 2
    assert torch.allclose(seen[0], seen[1], rtol=1e-4, atol=1e-5)


def test_digest_is_memoized_but_follows_every_change():
    """The vLLM planner names a calibration by its digest on every request (6 MB hashed with a
    token map), so it is memoized; any change to a tensor (in place or replaced), the share or
    the fingerprint gives the digest of what the calibration now holds, as does the inverse."""
    import dataclasses

    from daser_rag.calibration.adapter import Calibration

    def fresh(c):
        return dataclasses.replace(c).digest()  # a copy starts with nothing memoized

    g = torch.Generator().manual_seed(3)
    c = Calibration("fp", torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(0, 8), kv_map=_random_map(2, 3, 4, g))
    d0, m0 = c.digest(), c.map_digest()
    assert c.digest() == d0 == fresh(c)
    c.kv_map.mul_(2.0)
    assert c.digest() != d0 and c.digest() == fresh(c)
    m1 = c.map_digest()
    assert m1 != m0 and m1 == dataclasses.replace(c).map_digest()
    c.key_log_scale = torch.ones(2, 3)
    assert c.digest() == fresh(c)
    assert c.map_digest() == m1  # the map's name follows the map only (premapped KV is shared)
    for field, value in (("fit_share", 0.15), ("fingerprint", "other")):
        before = c.digest()
        setattr(c, field, value)
        assert c.digest() != before and c.digest() == fresh(c)
    k, v = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    cos, sin = torch.ones(5, 4), torch.zeros(5, 4)
    bk, _ = c.unplace(0, *c.place(0, k, v, cos, sin), cos, sin)
    c.kv_map.mul_(0.5)  # the cached inverse must follow the map
    bk2, _ = c.unplace(0, *c.place(0, k, v, cos, sin), cos, sin)
    assert torch.allclose(bk, k, atol=1e-4) and torch.allclose(bk2, k, atol=1e-4)


def test_digest_and_inverse_of_inference_tensors():
    """Tensors made under inference mode (the vLLM worker loads maps there) have no version
    counter: nothing is memoized for them, and digest and unplace still work."""
    from daser_rag.calibration.adapter import Calibration

    with torch.inference_mode():
        g = torch.Generator().manual_seed(4)
        c = Calibration("fp", torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(0, 8), kv_map=_random_map(2, 3, 4, g))
        k, v = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
        cos, sin = torch.ones(5, 4), torch.zeros(5, 4)
        assert c.digest() == c.digest()
        bk, bv = c.unplace(0, *c.place(0, k, v, cos, sin), cos, sin)
        assert torch.allclose(bk, k, atol=1e-4) and torch.allclose(bv, v, atol=1e-4)
