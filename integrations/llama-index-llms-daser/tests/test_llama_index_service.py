"""LlamaIndex pointed at a real `daser-rag serve` (embedded engine, a child process on 127.0.0.1)
through DaserClient: the KV-precompute transform and the vector store compute every node's chunk
KV at index time on the service (engine protocol, /v1/chunks), so it is stored BEFORE any query
and the first query reads every chunk (0 misses); an update or a delete drops exactly the stale
KV (the edited/deleted document's old keys), nothing else."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter

from daser_rag.corpus import python_reference_corpus
from daser_rag.server.client import DaserClient
from daser_rag.server.testing import ServiceProcess
from llama_index.llms.daser import DASER_KEY, CacheAwareSynthesizer, DaserLLM, KVPrecomputeTransform, MiniLMEmbedding
from llama_index.vector_stores.daser import DaserFaissVectorStore

CASTLE_V1 = "Castle notes. The gate code of the castle is 4417. Guards change shift at dawn."
CASTLE_V2 = "Castle notes. The gate code of the castle is 9352. Guards change shift at dawn."
CASTLE_Q = "What is the gate code of the castle?"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("li-service") / "cache",
                         extra_args=["--codec", "fp32", "--key-tokens-per-minute", "10000000"])
    with svc:
        yield svc


@pytest.mark.slow  # a service process (or a 1,500-token document) loads and computes: minutes on 2 cores
def test_index_precomputes_on_the_service_and_update_delete_drop_exactly_the_stale_kv(service):
    client = DaserClient(service.url)
    embed = MiniLMEmbedding()
    docs = [Document(text=d.text, id_=d.doc_id) for d in python_reference_corpus(("pass", "break"))]
    docs.append(Document(text=CASTLE_V1, id_="notes:castle"))
    transform = KVPrecomputeTransform(client, show_progress=False)
    store = DaserFaissVectorStore(generator=client, show_progress=False)
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed,
        transformations=[SentenceSplitter(chunk_size=120, chunk_overlap=0), transform])

    report = transform.reports[0]
    keys = {d.doc_id: set(client.document_keys(d.doc_id)) for d in docs}
    assert report.deferred == 0 and report.nodes == len(report.keys) > len(docs)
    assert report.computed == len(set(report.keys)) and set(report.keys) == set().union(*keys.values())
    assert all(client.stored(report.keys))  # stored before any query

    llm = DaserLLM(client, max_new_tokens=20)
    qe = index.as_query_engine(llm=llm, response_synthesizer=CacheAwareSynthesizer(llm), similarity_top_k=2)
    first = qe.query(CASTLE_Q)
    info = first.metadata[DASER_KEY]
    assert "4417" in str(first)
    assert info["cache_misses"] == 0 and info["cache_hits"] == len(first.source_nodes) == 2
    assert info["exact_tokens"] + info["reused_tokens"] > 0 and info["mode"] == "blend"

    # update: the castle's old KV is dropped, its new KV is computed at index time, others untouched
    index.update_ref_doc(Document(text=CASTLE_V2, id_="notes:castle"))
    new_castle = set(client.document_keys("notes:castle"))
    assert new_castle and not new_castle & keys["notes:castle"]
    assert client.stored(sorted(keys["notes:castle"])) == [False] * len(keys["notes:castle"])
    assert all(client.stored(sorted(new_castle)))
    others = sorted(set().union(*(k for d, k in keys.items() if d != "notes:castle")))
    assert all(client.stored(others))
    second = qe.query(CASTLE_Q)
    assert "9352" in str(second) and second.metadata[DASER_KEY]["cache_misses"] == 0

    # delete: exactly that document's KV goes
    victim = docs[0].doc_id
    index.delete_ref_doc(victim, delete_from_docstore=True)
    assert client.stored(sorted(keys[victim])) == [False] * len(keys[victim])
    assert all(client.stored(sorted(new_castle | set().union(*(k for d, k in keys.items()
                                                                 if d not in (victim, "notes:castle"))))))
    client.close()
