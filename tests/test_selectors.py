"""Every selector: r=1 equals full prefill (logits and KV); auto stays within its floor and cap;
the generation result reports the selector and the share it chose."""

import math

import pytest
import torch

from daser_rag.blend.config import BlendConfig
from daser_rag.blend.selectors import Signals, auto_share, select
from daser_rag.corpus import python_reference_corpus
from daser_rag.params import SELECTORS, GenerationParams


@pytest.fixture
def generator(lm, store):
    """128-token chunks: three chunks and a question, ~450 tokens, keep these checks quick."""
    from daser_rag.engine.generator import CacheAwareGenerator

    return CacheAwareGenerator(lm, store=store, chunk_tokens=128)


def _chunks(gen, topics=("pass", "break", "continue")):
    return [gen.split(d.text)[0] for d in python_reference_corpus(topics)]


@pytest.mark.parametrize("selector", SELECTORS)
def test_r1_equals_full_prefill_for_every_selector(generator, selector):
    chunks = _chunks(generator)
    q = "What does the pass statement do?"
    full, _ = generator.prefill(q, chunks, use_cache=False)
    fused, info = generator.prefill(q, chunks, recompute_ratio=1.0, selector=selector)
    assert fused.recomputed_tokens == fused.context_tokens - fused.exact_tokens > 0
    assert fused.selector == selector
    assert (fused.logits - full.logits).abs().max().item() < 1e-3
    for i in range(generator.runner.spec.num_layers):
        k1, v1 = fused.cache.view(i, fused.cache.length)
        k2, v2 = full.cache.view(i, full.cache.length)
        assert (k1 - k2).abs().max().item() < 1e-3 and (v1 - v2).abs().max().item() < 1e-3


@pytest.mark.parametrize("selector", SELECTORS)
def test_share_is_what_was_asked(generator, selector):
    chunks = _chunks(generator)
    fused, _ = generator.prefill("What does break do?", chunks, recompute_ratio=0.2, selector=selector)
    cand = fused.context_tokens - fused.exact_tokens
    assert fused.recomputed_tokens == math.ceil(0.2 * cand)


def test_r0_query_lookahead_equals_plain_full_reuse(generator):
    chunks = _chunks(generator)
    q = "What does continue do?"
    plain, _ = generator.prefill(q, chunks, recompute_ratio=0.0)
    cfg = BlendConfig(recompute_ratio="auto", selector="query", auto_floor=0.0, auto_cap=0.0)
    look, _ = generator.prefill(q, chunks, blend=cfg)
    assert look.recomputed_tokens == 0
    assert (look.logits - plain.logits).abs().max().item() < 1e-4


def test_lookahead_stops_after_its_last_query_layer_without_changing_the_result(generator, monkeypatch):
    """With `query_layers` ending at layer 9 the look-ahead runs layers 0-9 only; the selection,
    logits and every layer's KV are exactly those of a look-ahead through all layers."""
    from daser_rag.blend import fusion

    chunks = _chunks(generator)
    q = "What does the pass statement do?"
    cfg = BlendConfig(recompute_ratio=0.15, selector="hybrid", query_layers=tuple(range(10)))
    depths: list[int] = []
    real = fusion._lookahead

    def spy(*args, **kw):
        logits, rel = real(*args, **kw)
        depths.append(generator.runner.spec.num_layers if logits is not None else max(cfg.query_layers) + 1)
        return logits, rel

    monkeypatch.setattr(fusion, "_lookahead", spy)
    short, _ = generator.prefill(q, chunks, blend=cfg)
    monkeypatch.setattr(fusion, "_lookahead", lambda *a, **k: spy(*a[:6], need_logits=True))
    full_depth, _ = generator.prefill(q, chunks, blend=cfg)
    assert depths == [10, generator.runner.spec.num_layers]
    assert short.recomputed_tokens == full_depth.recomputed_tokens > 0
    assert torch.equal(short.logits, full_depth.logits)
    for i in range(generator.runner.spec.num_layers):
        assert all(torch.equal(a, b) for a, b in zip(short.cache.view(i, short.cache.length),
                                                     full_depth.cache.view(i, full_depth.cache.length)))


def test_auto_stays_within_floor_and_cap(generator):
    chunks = _chunks(generator)
    for floor, cap in ((0.05, 0.3), (0.2, 0.25), (0.1, 0.9)):
        cfg = BlendConfig(recompute_ratio="auto", selector="query", auto_floor=floor, auto_cap=cap)
        fused, _ = generator.prefill("Which statement does nothing?", chunks, blend=cfg)
        assert floor - 1e-9 <= fused.target_share <= cap + 1e-9
        assert floor - 0.01 <= fused.recompute_share <= cap + 0.01


def test_auto_share_tracks_how_focused_attention_is():
    n = 1000
    focused = torch.zeros(n)
    focused[:10] = 1.0
    diffuse = torch.ones(n)
    assert auto_share(focused, 0.8, 0.05, 0.5) == 0.05  # 8 tokens hold 80%: the floor applies
    assert auto_share(diffuse, 0.8, 0.05, 0.5) == 0.5  # 800 tokens needed: the cap applies
    mid = torch.cat([torch.full((100,), 30.0), torch.ones(900)])  # 80% of the mass: 220 tokens
    assert 0.05 < auto_share(mid, 0.8, 0.05, 0.5) < 0.5


def test_chunk_heads_are_forced_in_and_count_against_the_budget():
    rel = torch.zeros(100)
    rel[50:60] = 1.0
    sig = Signals(100, relevance=rel, chunk_starts=[0, 40])
    idx = select(BlendConfig(selector="query", chunk_heads=4), sig, 12).tolist()
    assert len(idx) == 12 and {0, 1, 2, 3, 40, 41, 42, 43} <= set(idx)


def test_per_chunk_budget_takes_the_same_share_of_every_chunk():
    rel = torch.zeros(100)
    rel[50:100] = torch.linspace(1.0, 2.0, 50)  # the global top share would all come from chunk 2
    sig = Signals(100, relevance=rel, chunk_starts=[0, 50])
    assert set(select(BlendConfig(selector="query"), sig, 10).tolist()) <= set(range(50, 100))
    idx = select(BlendConfig(selector="query", budget="per_chunk"), sig, 10).tolist()
    assert len([i for i in idx if i < 50]) == 5 and len([i for i in idx if i >= 50]) == 5
    assert set(i for i in idx if i >= 50) == set(range(95, 100))  # each chunk's own best


@pytest.mark.parametrize("variant", [{"funnel": 2.0}, {"budget": "per_chunk"}, {"funnel": 3.0, "chunk_heads": 2}])
def test_funnel_and_per_chunk_keep_the_budget_and_r1_exactness(generator, variant):
    chunks = _chunks(generator)
    q = "What does the pass statement do?"
    cfg = BlendConfig(recompute_ratio=0.2, selector="hybrid", **variant)
    fused, _ = generator.prefill(q, chunks, blend=cfg)
    cand = fused.context_tokens - fused.exact_tokens
    assert fused.recomputed_tokens == math.ceil(0.2 * cand)
    full, _ = generator.prefill(q, chunks, use_cache=False)
    one, _ = generator.prefill(q, chunks, blend=BlendConfig(recompute_ratio=1.0, selector="hybrid", **variant))
    assert (one.logits - full.logits).abs().max().item() < 1e-3


def test_blend_config_rejects_bad_budget_and_funnel():
    with pytest.raises(ValueError, match="budget"):
        BlendConfig(budget="per_layer")
    with pytest.raises(ValueError, match="funnel"):
        BlendConfig(funnel=0.5)


def test_generation_result_reports_selector_and_share(generator):
    chunks = _chunks(generator)
    res = generator.generate("What does pass do?", chunks, max_new_tokens=2, recompute_ratio=0.3, selector="query")
    assert res.mode == "blend" and res.selector == "query" and res.recompute_ratio == 0.3
    assert res.recomputed_tokens > 0 and 0.29 < res.recompute_share < 0.32
    res = generator.generate("What does pass do?", chunks, max_new_tokens=2, recompute_ratio=0.0)
    assert res.selector == "none" and res.recomputed_tokens == 0


def test_no_context_is_reported_as_full_prefill(generator):
    res = generator.generate("What is 2 + 2?", [], max_new_tokens=2)
    assert res.mode == "full" and res.cache_hits == 0 and res.reused_tokens == 0 and res.selector == "none"


@pytest.mark.parametrize("bad", [{"max_new_tokens": "3"}, {"max_new_tokens": True}, {"recompute_ratio": 1.5},
                                 {"recompute_ratio": "most"}, {"selector": "magic"}, {"temperature": "0"},
                                 {"top_p": 0}, {"stop": [1]}, {"nonsense": 1}])
def test_generation_params_are_strict(bad):
    from daser_rag.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        GenerationParams.from_kwargs(**bad)

