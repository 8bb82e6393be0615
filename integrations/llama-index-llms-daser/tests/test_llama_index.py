"""LlamaIndex end to end with the real model, real FAISS and real embeddings.

What is asserted: every way LlamaIndex changes a knowledge base drops exactly the chunk KV of the
documents it changed (old-version keys gone from every tier, untouched documents keep theirs and
keep hitting), an edited document is answered with its new text, the KV-precompute step survives
the ingestion cache, and the query engine at r=1 reproduces full-prefill greedy output.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")

from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.base.response.schema import StreamingResponse
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.llms import ChatMessage
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.storage.docstore import SimpleDocumentStore

from daser_rag.corpus import python_reference_corpus
from daser_rag.context import SHARED_TENANT
from llama_index.llms.daser import (
    DASER_KEY,
    CacheAwareSynthesizer,
    DaserLLM,
    KVPrecomputeTransform,
    MiniLMEmbedding,
    node_chunk_ref,
)
from llama_index.vector_stores.daser import InvalidatingFaissVectorStore

CASTLE_V1 = "Castle notes. The gate code of the castle is 4417. Guards change shift at dawn."
CASTLE_V2 = "Castle notes. The gate code of the castle is 9352. Guards change shift at dawn."
CASTLE_Q = "What is the gate code of the castle?"
MAX_NEW = 20


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


@pytest.fixture
def llm(generator, monkeypatch):
    llm = DaserLLM(generator, max_new_tokens=MAX_NEW)
    monkeypatch.setattr(Settings, "_llm", llm)  # RetrieverQueryEngine.from_args reads Settings.llm
    return llm


def documents(castle: str = CASTLE_V1, with_castle: bool = True) -> list[Document]:
    docs = [Document(text=d.text, id_=d.doc_id, metadata={"topic": d.metadata["topic"]})
            for d in python_reference_corpus(("pass", "break"))]
    if with_castle:
        docs.append(Document(text=castle, id_="notes:castle", metadata={"topic": "castle"}))
    return docs


def splitter(generator) -> SentenceSplitter:
    # Sized in the model's own tokens, so node boundaries are what the generator sees.
    return SentenceSplitter(chunk_size=80, chunk_overlap=0, tokenizer=generator.tokenizer.encode)


def pipeline(generator, embed, store, strategy=DocstoreStrategy.UPSERTS, docstore=True):
    kv = KVPrecomputeTransform(generator, show_progress=False)
    pipe = IngestionPipeline(
        transformations=[splitter(generator), embed, kv],
        docstore=SimpleDocumentStore() if docstore else None,
        vector_store=store,
        docstore_strategy=strategy,
    )
    return pipe, kv


def doc_keys(generator, doc_id: str) -> set[str]:
    return set(generator.store.document_chunk_keys(doc_id, SHARED_TENANT))


def stored(generator, keys) -> list[bool]:
    return [generator.store.contains(k) for k in keys]


def engine(store, embed, llm, **synth_kwargs):
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
    synth = CacheAwareSynthesizer(llm, **synth_kwargs)
    return RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=2), response_synthesizer=synth)


def test_upsert_edit_is_answered_fresh_and_untouched_kv_survives(generator, embed, llm):
    store = InvalidatingFaissVectorStore(generator=generator)
    pipe, kv = pipeline(generator, embed, store)
    pipe.run(documents=documents())
    before = {d: doc_keys(generator, d) for d in ("pyref:pass", "pyref:break", "notes:castle")}
    assert all(before.values()) and all(all(stored(generator, k)) for k in before.values())
    assert kv.reports[0].computed == sum(len(k) for k in before.values())
    qe = engine(store, embed, llm)

    old = qe.query(CASTLE_Q)
    assert "4417" in str(old)
    info = old.metadata[DASER_KEY]
    assert info["cache_hits"] == len(old.source_nodes) and info["cache_misses"] == 0  # precomputed at index time

    pipe.run(documents=documents(CASTLE_V2))  # UPSERTS: only the edited document is re-processed
    assert kv.reports[-1].nodes == 1 and kv.reports[-1].computed == 1
    new_castle = doc_keys(generator, "notes:castle")
    assert new_castle and not new_castle & before["notes:castle"]
    assert stored(generator, before["notes:castle"]) == [False] * len(before["notes:castle"])  # old KV gone
    assert all(stored(generator, new_castle))
    for d in ("pyref:pass", "pyref:break"):
        assert doc_keys(generator, d) == before[d] and all(stored(generator, before[d]))

    fresh = qe.query(CASTLE_Q)
    assert "9352" in str(fresh) and "4417" not in str(fresh)
    used = set(fresh.metadata[DASER_KEY]["chunk_keys"])
    assert not used & before["notes:castle"]

    hits0 = generator.store.counters["hit_host"] + generator.store.counters["hit_disk"]
    untouched = qe.query("What happens when a pass statement is executed?")
    info = untouched.metadata[DASER_KEY]
    assert {n.node.ref_doc_id for n in untouched.source_nodes} <= {"pyref:pass", "pyref:break"}
    assert info["cache_hits"] == len(untouched.source_nodes) and info["cache_misses"] == 0
    hits1 = generator.store.counters["hit_host"] + generator.store.counters["hit_disk"]
    assert hits1 - hits0 == len(untouched.source_nodes)
    assert set(info["chunk_keys"]) <= before["pyref:pass"] | before["pyref:break"]


def test_upserts_and_delete_frees_storage(generator, embed):
    store = InvalidatingFaissVectorStore(generator=generator)
    pipe, _ = pipeline(generator, embed, store, strategy=DocstoreStrategy.UPSERTS_AND_DELETE)
    pipe.run(documents=documents())
    castle = doc_keys(generator, "notes:castle")
    stats0 = generator.store.stats()
    pipe.run(documents=documents(with_castle=False))
    stats1 = generator.store.stats()
    assert "notes:castle" not in store.ref_doc_ids()
    assert stored(generator, castle) == [False] * len(castle)
    assert stats1["entries"]["disk"] == stats0["entries"]["disk"] - len(castle)
    assert stats1["entries"]["host"] == stats0["entries"]["host"] - len(castle)
    assert stats1["bytes"]["disk"] < stats0["bytes"]["disk"]
    assert "notes:castle" not in generator.store.documents(SHARED_TENANT)


def test_every_index_path_drops_exactly_the_changed_document(generator, embed):
    store = InvalidatingFaissVectorStore(generator=generator)
    index = VectorStoreIndex.from_documents(
        documents(), storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed,
        transformations=[splitter(generator), KVPrecomputeTransform(generator, show_progress=False)])
    keys = {d: doc_keys(generator, d) for d in ("pyref:pass", "pyref:break", "notes:castle")}

    def untouched_intact(*docs):
        for d in docs:
            assert doc_keys(generator, d) == keys[d] and all(stored(generator, keys[d])), d

    index.delete_ref_doc("notes:castle")
    assert stored(generator, keys["notes:castle"]) == [False] * len(keys["notes:castle"])
    assert not doc_keys(generator, "notes:castle")
    untouched_intact("pyref:pass", "pyref:break")

    index.insert(documents()[-1])
    assert doc_keys(generator, "notes:castle") == keys["notes:castle"]  # same text -> same content keys
    index.update_ref_doc(documents(CASTLE_V2)[-1])
    v2 = doc_keys(generator, "notes:castle")
    assert v2 and not v2 & keys["notes:castle"] and all(stored(generator, v2))
    assert stored(generator, keys["notes:castle"]) == [False] * len(keys["notes:castle"])
    untouched_intact("pyref:pass", "pyref:break")

    v3_text = CASTLE_V2.replace("dawn", "dusk")
    changed = index.refresh_ref_docs(documents(v3_text))
    assert changed == [False, False, True]
    v3 = doc_keys(generator, "notes:castle")
    assert v3 != v2 and stored(generator, v2) == [False] * len(v2)
    untouched_intact("pyref:pass", "pyref:break")

    pass_nodes = store.node_ids("pyref:pass")
    assert len(pass_nodes) >= 2, "the splitter should cut the pass topic into several nodes"
    victim = store.get_nodes([pass_nodes[0]])[0]
    victim_key = generator.chunk_key_for(node_chunk_ref(victim).text)
    index.delete_nodes([victim.node_id])
    assert not generator.store.contains(victim_key)
    assert doc_keys(generator, "pyref:pass") == keys["pyref:pass"] - {victim_key}
    assert all(stored(generator, keys["pyref:pass"] - {victim_key}))
    untouched_intact("pyref:break")


def test_ingestion_cache_hit_does_not_leave_chunks_without_kv(generator, embed):
    store = InvalidatingFaissVectorStore(generator=generator)
    pipe, kv = pipeline(generator, embed, store, docstore=False)  # the pipeline cache is on by default
    pipe.run(documents=documents())
    keys = doc_keys(generator, "notes:castle")
    store.delete("notes:castle")
    assert stored(generator, keys) == [False] * len(keys)
    calls = len(kv.reports)
    pipe.run(documents=documents())  # every transformation is a cache hit now
    assert len(kv.reports) == calls, "expected the KV transform to be skipped by the cache"
    assert doc_keys(generator, "notes:castle") == keys
    assert all(stored(generator, keys))  # the store re-checked what it was given


def test_query_engine_r1_matches_full_prefill_and_hits_on_second_query(generator, embed, llm):
    store = InvalidatingFaissVectorStore(generator=generator)
    pipeline(generator, embed, store)[0].run(documents=documents())
    qe = engine(store, embed, llm, recompute_ratio=1.0)
    question = "Which loop does a break statement terminate?"
    first = qe.query(question)
    refs = [node_chunk_ref(n) for n in first.source_nodes]
    assert len(refs) == 2 and all(r.doc_id and r.chunk_id for r in refs)
    full = generator.generate(question, refs, use_cache=False, max_new_tokens=MAX_NEW)
    result = first.metadata[DASER_KEY]["result"]
    assert result.token_ids == full.token_ids and str(first) == full.text
    assert result.recompute_ratio == 1.0 and full.mode == "full"

    second = qe.query("What does the break statement do inside a for loop?")
    info = second.metadata[DASER_KEY]
    assert info["cache_hits"] == len(second.source_nodes) > 0 and info["cache_misses"] == 0
    assert [e["node_id"] for e in info["nodes"]] == [n.node.node_id for n in second.source_nodes]
    assert all(e["chunk_key"] == generator.chunk_key_for(node_chunk_ref(n).text)
               for e, n in zip(info["nodes"], second.source_nodes))


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_streaming_and_async_query_engine(generator, embed, llm):
    store = InvalidatingFaissVectorStore(generator=generator)
    pipeline(generator, embed, store)[0].run(documents=documents())
    plain = engine(store, embed, llm).query(CASTLE_Q)
    streaming = engine(store, embed, llm, streaming=True).query(CASTLE_Q)
    assert isinstance(streaming, StreamingResponse)
    assert "".join(streaming.response_gen) == str(plain)
    assert streaming.metadata[DASER_KEY]["cache_hits"] == len(streaming.source_nodes)
    assert [n.node.node_id for n in streaming.source_nodes] == [n.node.node_id for n in plain.source_nodes]
    async_resp = asyncio.run(engine(store, embed, llm).aquery(CASTLE_Q))
    assert str(async_resp) == str(plain)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_daser_llm_is_a_drop_in_llm(generator, llm):
    prompt = "Name a primary colour."
    short = {"max_tokens": 8}
    plain = llm.complete(prompt, **short)
    assert plain.text == generator.generate(prompt, None, max_new_tokens=8).text
    assert plain.additional_kwargs["cache_hits"] == 0 and plain.additional_kwargs["context_tokens"] > 0

    deltas = list(llm.stream_complete(prompt, **short))
    assert "".join(d.delta for d in deltas) == plain.text and deltas[-1].raw is not None
    assert asyncio.run(llm.acomplete(prompt, **short)).text == plain.text

    async def collect():
        return [r.delta async for r in await llm.astream_complete(prompt, **short)]

    assert "".join(asyncio.run(collect())) == plain.text
    assert llm.chat([ChatMessage(role="user", content=prompt)], **short).message.content

    ctx = [CASTLE_V1]
    with_refs = llm.complete(CASTLE_Q, contexts=ctx)
    assert "4417" in with_refs.text and with_refs.additional_kwargs["cache_misses"] == 1
    again = llm.complete(CASTLE_Q, contexts=ctx)
    assert again.additional_kwargs["cache_hits"] == 1 and again.text == with_refs.text

    with pytest.raises(TypeError, match="unexpected keyword"):
        llm.complete(prompt, temprature=0.5)
    with pytest.raises(TypeError, match="KVGenerator"):
        DaserLLM(object())
    with pytest.raises(TypeError, match="needs a DaserLLM"):
        from llama_index.core.llms import MockLLM

        CacheAwareSynthesizer(MockLLM())


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_remote_client_generator_works_through_the_protocol_only(generator, embed, monkeypatch):
    """The adapter over DaserClient (HTTP, real service app in-process), through the engine
    protocol only: chunk KV is computed at index time by the service (/v1/chunks), so the first
    query reads every chunk; invalidation goes through the service's document API."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from daser_rag.server.app import create_app
    from daser_rag.server.client import DaserClient

    with TestClient(create_app(generator)) as http:
        client = DaserClient("http://testserver")
        client._http.close()
        client._http = http  # TestClient is an httpx.Client that serves the app in-process
        store = InvalidatingFaissVectorStore(generator=client)
        assert store.kv is not None and store.kv.precomputes
        kv = KVPrecomputeTransform(client, show_progress=False)
        IngestionPipeline(transformations=[splitter(generator), embed, kv], vector_store=store).run(
            documents=documents())
        report = kv.reports[0]
        assert report.deferred == 0 and report.computed == len(set(report.keys)) > 0
        assert all(stored(generator, report.keys)) and all(store.kv.contains(k) for k in report.keys)
        llm = DaserLLM(client, max_new_tokens=MAX_NEW)
        monkeypatch.setattr(Settings, "_llm", llm)
        qe = engine(store, embed, llm)
        first = qe.query(CASTLE_Q)
        n = len(first.source_nodes)
        assert "4417" in str(first) and first.metadata[DASER_KEY]["cache_misses"] == 0
        assert first.metadata[DASER_KEY]["cache_hits"] == n
        second = qe.query(CASTLE_Q)
        assert second.metadata[DASER_KEY]["cache_hits"] == n and str(second) == str(first)
        castle = [k for k, node in zip(first.metadata[DASER_KEY]["chunk_keys"], first.source_nodes)
                  if node.node.ref_doc_id == "notes:castle"]
        others = [k for k in first.metadata[DASER_KEY]["chunk_keys"] if k not in castle]
        assert castle and all(stored(generator, castle))
        store.delete("notes:castle")
        assert stored(generator, castle) == [False] * len(castle)
        assert all(stored(generator, others))
