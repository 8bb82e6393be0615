"""The in-engine repair's two attention paths agree: vLLM's CPU paged-attention kernel (the
default on the CPU layout, reading the request's blocks) and torch attention over the loaded
K/V (the path for layouts whose kernel daser does not call). Same KV written to every layer,
for both selectors, up to fp32 rounding.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the test can capture one
real repair call (the served model, the paged caches, the request's blocks) and replay it.
"""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment (it lives in its own venv, see integrations/vllm-daser/README.md)")

import torch

from vllm_daser.env import cpu_defaults

cpu_defaults()


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    from daser_rag.corpus import python_reference_corpus
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.model.loader import load_model
    from vllm_daser import blend
    from vllm_daser.prompts import VllmRagPrompter, kv_transfer_config, vllm_model_dir

    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.setenv("DASER_VLLM_BLEND", "1")
    calls: list[tuple[tuple, dict, tuple]] = []
    real = blend.repair

    def spy(*args, **kw):
        ld = kw["loaded"] if "loaded" in kw else args[10]
        calls.append((args, dict(kw), (ld[0].clone(), ld[1].clone(), ld[2])))
        return real(*args, **kw)

    mp.setattr(blend, "repair", spy)
    store_dir = tmp_path_factory.mktemp("daser-vllm-repair")
    lm = load_model(dtype=torch.float32)
    gen = CacheAwareGenerator(lm, store=KVStore(store_dir, codec="fp32"), chunk_tokens=256,
                              prefix_tree="off")  # these tests compare blending: no exact tree nodes
    llm = vllm.LLM(model=str(vllm_model_dir(lm)), dtype="float32", max_model_len=2048, enforce_eager=True,
                   block_size=32, max_num_seqs=2, enable_prefix_caching=True,
                   kv_transfer_config=kv_transfer_config(store_dir, fingerprint=gen.fingerprint, codec="fp32"))
    p = VllmRagPrompter(gen, codec="fp32")
    docs = python_reference_corpus(["pass", "break", "continue", "del"])
    q = "Is pass useful as a placeholder?"
    for w in p.reuse(q, docs, exact_nodes=False).prefill:
        llm.generate([w.prompt], w.sampling_params(vllm.SamplingParams(max_tokens=1)), use_tqdm=False)
    out = {"run": lambda req, n: llm.generate([req.prompt], req.sampling_params(  # noqa: F821 - del'd at teardown
        vllm.SamplingParams(temperature=0.0, max_tokens=n)), use_tqdm=False)[0].outputs[0].token_ids,
           "prompter": p, "docs": docs, "q": q, "calls": calls}
    for selector in ("chunk_heads", "deviation"):
        req = p.reuse(q, docs[::-1], exact_nodes=False, recompute_ratio=0.15, selector=selector)
        assert not req.prefill
        llm.generate([req.prompt], req.sampling_params(vllm.SamplingParams(max_tokens=1)), use_tqdm=False)
        assert calls and calls[-1][1]["selector"] == selector
        out[selector] = calls[-1]
    yield real, out
    mp.undo()
    del llm


@pytest.mark.parametrize("selector", ["chunk_heads", "deviation"])
def test_paged_kernel_repair_equals_torch_attention(captured, selector):
    real, out = captured
    args, kw, ld = out[selector]
    args = list(args)
    caches, block_ids = args[3], args[4]
    written = {}
    for paged in (False, True):
        loaded = (ld[0].clone(), ld[1].clone(), ld[2])
        if len(args) > 10:
            args[10] = loaded
        else:
            kw["loaded"] = loaded
        n = real(*args, **{**kw, "paged_attention": paged})
        written[paged] = (n, [c[block_ids].clone() for c in caches])
    assert written[False][0] == written[True][0] > 0
    scale = max(float(c.abs().max()) for c in written[False][1])
    diff = max(float((a - b).abs().max()) for a, b in zip(written[False][1], written[True][1]))
    assert diff <= 1e-5 * max(scale, 1.0) * 10, (diff, scale)


def test_kernel_failure_falls_back_to_torch_attention(captured, monkeypatch):
    """Fault injected: the paged-attention kernel raises (as a vLLM build with another internal
    signature would). The worker redoes the pass with torch attention, the request completes with
    the same greedy tokens, and later repairs go straight to torch attention. Runs last: it
    switches this engine's worker to torch attention."""
    from vllm_daser import blend

    _, out = captured
    req = out["prompter"].reuse(out["q"], out["docs"][1:] + out["docs"][:1], exact_nodes=False,
                                recompute_ratio=0.15, selector="chunk_heads")
    want = out["run"](req, 8)
    calls = out["calls"]
    n0 = len(calls)

    def broken(self, *a, **k):
        raise TypeError("cpu_attention_with_kv_cache() got an unexpected keyword argument (injected)")

    monkeypatch.setattr(blend._PagedAttention, "__call__", broken)
    assert out["run"](req, 8) == want
    modes = [c[1].get("paged_attention") for c in calls[n0:]]
    assert modes == [None, False], modes  # tried the kernel, then torch attention
    assert out["run"](req, 8) == want
    assert calls[-1][1].get("paged_attention") is False


def test_check_layer_ranks_stored_values_under_a_calibration(captured, monkeypatch):
    """With a calibration the worker places loaded V as v * s + b; the in-engine check layer must
    rank how stale tokens are, not what the calibration did: given the connector's undo
    (`DaserConnectorWorker._stored_value`), the deviation it ranks by is the uncalibrated one."""
    from vllm_daser import blend
    from vllm_daser.connector import DaserConnectorWorker, LoadSpec

    real, out = captured
    args, kw, ld = out["deviation"]
    args = list(args)
    exact_len, first = args[6], ld[2]
    seen: list[torch.Tensor] = []
    real_keep = blend.check_layer_keep

    def spy(sel, deviation, *a, **k):
        seen.append(deviation.clone())
        return real_keep(sel, deviation, *a, **k)

    monkeypatch.setattr(blend, "check_layer_keep", spy)
    layers, heads, _, d = ld[1].shape
    g = torch.Generator().manual_seed(3)
    vs = (0.3 * torch.randn(layers, heads, generator=g)).exp()
    vb = 0.2 * torch.randn(layers, heads, d, generator=g)
    spec = LoadSpec("r", [], [], 0, 0, [], scales=(torch.ones(layers, heads).tolist(), vs.tolist()),
                    bias=((layers, heads, d), torch.zeros(layers, heads, d).numpy().tobytes(),
                          vb.numpy().astype("<f4").tobytes()))
    undo = DaserConnectorWorker._stored_value(spec)
    assert undo is not None

    def replay(placed: bool, stored_value=None) -> torch.Tensor:
        V = ld[1].clone()
        if placed:
            cut = max(0, exact_len - first)
            V[:, :, cut:] = V[:, :, cut:] * vs[:, :, None, None].to(V.dtype) + vb[:, :, None, :].to(V.dtype)
        loaded = (ld[0].clone(), V, first)
        a = list(args)
        if len(a) > 10:
            a[10] = loaded
            real(*a, **{**kw, "paged_attention": False, "stored_value": stored_value})
        else:
            real(*a, **{**kw, "loaded": loaded, "paged_attention": False, "stored_value": stored_value})
        return seen[-1]

    plain = replay(False)
    undone = replay(True, undo)
    raw = replay(True)
    assert torch.allclose(undone, plain, rtol=1e-4, atol=1e-6), float((undone - plain).abs().max())
    assert not torch.allclose(raw, plain, rtol=1e-2)  # without the undo it ranks the calibration
