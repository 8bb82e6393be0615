"""The connector's in-engine selection consults daser's selector registry (no vLLM needed).

A selector registered in the test that needs only what the worker can gather (`ENGINE_SIGNALS`)
is accepted by a plan and scored by its own registry entry; one that needs the question's
look-ahead is refused. Runs in the main venv too:
    PYTHONPATH=integrations/vllm-daser python -m pytest integrations/vllm-daser/tests/test_selector_registry_engine.py
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from daser_rag.blend.config import BlendConfig
from daser_rag.blend.registry import Selector, Signal, Signals, register_selector, unregister_selector

plan = pytest.importorskip("vllm_daser.plan")
blend = pytest.importorskip("vllm_daser.blend")


@contextmanager
def registered(selector: Selector) -> Iterator[Selector]:
    register_selector(selector)
    try:
        yield selector
    finally:
        unregister_selector(selector.name)


def _least_deviating(signals: Signals, config: BlendConfig) -> torch.Tensor:
    assert signals.deviation is not None
    return -signals.deviation.float()


def _chunk_tails(signals: Signals, config: BlendConfig) -> torch.Tensor:
    """Rank each chunk's last tokens first (the opposite of chunk heads)."""
    n = signals.num_candidates
    ends = sorted(set(signals.chunk_starts[1:]) | {n})
    score = torch.empty(n)
    lo = 0
    for hi in ends:
        score[lo:hi] = torch.arange(lo, hi, dtype=torch.float32) - hi
        lo = hi
    return score


def _recompute(selector: str) -> dict[str, object]:
    return {plan.PLAN_FIELD: {"segments": [["a", 8]], "recompute": {"ratio": 0.2, "selector": selector}}}


def test_builtin_in_engine_selectors():
    assert tuple(plan.IN_ENGINE_SELECTORS) == ("deviation", "chunk_heads", "random")
    assert plan.parse_plan(_recompute("chunk_heads"), 8).recompute == (0.2, 1, "chunk_heads")
    with pytest.raises(plan.PlanError):
        plan.parse_plan(_recompute("hybrid"), 8)  # needs the look-ahead vLLM cannot give it
    with pytest.raises(ValueError, match="in-engine"):
        blend.engine_selector("query")


def test_registered_selectors_follow_their_signals_into_the_engine():
    with registered(Selector("calm_test", frozenset({Signal.DEVIATION}), _least_deviating)), \
            registered(Selector("look_test", frozenset({Signal.RELEVANCE}), _least_deviating)):
        assert "calm_test" in plan.IN_ENGINE_SELECTORS and "look_test" not in plan.IN_ENGINE_SELECTORS
        assert plan.parse_plan(_recompute("calm_test"), 8).recompute == (0.2, 1, "calm_test")
        with pytest.raises(plan.PlanError):
            plan.parse_plan(_recompute("look_test"), 8)
    with pytest.raises(plan.PlanError):
        plan.parse_plan(_recompute("calm_test"), 8)


def test_check_layer_choice_is_the_selectors_score():
    deviation = torch.rand(90, generator=torch.Generator().manual_seed(1))
    cacheblend = blend.check_layer_keep(blend.engine_selector("deviation"), deviation, 9, 10, 100, [10, 40, 70])
    assert torch.equal(cacheblend, torch.topk(deviation, 9).indices.sort().values)  # the pre-registry rule
    with registered(Selector("calm_test", frozenset({Signal.DEVIATION}), _least_deviating)):
        calm = blend.check_layer_keep(blend.engine_selector("calm_test"), deviation, 9, 10, 100, [10, 40, 70])
    assert torch.equal(calm, torch.topk(-deviation, 9).indices.sort().values)


def test_upfront_choice_is_the_selectors_score():
    heads = blend.chunk_head_positions(10, 100, 9, [10, 40, 70])
    assert heads.tolist() == [10, 11, 12, 40, 41, 42, 70, 71, 72]
    with registered(Selector("tails_test", frozenset({Signal.CHUNK_STARTS}), _chunk_tails)):
        assert blend.engine_selector("tails_test").name == "tails_test"
        tails = blend.upfront_positions("tails_test", 10, 100, 9, [10, 40, 70])
    assert tails.tolist() == [37, 38, 39, 67, 68, 69, 97, 98, 99]
