"""LangChain integration with the real model, real embeddings and langchain-core's own index().

The knowledge base is a handful of short, made-up facts, so that an edit is visible in the
answer (the model cannot know the code of a fictional vault) and the tests stay fast.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document
from langchain_core.indexing import InMemoryRecordManager, aindex, index
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.vectorstores import InMemoryVectorStore

from daser_rag.errors import InvalidInputError, UnknownDocumentError
from daser_rag.context import SHARED_TENANT
from langchain_daser import (
    DOC_ID_KEY,
    ChatDaser,
    DaserRetriever,
    DaserVectorStore,
    MiniLMEmbeddings,
    create_daser_rag_chain,
    documents_to_blocks,
)

KB = {
    "vault": "The vault at the Harbor Bank opens with the code 4172.",
    "ferry": "The ferry to Gull Island leaves every day at 7 in the morning.",
    "library": "The city library closes at 9 in the evening on weekdays.",
    "museum": "The museum's oldest object is a bronze bell cast in 1310.",
}
VAULT_Q = "What is the code of the vault at the Harbor Bank?"
FERRY_Q = "When does the ferry to Gull Island leave?"


def kb_docs(kb: dict[str, str] = KB) -> list[Document]:
    return [Document(page_content=text, metadata={"source": name}) for name, text in kb.items()]


def daser_meta(msg: AIMessage) -> dict:
    return msg.response_metadata["daser"]


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddings:
    emb = MiniLMEmbeddings()
    emb.embed_query("warm up")  # load once per module
    return emb


@pytest.fixture
def llm(generator) -> ChatDaser:
    return ChatDaser(generator=generator, max_tokens=16)


@pytest.fixture
def indexed(generator, embedding):
    """A DaserVectorStore filled through langchain_core.indexing.index() (incremental)."""
    store = DaserVectorStore(generator, embedding=embedding)
    records = InMemoryRecordManager("kb")
    records.create_schema()
    result = index(kb_docs(), records, store, cleanup="incremental", source_id_key="source", key_encoder="sha256")
    assert result["num_added"] == len(KB)
    return store, records


def _id_of(store: DaserVectorStore, source: str) -> str:
    ids = [i for i, rec in store.vectorstore.store.items() if rec["metadata"]["source"] == source]
    assert len(ids) == 1
    return ids[0]


# -- ChatDaser ---------------------------------------------------------------------------------

def test_plain_chat_invoke_and_stream_agree(llm):
    msg = llm.invoke("Name a primary color.")
    assert isinstance(msg, AIMessage) and msg.content.strip()
    meta = daser_meta(msg)
    assert meta["cache_hits"] == 0 and meta["cache_misses"] == 0
    assert msg.usage_metadata["output_tokens"] == len(meta["token_ids"]) > 0
    assert msg.usage_metadata["input_tokens"] == meta["prompt_tokens"]

    chunks = list(llm.stream("Name a primary color."))
    assert "".join(c.content for c in chunks) == msg.content  # greedy: same text
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] > 0


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_documents_reach_the_model_as_blocks_kwargs_and_bind(generator, llm, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents(kb_docs(), ids=list(KB))  # KV precomputed here
    docs = store.get_by_ids(["vault", "museum"])
    assert [d.metadata[DOC_ID_KEY] for d in docs] == ["vault", "museum"]

    by_kwarg = llm.invoke(VAULT_Q, documents=docs)
    by_blocks = llm.invoke([HumanMessage(content=[*documents_to_blocks(docs), {"type": "text", "text": VAULT_Q}])])
    by_bind = llm.bind(documents=docs).invoke(VAULT_Q)
    by_file_id = llm.invoke([HumanMessage(content=[
        {"type": "text-plain", "mime_type": "text/plain", "file_id": "vault"},
        {"type": "text-plain", "mime_type": "text/plain", "file_id": "museum"},
        {"type": "text", "text": VAULT_Q}])])
    for msg in (by_kwarg, by_blocks, by_bind, by_file_id):
        meta = daser_meta(msg)
        assert (meta["cache_hits"], meta["cache_misses"]) == (2, 0)
        assert "4172" in msg.content
        assert msg.usage_metadata["input_token_details"]["cache_read"] == meta["exact_tokens"] + meta["reused_tokens"]
    assert by_kwarg.content == by_blocks.content == by_bind.content == by_file_id.content


def test_system_message_and_history_go_with_the_question(llm, generator):
    docs = [Document(page_content=KB["ferry"], id="ferry")]
    msg = llm.invoke([SystemMessage("Answer in one short sentence."),
                      HumanMessage("Hi."), AIMessage("Hello! Ask me about the ferry."),
                      HumanMessage(FERRY_Q)], documents=docs)
    assert "7" in msg.content
    # the documents' KV key does not depend on the system message or history
    assert daser_meta(msg)["chunk_keys"] == [generator.chunk_key_for(KB["ferry"])]


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_async_invoke_and_stream(llm, generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents(kb_docs(), ids=list(KB))
    docs = store.get_by_ids(["ferry"])
    sync = llm.invoke(FERRY_Q, documents=docs)

    async def run():
        amsg = await llm.ainvoke(FERRY_Q, documents=docs)
        parts = [c async for c in llm.astream(FERRY_Q, documents=docs)]
        found = await store.asimilarity_search(FERRY_Q, k=1)
        return amsg, parts, found

    amsg, parts, found = asyncio.run(run())
    assert amsg.content == sync.content == "".join(p.content for p in parts)
    assert daser_meta(amsg)["cache_hits"] == 1 and parts[-1].response_metadata["daser"]["cache_hits"] == 1
    assert found[0].id == "ferry"
    # the stream released the generator's lock: a sync call right after works
    assert llm.invoke(FERRY_Q, documents=docs).content == sync.content

    async def bad():
        return [c async for c in llm.astream(FERRY_Q, bogus=1)]

    with pytest.raises(InvalidInputError, match="unknown argument"):  # raised on the worker, re-raised here
        asyncio.run(bad())


def test_chat_rejects_bad_input_with_clear_errors(llm):
    with pytest.raises(InvalidInputError, match="unknown argument"):
        llm.invoke("hi", max_new_tokenz=3)
    with pytest.raises(InvalidInputError, match="last message must be a human"):
        llm.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(InvalidInputError, match="is empty"):
        llm.invoke("hi", documents=[Document(page_content="   ")])
    with pytest.raises(InvalidInputError, match="no question text"):
        llm.invoke([HumanMessage(content=[{"type": "text-plain", "mime_type": "text/plain", "text": "x"}])])
    with pytest.raises(UnknownDocumentError):
        llm.invoke([HumanMessage(content=[{"type": "text-plain", "mime_type": "text/plain", "file_id": "nope"},
                                          {"type": "text", "text": "hi"}])])
    with pytest.raises(TypeError, match="KVGenerator"):
        ChatDaser(generator=object())


# -- vector store + index() ------------------------------------------------------------------------

def test_index_edit_drops_exactly_the_old_kv_and_answers_change(generator, llm, indexed):
    store, records = indexed
    chain = create_daser_rag_chain(DaserRetriever.from_vectorstore(store, k=2), llm, return_documents=True)
    before = chain.invoke(VAULT_Q)
    assert "4172" in before["answer"].content
    assert "vault" in [d.metadata["source"] for d in before["documents"]]

    old_vault_id = _id_of(store, "vault")
    old_key = generator.chunk_key_for(KB["vault"])
    others = {name: generator.chunk_key_for(text) for name, text in KB.items() if name != "vault"}
    assert generator.store.contains(old_key)

    edited = dict(KB, vault=KB["vault"].replace("4172", "9035"))
    result = index(kb_docs(edited), records, store, cleanup="incremental", source_id_key="source",
                   key_encoder="sha256")
    assert result == {"num_added": 1, "num_updated": 0, "num_skipped": len(KB) - 1, "num_deleted": 1}
    assert store.last_dropped == {old_vault_id: [old_key]}  # exactly the edited document's KV
    assert not generator.store.contains(old_key)
    assert generator.store.document_info(store.kv_doc_id(old_vault_id), SHARED_TENANT) is None
    new_key = generator.chunk_key_for(edited["vault"])
    assert generator.store.contains(new_key)  # precomputed at add_documents time
    assert all(generator.store.contains(k) for k in others.values())

    after = chain.invoke(VAULT_Q)
    assert "9035" in after["answer"].content and "4172" not in after["answer"].content
    meta = daser_meta(after["answer"])
    assert meta["cache_misses"] == 0 and new_key in meta["chunk_keys"]

    untouched = chain.invoke(FERRY_Q)
    meta = daser_meta(untouched["answer"])
    assert (meta["cache_hits"], meta["cache_misses"]) == (2, 0)
    assert others["ferry"] in meta["chunk_keys"]


def test_index_full_cleanup_drops_a_removed_source(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding, doc_id_prefix="kb:")
    records = InMemoryRecordManager("kb-full")
    records.create_schema()
    index(kb_docs(), records, store, cleanup="full", source_id_key="source", key_encoder="sha256")
    museum_id = _id_of(store, "museum")
    museum_key = generator.chunk_key_for(KB["museum"])
    assert generator.store.document_chunk_keys(f"kb:{museum_id}", SHARED_TENANT) == [museum_key]

    remaining = {k: v for k, v in KB.items() if k != "museum"}
    result = index(kb_docs(remaining), records, store, cleanup="full", source_id_key="source", key_encoder="sha256")
    assert result["num_deleted"] == 1 and result["num_skipped"] == len(remaining)
    assert store.last_dropped == {museum_id: [museum_key]}
    assert not generator.store.contains(museum_key)
    assert museum_id not in store.vectorstore.store
    assert all(generator.store.contains(generator.chunk_key_for(t)) for t in remaining.values())


def test_aindex_async_path_invalidates_too(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    records = InMemoryRecordManager("kb-async")
    records.create_schema()
    kb = {"ferry": KB["ferry"], "library": KB["library"]}

    async def run():
        await aindex(kb_docs(kb), records, store, cleanup="incremental", source_id_key="source",
                     key_encoder="sha256")
        edited = dict(kb, library=kb["library"].replace("9", "10"))
        return await aindex(kb_docs(edited), records, store, cleanup="incremental", source_id_key="source",
                            key_encoder="sha256")

    result = asyncio.run(run())
    assert result["num_added"] == 1 and result["num_deleted"] == 1
    assert not generator.store.contains(generator.chunk_key_for(KB["library"]))
    assert generator.store.contains(generator.chunk_key_for(KB["ferry"]))


def test_upsert_of_multichunk_document_drops_only_changed_chunks(lm, tmp_path, embedding):
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "kv", codec="fp32"), chunk_tokens=16)
    paras = ["The north gate of the old town opens at dawn every day.",
             "The south gate stays closed during the winter months.",
             "The east gate is reserved for carts and horses."]
    store = DaserVectorStore(gen, embedding=embedding)
    store.add_documents([Document(page_content="\n\n".join(paras))], ids=["gates"])
    keys = gen.store.document_chunk_keys("gates", SHARED_TENANT)
    assert len(keys) == len(gen.split("\n\n".join(paras))) >= 3

    edited = [paras[0], paras[1].replace("winter", "summer"), paras[2]]
    store.add_documents([Document(page_content="\n\n".join(edited))], ids=["gates"])  # same id: upsert
    new_keys = set(gen.store.document_chunk_keys("gates", SHARED_TENANT))
    dropped = set(keys) - new_keys
    assert len(dropped) == 1 and not any(gen.store.contains(k) for k in dropped)
    assert all(gen.store.contains(k) for k in new_keys)
    assert store.get_by_ids(["gates"])[0].page_content == "\n\n".join(edited)


def test_shared_text_survives_deleting_one_of_two_documents(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents([Document(page_content=KB["ferry"], metadata={"copy": i}) for i in (1, 2)], ids=["a", "b"])
    key = generator.chunk_key_for(KB["ferry"])
    assert store.delete(["a"]) is True
    assert store.last_dropped == {"a": []} and generator.store.contains(key)
    store.delete(["b"])
    assert store.last_dropped == {"b": [key]} and not generator.store.contains(key)
    assert store.delete(["b"]) is True and store.last_dropped == {"b": []}  # idempotent


def test_vector_store_bad_input_keeps_what_is_stored(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents([Document(page_content=KB["ferry"])], ids=["ferry"])
    with pytest.raises(InvalidInputError, match="'x' is empty"):
        store.add_documents([Document(page_content=KB["vault"]), Document(page_content="  ")], ids=["v", "x"])
    with pytest.raises(InvalidInputError, match="ids for"):
        store.add_documents([Document(page_content=KB["vault"])], ids=["v", "w"])
    with pytest.raises(InvalidInputError, match="duplicate document id"):
        store.add_documents([Document(page_content=KB["vault"]), Document(page_content=KB["museum"])],
                            ids=["v", "v"])
    assert list(store.vectorstore.store) == ["ferry"]
    assert generator.store.documents(SHARED_TENANT) == ["ferry"]
    assert generator.store.contains(generator.chunk_key_for(KB["ferry"]))
    with pytest.raises(InvalidInputError, match="embedding"):
        DaserVectorStore(generator)


def test_relevance_scores_and_foreign_retriever_carry_ids(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding, precompute=False)
    store.add_documents(kb_docs(), ids=list(KB))
    assert not generator.store.contains(generator.chunk_key_for(KB["ferry"]))  # precompute off
    (doc, score), = store.similarity_search_with_score(FERRY_Q, k=1)  # cosine similarity
    assert doc.id == "ferry" and doc.metadata[DOC_ID_KEY] == "ferry" and 0.5 < score <= 1.0
    assert store.max_marginal_relevance_search(FERRY_Q, k=2)[0].id == "ferry"

    plain = InMemoryVectorStore(embedding)
    plain.add_documents(kb_docs(), ids=[f"p-{k}" for k in KB])
    retriever = DaserRetriever(retriever=plain.as_retriever(search_kwargs={"k": 2}))
    docs = retriever.invoke(FERRY_Q)
    assert docs[0].metadata[DOC_ID_KEY] == "p-ferry"
    assert "source" in docs[0].metadata  # original metadata kept


# -- LCEL recipe -----------------------------------------------------------------------------------

def test_lcel_chain_matches_full_prefill_at_r1_and_hits_on_repeat(generator, indexed):
    store, _ = indexed
    retriever = DaserRetriever.from_vectorstore(store, k=3)
    blended = create_daser_rag_chain(retriever, ChatDaser(generator=generator, max_tokens=24, recompute_ratio=1.0))
    full = create_daser_rag_chain(retriever, ChatDaser(generator=generator, max_tokens=24, use_cache=False))

    ref = full.invoke(VAULT_Q)
    first = blended.invoke(VAULT_Q)
    assert daser_meta(ref)["mode"] == "full"
    assert daser_meta(first)["token_ids"] == daser_meta(ref)["token_ids"]
    assert first.content == ref.content
    assert daser_meta(first)["recomputed_tokens"] == daser_meta(first)["reused_tokens"] + \
        daser_meta(first)["recomputed_tokens"] > 0  # r=1: every non-exact context token recomputed

    repeat = blended.invoke(VAULT_Q)
    assert (daser_meta(repeat)["cache_hits"], daser_meta(repeat)["cache_misses"]) == (3, 0)
    assert repeat.content == ref.content

    fast = create_daser_rag_chain(retriever, ChatDaser(generator=generator, max_tokens=24)).invoke(VAULT_Q)
    assert daser_meta(fast)["cache_hits"] == 3 and "4172" in fast.content


def test_message_conversion_keeps_documents_separate_and_ignores_generated_block_ids():
    from langchain_core.messages.content import create_plaintext_block

    from langchain_daser._convert import messages_to_request

    def split(text: str) -> list[str]:
        return [text.strip()]

    auto = create_plaintext_block(text="Doc without a real id.")  # LangChain gives it an lc_... id
    assert auto["id"].startswith("lc_")
    req = messages_to_request([HumanMessage(content=[
        {"type": "text-plain", "mime_type": "text/plain", "text": "First doc.", "id": "d1"},
        auto,
        {"type": "text-plain", "mime_type": "text/plain", "text": "Third.", "extras": {DOC_ID_KEY: "d3"}},
        {"type": "text", "text": "The question?"}])], split, documents=["A loose string."])
    assert [(c.text, c.doc_id) for c in req.contexts] == [
        ("A loose string.", None), ("First doc.", "d1"), ("Doc without a real id.", None), ("Third.", "d3")]
    assert req.question == "The question?"
