"""A plan's calibration (scales and biases) as the connector reads it (no vLLM engine needed).

Marked `vllm` so CI's vLLM step runs it; it runs in the main venv too:
    PYTHONPATH=integrations/vllm-daser python -m pytest -m vllm integrations/vllm-daser/tests/test_plan_calibration.py
"""

from __future__ import annotations

import base64
import struct

import pytest

from daser_rag.control.wire import PLAN_FIELD, plan_params

plan = pytest.importorskip("vllm_daser.plan")
pytestmark = pytest.mark.vllm

SHAPE = (2, 3, 4)
N = 2 * 3 * 4


def _floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _params(**kw: object) -> dict:
    scales = ([[1.0, 1.1, 0.9]] * 2, [[1.0, 0.8, 1.2]] * 2)
    return plan_params([["k0", 4], ["k1", 4]], scales=scales, **kw)  # type: ignore[arg-type]


def test_bias_roundtrips_exactly() -> None:
    k = [0.1 * i for i in range(N)]
    v = [-0.05 * i for i in range(N)]
    got = plan.parse_plan(_params(bias=(SHAPE, _floats(k), _floats(v))), 8)
    assert got.bias is not None and got.bias[0] == SHAPE
    assert list(struct.unpack(f"<{N}f", got.bias[1])) == pytest.approx(k)
    assert list(struct.unpack(f"<{N}f", got.bias[2])) == pytest.approx(v)
    assert plan.parse_plan(_params(), 8).bias is None  # scales only: no bias


@pytest.mark.parametrize("edit, why", [
    (lambda b: {**b, "shape": [2, 3]}, "shape"),
    (lambda b: {**b, "shape": [2, 3, 0]}, "shape"),
    (lambda b: {**b, "shape": [4096, 4096, 4096]}, "shape"),  # a bound, not a 256 GB allocation
    (lambda b: {**b, "k": b["k"][:-8]}, "'k'"),
    (lambda b: {**b, "v": "not base64!"}, "'v'"),
    (lambda b: {**b, "k": 5}, "'k'"),
    (lambda b: {**b, "k": base64.b64encode(_floats([float("nan")] * N)).decode()}, "non-finite"),
    (lambda b: {**b, "shape": [2, 2, 6]}, "same \\[layers\\]\\[kv_heads\\]"),  # does not match the scales
    (lambda b: "bias", "shape"),
])
def test_bad_bias_is_refused_with_the_reason(edit, why) -> None:
    good = _params(bias=(SHAPE, _floats([0.0] * N), _floats([0.0] * N)))
    bad = {PLAN_FIELD: {**good[PLAN_FIELD], "bias": edit(good[PLAN_FIELD]["bias"])}}
    with pytest.raises(plan.PlanError, match=why):
        plan.parse_plan(bad, 8)


def test_bias_needs_scales() -> None:
    raw = plan_params([["k0", 4]], bias=(SHAPE, _floats([0.0] * N), _floats([0.0] * N)))
    with pytest.raises(plan.PlanError, match="comes with 'scales'"):
        plan.parse_plan(raw, 8)


def test_token_map_is_named_by_digest_and_checked() -> None:
    """A token map travels as the digest of its published calibration (the map's numbers stay in
    the store directory); a malformed digest, or one without the calibration's scales, is refused."""
    digest = "0123456789abcdef" * 2
    assert plan.parse_plan(_params(token_map=digest), 8).token_map == digest
    assert plan.parse_plan(_params(), 8).token_map is None
    for bad in ("../../etc/passwd", digest[:-1], digest.upper(), 7):
        raw = _params()
        raw[PLAN_FIELD]["token_map"] = bad
        with pytest.raises(plan.PlanError, match="token_map"):
            plan.parse_plan(raw, 8)
    no_scales = plan_params([["k0", 4]], token_map=digest)
    with pytest.raises(plan.PlanError, match="scales"):
        plan.parse_plan(no_scales, 8)
