"""Two real `vllm serve` instances sharing one real redis-server, each with its own store
directory (Redis is the only thing they share), and two daser clients that plan their requests.

KV that one instance computed is an external hit on the other; a document update or
invalidation made through either client reaches both instances: the dropped entries are never
loaded again (not from Redis, not from an instance's own RAM or disk copy), the new text is
computed by vLLM, and answers equal full prefill's wherever nothing re-positioned was loaded.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vllm is not installed in this environment (it lives in its own venv)")
pytest.importorskip("redis")

import torch

from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import UnknownDocumentError
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.kv.shared import default_namespace, open_store
from daser_rag.model.loader import load_model
from daser_rag.server.testing import RedisServer, redis_server_path
from daser_rag.types import ChunkRef, Document
from vllm_daser.env import cpu_defaults
from vllm_daser.prompts import VllmRagPrompter, kv_transfer_dict, vllm_model_dir
from vllm_daser.serve import VllmServer

if redis_server_path() is None:
    pytest.skip("redis-server not installed", allow_module_level=True)

cpu_defaults()
Q = "What does this statement do?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("vllm-redis")
    redis = RedisServer(workdir=base / "redis").start()
    lm = load_model(dtype=torch.float32)
    ns = default_namespace(lm.fingerprint)

    def client(name: str) -> VllmRagPrompter:
        store = open_store(base / f"client-{name}", redis_url=redis.url, namespace=ns, codec="fp32")
        return VllmRagPrompter(CacheAwareGenerator(lm, store=store, chunk_tokens=256), codec="fp32")

    servers = {}
    try:
        for name in ("a", "b"):
            kv = kv_transfer_dict(base / f"vllm-{name}", fingerprint=lm.fingerprint, codec="fp32", redis_url=redis.url)
            # vLLM's own prefix cache off: every cached token an answer reports came from the store
            servers[name] = VllmServer(vllm_model_dir(lm), base / f"vllm-{name}.log", kv_transfer=kv,
                                       prefix_caching=False, max_model_len=2048,
                                       extra_args=["--enable-prompt-tokens-details"]).start()
        for s in servers.values():
            s.wait_ready()
        docs = {d.doc_id.split(":")[1]: d for d in python_reference_corpus(["pass", "break", "continue", "del", "global"])}
        pa, pb = client("a"), client("b")
        yield {"a": servers["a"], "b": servers["b"], "pa": pa, "pb": pb, "docs": docs,
               "prefix": len(pa.gen.prompt.prefix_ids)}
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()


def ask(server: VllmServer, req, *, save: bool = True) -> dict:
    body = req.openai_body()
    if not save:
        plan = dict(body["kv_transfer_params"]["daser"], save=False)
        body = {**body, "kv_transfer_params": {**body["kv_transfer_params"], "daser": plan}}
    return server.complete({**body, "max_tokens": MAX_TOKENS})


def full_prefill(server: VllmServer, req) -> list[int]:
    got = server.complete({"prompt": req.openai_body()["prompt"], "max_tokens": MAX_TOKENS,
                           "kv_transfer_params": {"daser": {"off": True}}})
    assert got["cached_tokens"] in (0, None)
    return got["token_ids"]


def test_kv_computed_by_one_instance_is_a_hit_on_the_other(cluster):
    a, b, pa, docs = cluster["a"], cluster["b"], cluster["pa"], cluster["docs"]
    req = pa.reuse(Q, [docs["pass"], docs["break"]])
    assert req.prefill, "nothing is stored yet: the chunks must be computed first"
    for w in req.prefill:  # vLLM instance a computes each chunk once and saves it (to Redis too)
        a.complete({**w.openai_body(), "max_tokens": 1})
    req = pa.reuse(Q, [docs["pass"], docs["break"]])
    assert not req.prefill
    on_b = ask(b, req)  # b never saw these documents: every context token comes from Redis
    assert on_b["cached_tokens"] == req.context_tokens
    on_a = ask(a, req)
    assert on_a["cached_tokens"] == req.context_tokens
    assert on_a["token_ids"] == on_b["token_ids"]  # the same stored bytes behind both answers


def test_update_through_one_client_reaches_both_instances(cluster):
    a, b, pa, pb, docs = cluster["a"], cluster["b"], cluster["pa"], cluster["pb"], cluster["docs"]
    doc = Document("kb:continue", docs["continue"].text)
    pa.gen.add_documents([doc], precompute=False)
    old = pa.reuse(Q, [ChunkRef(doc_id=doc.doc_id)])
    for w in old.prefill:
        a.complete({**w.openai_body(), "max_tokens": 1})
    old = pa.reuse(Q, [ChunkRef(doc_id=doc.doc_id)])
    for s in (a, b):  # both instances load (and keep local copies of) the first version's KV
        assert ask(s, old)["cached_tokens"] == old.context_tokens
    # client b edits the document: the shared index switches, the old version's KV is dropped
    new_text = "Edited: " + docs["continue"].text  # a first chunk no instance has seen
    pb.gen.add_documents([Document(doc.doc_id, new_text)], precompute=False)
    new = pa.reuse(Q, [ChunkRef(doc_id=doc.doc_id)])  # client a resolves the new version at once
    assert new.openai_body()["prompt"] != old.openai_body()["prompt"]
    for s in (a, b):
        # the old plan (an in-flight or stale client) finds nothing to load: not in Redis, and
        # each instance's own copy is dropped on sight instead of served
        stale = ask(s, old, save=False)
        assert stale["cached_tokens"] == cluster["prefix"], stale
        assert stale["token_ids"] == full_prefill(s, old)
        # the new text was never computed: vLLM computes it (exact, nothing re-positioned)
        fresh = ask(s, new, save=False)
        assert fresh["cached_tokens"] == cluster["prefix"]
        assert fresh["token_ids"] == full_prefill(s, new)


def test_invalidation_through_either_client_reaches_both_instances(cluster):
    # texts no other document references: invalidating the document orphans (drops) their KV
    a, b, pa, pb, docs = cluster["a"], cluster["b"], cluster["pa"], cluster["pb"], cluster["docs"]
    for name, (who, other) in {"kb:del": (pa, pb), "kb:global": (pb, pa)}.items():
        src = docs[name.split(":")[1]]
        who.gen.add_documents([Document(name, src.text)], precompute=False)
        req = other.reuse(Q, [ChunkRef(doc_id=name)])  # the other client sees the document at once
        for w in req.prefill:
            b.complete({**w.openai_body(), "max_tokens": 1})
        req = other.reuse(Q, [ChunkRef(doc_id=name)])
        for s in (a, b):
            assert ask(s, req)["cached_tokens"] == req.context_tokens
        assert who.gen.invalidate(name)  # dropped by one client ...
        with pytest.raises(UnknownDocumentError):
            other.reuse(Q, [ChunkRef(doc_id=name)])  # ... gone for the other client
        for s in (a, b):  # ... and neither instance loads the dropped KV again
            got = ask(s, req, save=False)
            assert got["cached_tokens"] == cluster["prefix"], (name, got)
            assert got["token_ids"] == full_prefill(s, req)
