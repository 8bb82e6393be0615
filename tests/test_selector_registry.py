"""Adding a selector is one registration: a selector defined here, in the test, is accepted by
every validator and runs through fusion, which gathers exactly the signals it declares.

The built-ins' behaviour is pinned elsewhere (tests/test_selectors.py, tests/test_fusion_exactness.py);
this file checks the registry's contract.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from daser_rag.blend.config import BlendConfig
from daser_rag.blend.registry import (
    SELECTOR_REGISTRY,
    AdaptiveBudget,
    Selector,
    Signal,
    Signals,
    register_adaptive_budget,
    register_selector,
    selectors_using_only,
    unregister_selector,
)
from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import InvalidInputError
from daser_rag.params import SELECTORS, GenerationParams, check_recompute_ratio, check_selector


@contextmanager
def registered(selector: Selector) -> Iterator[Selector]:
    register_selector(selector)
    try:
        yield selector
    finally:
        unregister_selector(selector.name)


class Recorder:
    """A score function that ranks later candidates higher (picks the tail of the context) and
    records which signals fusion handed it."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool, int]] = []

    def __call__(self, signals: Signals, config: BlendConfig) -> torch.Tensor:
        self.seen.append((signals.relevance is not None, signals.deviation is not None, signals.num_candidates))
        return torch.arange(signals.num_candidates, dtype=torch.float32)


@pytest.fixture
def generator(lm, store):
    from daser_rag.engine.generator import CacheAwareGenerator

    return CacheAwareGenerator(lm, store=store, chunk_tokens=64)  # three small chunks: quick


def _chunks(gen):
    return [gen.split(d.text)[0] for d in python_reference_corpus(("pass", "break", "continue"))]


def test_builtins_are_registered_in_their_documented_order():
    assert tuple(SELECTORS) == ("deviation", "query", "hybrid", "chunk_heads", "random")
    assert SELECTOR_REGISTRY["hybrid"].signals == {Signal.RELEVANCE, Signal.DEVIATION}
    assert SELECTOR_REGISTRY["deviation"].signals == {Signal.DEVIATION}
    assert SELECTOR_REGISTRY["query"].signals == {Signal.RELEVANCE}
    assert SELECTOR_REGISTRY["chunk_heads"].signals == {Signal.CHUNK_STARTS}
    assert SELECTOR_REGISTRY["random"].signals == frozenset()


def test_a_registered_selector_is_accepted_by_every_validator_and_refused_after():
    sel = Selector("tail_test", frozenset({Signal.RELEVANCE}), Recorder())
    with registered(sel):
        assert "tail_test" in SELECTORS
        assert check_selector("tail_test") == "tail_test"
        assert GenerationParams(selector="tail_test").selector == "tail_test"
        assert GenerationParams.from_kwargs(selector="tail_test", recompute_ratio=0.3).selector == "tail_test"
        cfg = BlendConfig(selector="tail_test")
        assert cfg.needs_query_signal and not cfg.needs_deviation
        assert cfg.with_request(selector="hybrid").selector == "hybrid"
    assert "tail_test" not in SELECTORS
    with pytest.raises(InvalidInputError, match="selector must be one of"):
        GenerationParams(selector="tail_test")
    with pytest.raises(ValueError, match="selector"):
        BlendConfig(selector="tail_test")


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_selector(Selector("hybrid", frozenset(), Recorder()))
    with pytest.raises(ValueError, match="name"):
        Selector("Bad Name", frozenset(), Recorder())
    with pytest.raises(ValueError):
        Selector("no_such_signal", frozenset({"telepathy"}), Recorder())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DEVIATION"):
        register_adaptive_budget(AdaptiveBudget("late", frozenset({Signal.DEVIATION}), lambda s, c: 0.1,
                                                lambda c: False))


def test_one_ratio_validator_and_default_for_params_and_blend_config():
    from daser_rag.params import DEFAULT_RECOMPUTE_RATIO, DEFAULT_SELECTOR

    assert BlendConfig().recompute_ratio == DEFAULT_RECOMPUTE_RATIO == 0.15
    assert BlendConfig().selector == DEFAULT_SELECTOR
    for good in (0, 1, 0.5, "auto"):
        assert BlendConfig(recompute_ratio=good).recompute_ratio == check_recompute_ratio(good)
        assert GenerationParams(recompute_ratio=good).recompute_ratio == check_recompute_ratio(good)
    for bad in (1.5, -0.1, "most", True, float("nan"), "AUTO"):
        with pytest.raises(InvalidInputError, match="recompute_ratio must be a number in"):
            BlendConfig(recompute_ratio=bad)
        with pytest.raises(InvalidInputError, match="recompute_ratio must be a number in"):
            GenerationParams(recompute_ratio=bad)


def test_in_engine_view_follows_the_declared_signals():
    engine = selectors_using_only({Signal.CHUNK_STARTS, Signal.DEVIATION})
    assert tuple(engine) == ("deviation", "chunk_heads", "random")
    with registered(Selector("calm_test", frozenset({Signal.DEVIATION}), Recorder())), \
            registered(Selector("look_test", frozenset({Signal.RELEVANCE}), Recorder())):
        assert "calm_test" in engine and "look_test" not in engine
    assert "calm_test" not in engine


@pytest.mark.parametrize("signals", [frozenset({Signal.RELEVANCE}), frozenset({Signal.DEVIATION}),
                                     frozenset({Signal.CHUNK_STARTS})])
def test_a_test_selector_runs_through_fusion_with_exactly_its_signals(generator, monkeypatch, signals):
    """Fusion runs the look-ahead only for RELEVANCE and the check-layer pass only for DEVIATION;
    the selector's own score decides which tokens are recomputed (here: the context's tail)."""
    from daser_rag.blend import fusion

    chunks = _chunks(generator)
    q = "What does the pass statement do?"
    calls = {"lookahead": 0, "check": 0}
    real_look, real_check = fusion._lookahead, fusion._recompute_from_check

    def look(*a, **k):
        calls["lookahead"] += 1
        return real_look(*a, **k)

    def check(*a, **k):
        calls["check"] += 1
        return real_check(*a, **k)

    monkeypatch.setattr(fusion, "_lookahead", look)
    monkeypatch.setattr(fusion, "_recompute_from_check", check)
    rec = Recorder()
    with registered(Selector("tail_test", signals, rec)):
        res = generator.generate(q, chunks, max_new_tokens=2, recompute_ratio=0.2, selector="tail_test")
        assert res.selector == "tail_test" and res.mode == "blend"
        reuse, _ = generator.prefill(q, chunks, recompute_ratio=0.0)
        calls.update(lookahead=0, check=0)
        rec.seen.clear()
        fused, _ = generator.prefill(q, chunks, recompute_ratio=0.2, selector="tail_test")
        ran = dict(calls)
        full, _ = generator.prefill(q, chunks, use_cache=False)
        one, _ = generator.prefill(q, chunks, recompute_ratio=1.0, selector="tail_test")

    wants_rel, wants_dev = Signal.RELEVANCE in signals, Signal.DEVIATION in signals
    assert ran == {"lookahead": int(wants_rel), "check": int(wants_dev)}
    assert reuse.exact_tokens == fused.exact_tokens < fused.context_tokens
    cand = fused.context_tokens - fused.exact_tokens
    n_sel = math.ceil(0.2 * cand)
    assert rec.seen[0] == (wants_rel, wants_dev, cand)
    assert fused.selector == "tail_test" and fused.recomputed_tokens == n_sel

    # the tail was recomputed, the rest kept its stored (re-positioned) KV
    ctx, keep_end = fused.context_tokens, fused.context_tokens - n_sel
    for layer in (2, generator.runner.spec.num_layers - 1):
        k_f, v_f = fused.cache.view(layer, ctx)
        k_r, v_r = reuse.cache.view(layer, ctx)
        assert torch.equal(k_f[:, fused.exact_tokens:keep_end], k_r[:, fused.exact_tokens:keep_end])
        assert torch.equal(v_f[:, fused.exact_tokens:keep_end], v_r[:, fused.exact_tokens:keep_end])
        assert not torch.equal(v_f[:, keep_end:ctx], v_r[:, keep_end:ctx])

    # r=1 with any registered selector is full prefill
    assert (one.logits - full.logits).abs().max().item() < 1e-3
