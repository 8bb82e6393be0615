"""`daser-rag serve --engine vllm` end to end: the control plane in front of two real `vllm serve`
instances (spawned by the service itself, in the vLLM venv) and a real redis-server.

Asserted: exact reuse gives full prefill's greedy tokens; in-engine repair at r=1 does too;
results report vLLM's own count of reused tokens (a request without reuse says "full"); an
update through a LlamaIndex index and through the document API is never answered from old KV;
the control plane holds no weight tensors and stays under 500 MB RSS; one instance killed
mid-trace costs zero failed requests. Runs in the project venv (`-m vllm`); skipped when the
vLLM venv is missing (integrations/vllm-daser/scripts/setup_vllm_venv.sh).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from daser_rag.control.spawn import default_vllm_python
from daser_rag.server.testing import RedisServer, free_port, redis_server_path

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not default_vllm_python().exists(), reason="no vLLM venv (setup_vllm_venv.sh)"),
              pytest.mark.skipif(redis_server_path() is None, reason="no redis-server")]

LIGHTHOUSE = ("The Corran lighthouse was built in 1871 by the engineer Mary Tulloch. Its lamp is visible for "
              "19 nautical miles and was converted to electricity in 1956.")
COPPER = ("Copper is a soft, malleable metal with very high thermal and electrical conductivity. Most copper is "
          "used in electrical wire, roofing and plumbing.")
ORCHARD = ("The Hallow orchard grows forty varieties of apple. Its oldest tree, a russet, was planted in 1790 "
           "and still fruits every second autumn.")
MAX = 16


@contextmanager
def control_plane(base: Path, spawn: int = 2, args: tuple[str, ...] = ()) -> Iterator[dict]:
    """`serve --engine vllm` with `spawn` instances and a redis-server, all under `base`; taken
    down with SIGKILL at the end, which must take its vLLM servers down too (asserted)."""
    redis = RedisServer(workdir=base / "redis").start()
    port = free_port()
    cmd = [sys.executable, "-m", "daser_rag.server", "--engine", "vllm", "--vllm-spawn", str(spawn), "--redis-url",
           redis.url, "--cache-dir", str(base / "cache"), "--port", str(port), "--chunk-tokens", "256",
           "--max-pending", "16", "--log-level", "warning", *args]
    log = open(base / "service.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, (base / "service.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("control plane not ready in 900 s")
        spawned = [i["pid"] for i in httpx.get(url + "/health").json()["engine"]["instances"]]
        yield {"url": url, "pid": proc.pid, "base": base, "redis": redis}
        # A control plane that dies without cleaning up (SIGKILL) still takes its vLLM servers down.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(_alive(p) for p in spawned):
            time.sleep(1)
        assert not any(_alive(p) for p in spawned), "spawned vllm serve outlived the control plane"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        redis.stop()


@pytest.fixture(scope="module")
def plane(tmp_path_factory, lm):  # lm: the model loaded once here makes the HF copy vLLM serves
    with control_plane(tmp_path_factory.mktemp("control-plane")) as p:
        yield p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is gone


def chat(url: str, question: str, docs: list[dict], **kw) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "documents": docs, "max_tokens": MAX,
            "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_reports_each_instance_and_its_self_check(plane):
    h = httpx.get(plane["url"] + "/health").json()
    assert h["status"] == "ok" and h["engine"]["kind"] == "vllm"
    inst = h["engine"]["instances"]
    long = " ".join(["word"] * 2100)  # more than the instances' --max-model-len 2048
    r = httpx.post(plane["url"] + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Why?"}], "documents": [{"text": long}], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert len(inst) == 2 and all(i["healthy"] and i["version"].startswith("0.32") for i in inst)
    assert all(i["self_check"] == {"store": True, "exact_reuse": True, "recompute": True} for i in inst), inst


def test_control_plane_holds_no_weights_and_stays_small(plane):
    status = Path(f"/proc/{plane['pid']}/status").read_text()
    rss_mb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024
    maps = Path(f"/proc/{plane['pid']}/maps").read_text()
    assert rss_mb < 500, rss_mb
    assert ".safetensors" not in maps and ".gguf" not in maps  # no weight file mapped


def test_ingest_through_vllm_then_exact_and_repaired_reuse_equal_full_prefill(plane):
    url = plane["url"]
    r = httpx.post(url + "/v1/documents", json={"documents": [
        {"id": "light", "text": LIGHTHOUSE}, {"id": "copper", "text": COPPER}]}, timeout=300)
    assert r.status_code == 200, r.text
    rep = r.json()["report"]
    assert rep["computed_chunks"] == 2 and rep["chunks"] == 2
    q = "Who built the Corran lighthouse?"
    # one document: its chunk sits where it was computed, so reuse is exact
    full1 = chat(url, q, [{"id": "light"}], use_cache=False)
    hit1 = chat(url, q, [{"id": "light"}])
    assert full1["daser"]["mode"] == "full" and full1["daser"]["reused_tokens"] == 0
    assert hit1["daser"]["mode"] == "blend" and hit1["daser"]["cache_hits"] == 1
    assert hit1["daser"]["exact_tokens"] == hit1["daser"]["context_tokens"]  # vLLM loaded all of it
    assert hit1["daser"]["token_ids"] == full1["daser"]["token_ids"]
    # two documents: the second is re-positioned; recomputing every token is full prefill again
    full2 = chat(url, q, [{"id": "copper"}, {"id": "light"}], use_cache=False)
    r1 = chat(url, q, [{"id": "copper"}, {"id": "light"}], recompute_ratio=1.0)
    assert r1["daser"]["recomputed_tokens"] > 0 and r1["daser"]["token_ids"] == full2["daser"]["token_ids"]
    default = chat(url, q, [{"id": "copper"}, {"id": "light"}])
    assert default["daser"]["selector"] == "chunk_heads" and 0 < default["daser"]["recomputed_tokens"]


def test_update_is_never_answered_from_old_kv(plane):
    url = plane["url"]
    q = "How many varieties of apple does the Hallow orchard grow?"
    assert httpx.put(url + "/v1/documents/orchard", json={"text": ORCHARD}, timeout=300).status_code == 200
    old = httpx.get(url + "/v1/documents/orchard").json()["chunk_keys"]
    for _ in range(3):  # both instances see the document
        chat(url, q, [{"id": "copper"}, {"id": "orchard"}])
    new_text = ORCHARD.replace("forty", "sixty-three")
    r = httpx.put(url + "/v1/documents/orchard", json={"text": new_text}, timeout=300)
    assert r.status_code == 200 and r.json()["document"]["version"] == 2
    new = httpx.get(url + "/v1/documents/orchard").json()["chunk_keys"]
    assert set(new).isdisjoint(old)
    full = chat(url, q, [{"text": new_text}], use_cache=False)
    for _ in range(4):
        got = chat(url, q, [{"id": "orchard"}])
        assert got["daser"]["chunk_keys"] == new and got["daser"]["token_ids"] == full["daser"]["token_ids"]
    import redis as redis_lib

    client = redis_lib.Redis.from_url(plane["redis"].url)
    assert not any(client.keys(f"*:kv:{k}") for k in old)  # the old chunk KV is gone from the shared tier
    assert all(client.keys(f"*:kv:{k}") for k in new)


VAULT_V1 = "Harbor Bank notes. The vault at the Harbor Bank opens with the code 4172. Staff arrive at eight."
VAULT_V2 = "Harbor Bank notes. The vault at the Harbor Bank opens with the code 9035. Staff arrive at eight."
FERRY = "Ferry notes. The ferry to Gull Island leaves every day at 7 in the morning from pier two."
VAULT_Q = "What is the code of the vault at the Harbor Bank?"


def test_llama_index_query_engine_through_the_control_plane(plane, monkeypatch):
    pytest.importorskip("llama_index.core")
    pytest.importorskip("faiss")
    from llama_index.core import Document as LIDocument
    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.llms.daser import DASER_KEY, CacheAwareSynthesizer, DaserLLM, KVPrecomputeTransform, MiniLMEmbedding
    from llama_index.vector_stores.daser import InvalidatingFaissVectorStore

    from daser_rag.server.client import DaserClient
    from daser_rag.types import ChunkRef

    client = DaserClient(plane["url"], timeout=300)
    embed = MiniLMEmbedding()
    store = InvalidatingFaissVectorStore(generator=client)
    transform = KVPrecomputeTransform(client, show_progress=False)
    pipe = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=200, chunk_overlap=0), embed, transform],
                             docstore=SimpleDocumentStore(), vector_store=store,
                             docstore_strategy=DocstoreStrategy.UPSERTS)
    pipe.run(documents=[LIDocument(text=VAULT_V1, id_="li-vault"), LIDocument(text=FERRY, id_="li-ferry")])
    # index time: the transform had vLLM compute every node's chunk KV (POST /v1/chunks on the control plane)
    report = transform.reports[0]
    assert report.deferred == 0 and report.nodes == len(report.keys) >= 2 and report.computed == len(set(report.keys))
    assert all(client.stored(report.keys)) and set(client.document_keys("li-vault")) <= set(report.keys)
    llm = DaserLLM(client, max_new_tokens=MAX)
    monkeypatch.setattr(Settings, "_llm", llm)
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
    qe = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=1),
                                        response_synthesizer=CacheAwareSynthesizer(llm))
    first = qe.query(VAULT_Q)  # the FIRST query: every chunk was stored at index time
    meta = first.metadata[DASER_KEY]
    assert meta["cache_misses"] == 0
    node = first.source_nodes[0].node
    full = client.generate(VAULT_Q, [ChunkRef(text=node.get_content(), doc_id=node.ref_doc_id)], use_cache=False,
                           max_new_tokens=MAX)
    assert meta["mode"] == "blend" and meta["cache_hits"] == 1
    assert meta["exact_tokens"] == meta["context_tokens"]  # one chunk, where it was computed: exact
    assert str(first).strip() == full.text.strip() and "4172" in str(first)
    old_keys = meta["chunk_keys"]
    pipe.run(documents=[LIDocument(text=VAULT_V2, id_="li-vault"), LIDocument(text=FERRY, id_="li-ferry")])
    for _ in range(3):  # whichever instance answers, it answers from the new text
        again = qe.query(VAULT_Q)
        assert "9035" in str(again) and set(again.metadata[DASER_KEY]["chunk_keys"]).isdisjoint(old_keys)


def test_langchain_chain_through_the_control_plane(plane):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document as LCDocument

    from daser_rag.server.client import DaserClient
    from langchain_daser import ChatDaser, DaserRetriever, DaserVectorStore, MiniLMEmbeddings, create_daser_rag_chain

    client = DaserClient(plane["url"], timeout=300)
    store = DaserVectorStore(client, embedding=MiniLMEmbeddings())
    store.add_documents([LCDocument(page_content=VAULT_V1), LCDocument(page_content=FERRY)], ids=["lc-vault", "lc-ferry"])
    retriever = DaserRetriever.from_vectorstore(store, k=2)
    full = create_daser_rag_chain(retriever, ChatDaser(generator=client, max_tokens=MAX, use_cache=False))
    exact = create_daser_rag_chain(retriever, ChatDaser(generator=client, max_tokens=MAX, recompute_ratio=1.0))
    ref, got = full.invoke(VAULT_Q), exact.invoke(VAULT_Q)
    assert ref.response_metadata["daser"]["mode"] == "full"
    assert got.response_metadata["daser"]["mode"] == "blend"
    assert got.response_metadata["daser"]["token_ids"] == ref.response_metadata["daser"]["token_ids"]
    assert "4172" in got.content


def connector_stats(instance_url: str) -> dict:
    """The instance connector's own report (a stats message: one-token completion whose answer
    carries it in kv_transfer_params), as of the instance's last engine step."""
    from daser_rag.control.wire import STATS_FIELD, STATS_PARAMS

    r = httpx.post(instance_url + "/v1/completions", timeout=60, json={
        "model": "daser", "prompt": [0], "max_tokens": 1, "kv_transfer_params": STATS_PARAMS})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"][STATS_FIELD]["workers"][0]


def test_queued_requests_are_routed_and_prefetched_on_their_instance(plane):
    """PCR on the product path: a request is routed when it is queued and its instance's connector
    may load its chunks into host RAM (the control plane's prefetch message for a request waiting
    there, or the request's own on arrival when vLLM's slots are full); after the trace nothing is
    pinned and no routed work is left over,
    also for a full-prefill request (use_cache=false: it loads nothing, so its pin is released by
    the control plane; it leaked until the ttl before)."""
    url = plane["url"]
    r = httpx.post(url + "/v1/documents", timeout=300, json={"documents": [
        {"id": "pf-light", "text": LIGHTHOUSE + " Keepers log the weather."}, {"id": "pf-orchard", "text": ORCHARD}]})
    assert r.status_code == 200, r.text
    orders = [[{"id": "pf-light"}, {"id": "pf-orchard"}], [{"id": "pf-orchard"}, {"id": "pf-light"}]]
    n = 8  # 4 at a time (the service's fair share per caller admits that many)
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda i: httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "What is copper used for?"}], "documents": orders[i % 2],
            "max_tokens": 4, "temperature": 0, "use_cache": i != 3}).status_code, range(n)))
    assert codes == [200] * n
    eng = httpx.get(url + "/health").json()["engine"]
    assert eng["prefetch"]["reserved"] >= n and eng["prefetch"]["reserved_now"] == 0
    assert all(i["inflight"] == 0 and i["prefill_tokens"] == 0 for i in eng["instances"]), eng["instances"]
    claimed = requested = 0
    for inst in eng["instances"]:
        for _ in range(20):  # a pin released at a request's end reaches the worker with the next step
            rep = connector_stats(inst["url"])["prefetch"]
            if rep["pinned_requests"] == 0:
                break
            time.sleep(0.3)
        assert rep["pinned_requests"] == 0 and rep["pinned_keys"] == 0, (rep["pins"], rep["counters"], eng["prefetch"])
        requested += rep["counters"]["requested"]
        claimed += rep["counters"]["claimed"]
    # whether a prefetch happens depends on waiting (vLLM's slots full, or 20 ms at the control
    # plane); test_vllm_prefetch.py asserts what one does. Every pin that was made has ended.
    assert claimed <= requested


def test_one_instance_killed_mid_trace_fails_no_request(plane):
    url = plane["url"]
    inst = httpx.get(url + "/health").json()["engine"]["instances"]
    questions = ["Who built the Corran lighthouse?", "What is copper used for?", "When was the lamp converted?",
                 "Which metal conducts electricity?"] * 6

    def ask(i: int) -> int:
        docs = [{"id": "light"}, {"id": "copper"}] if i % 2 else [{"id": "copper"}, {"id": "light"}]
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": questions[i]}], "documents": docs, "max_tokens": 48,
            "temperature": 0})
        return r.status_code

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(len(questions))]
        while sum(f.done() for f in futures) < 2:  # the trace is under way on both instances
            time.sleep(0.2)
        os.killpg(inst[0]["pid"], signal.SIGKILL)
        unfinished = sum(not f.done() for f in futures)
        codes = [f.result() for f in futures]
    assert unfinished >= 4, unfinished  # the kill really was mid-trace
    assert codes == [200] * len(questions)
    deadline = time.monotonic() + 15  # the health monitor notices within a few seconds
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()["engine"]["instances"]
        if not h[0]["healthy"]:
            break
        time.sleep(0.5)
    assert not h[0]["healthy"] and h[1]["healthy"]
