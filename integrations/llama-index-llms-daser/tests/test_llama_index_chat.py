"""Issue 21 item 6: chat and streaming reuse KV, and daser's numbers reach the query-engine level.

A cache-aware context chat engine answers each turn from the retrieved nodes' cached KV (the
stock chat engines flatten nodes into a string); `as_query_engine(response_synthesizer=
CacheAwareSynthesizer(llm), streaming=True)` streams; a stock query engine's Response says
mode "full" in `metadata["daser"]`.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.response.schema import StreamingResponse
from llama_index.core.chat_engine.types import StreamingAgentChatResponse

from llama_index.llms.daser import (
    DASER_KEY,
    CacheAwareContextChatEngine,
    CacheAwareSynthesizer,
    DaserLLM,
    MiniLMEmbedding,
    NoKVReuseWarning,
)
from llama_index.vector_stores.daser import DaserFaissVectorStore

FACTS = ["The ferry to Gull Island leaves at seven in the morning.",
         "The vault at the Harbor Bank opens with the code 4172.",
         "The museum's oldest object is a bronze bell cast in 1310."]


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


@pytest.fixture
def index(generator, embed):
    store = DaserFaissVectorStore(generator=generator, show_progress=False)
    return VectorStoreIndex.from_documents([Document(text=t, id_=f"fact{i}") for i, t in enumerate(FACTS)],
                                           storage_context=StorageContext.from_defaults(vector_store=store),
                                           embed_model=embed)


def test_cache_aware_chat_engine_reuses_kv_on_every_turn(generator, index):
    llm = DaserLLM(generator, max_new_tokens=6)
    chat = CacheAwareContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=1), llm=llm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)
        first = chat.chat("When does the ferry to Gull Island leave?")
        assert first.source_nodes and "ferry" in first.source_nodes[0].node.get_content()
        info = first.metadata[DASER_KEY]
        assert info["cache_hits"] == 1 and info["mode"] == "blend"  # the node's KV was precomputed at insert
        second = chat.stream_chat("And what is the vault code?")
        assert isinstance(second, StreamingAgentChatResponse)
        text = "".join(second.response_gen)
        assert text and second.metadata[DASER_KEY]["cache_hits"] == 1
    for _ in range(100):  # the engine's writer thread puts the reply into memory as the stream ends
        if len(chat.chat_history) == 4:
            break
        time.sleep(0.05)
    history = chat.chat_history
    assert [m.role.value for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[-1].content == text

    async def later_turns():
        reply = await chat.achat("Which object is oldest in the museum?")
        stream = await chat.astream_chat("Say it again.")
        deltas = [d async for d in stream.async_response_gen()]
        return reply, stream, deltas

    reply, stream, deltas = asyncio.run(later_turns())
    assert reply.metadata[DASER_KEY]["cache_hits"] == 1 and deltas
    assert stream.metadata[DASER_KEY]["completion_tokens"] > 0
    chat.reset()
    assert chat.chat_history == []


def test_as_query_engine_streaming_with_the_cache_aware_synthesizer_streams(generator, index):
    llm = DaserLLM(generator, max_new_tokens=6)
    synth = CacheAwareSynthesizer(llm)
    engine = index.as_query_engine(llm=llm, similarity_top_k=1, response_synthesizer=synth, streaming=True)
    resp = engine.query("When does the ferry leave?")
    assert isinstance(resp, StreamingResponse)
    assert "".join(resp.response_gen)
    assert resp.metadata[DASER_KEY]["cache_hits"] == 1
    assert synth.streaming is False  # the caller's synthesizer is unchanged
    plain = index.as_query_engine(llm=llm, similarity_top_k=1, response_synthesizer=synth).query("Ferry?")
    assert not isinstance(plain, StreamingResponse)


def test_stock_query_engine_response_carries_daser_metadata(generator, index):
    llm = DaserLLM(generator, max_new_tokens=4)
    with pytest.warns(NoKVReuseWarning):
        resp = index.as_query_engine(llm=llm, similarity_top_k=1).query("When does the ferry leave?")
    info = resp.metadata[DASER_KEY]
    assert info["mode"] == "full" and info["cache_hits"] == 0 and info["llm_calls"] >= 1
    stream = index.as_query_engine(llm=llm, similarity_top_k=1, streaming=True).query("When does the ferry leave?")
    assert isinstance(stream, StreamingResponse)
    "".join(stream.response_gen)
    assert stream.metadata[DASER_KEY]["mode"] == "full"


def test_condense_plus_context_engine_reuses_kv_and_matches_full_prefill(generator, index):
    """index.as_chat_engine(chat_mode="condense_plus_context", llm=DaserLLM) is cache-aware: the second
    turn is condensed into a standalone question, which retrieves and is answered from the retrieved
    node's stored KV; that node sits right after the system prefix, where its KV was computed (exact reuse), so the greedy answer
    equals full prefill's on the same question and node."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine

    from daser_rag.types import ChunkRef
    from llama_index.llms.daser import CacheAwareCondensePlusContextChatEngine, node_chunk_ref

    llm = DaserLLM(generator, max_new_tokens=8)
    chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=1)
    assert isinstance(chat, CacheAwareCondensePlusContextChatEngine)  # the stock entry point, cache-aware
    assert isinstance(index.as_chat_engine(chat_mode="context", llm=llm), CacheAwareContextChatEngine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)  # the condensing call has nothing to reuse: no warning
        first = chat.chat("When does the ferry to Gull Island leave?")
        assert chat.last_condensed == "When does the ferry to Gull Island leave?"  # no history: nothing condensed
        assert first.metadata[DASER_KEY]["cache_hits"] == 1
        second = chat.chat("And what about the vault at the Harbor Bank?")
    condensed = chat.last_condensed
    assert condensed and condensed != "And what about the vault at the Harbor Bank?"
    info = second.metadata[DASER_KEY]
    assert info["cache_hits"] == 1 and info["cache_misses"] == 0 and info["mode"] == "blend"
    assert info["exact_tokens"] > 0
    node = second.source_nodes[0]
    full = generator.generate(chat.last_question, [ChunkRef(text=node_chunk_ref(node).text)], max_new_tokens=8,
                              use_cache=False)
    assert str(second) == full.text and full.mode == "full"
    assert len(chat.chat_history) == 4
    # the stock engine with the same LLM flattens nodes and history into one prompt: no reuse
    stock = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=1), llm=llm)
    with pytest.warns(NoKVReuseWarning):
        stock.chat("When does the ferry to Gull Island leave?")
