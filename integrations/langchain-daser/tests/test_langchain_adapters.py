"""langchain-daser: the package surface, a stock `format_docs | prompt` chain (warns once, reports
no reuse) next to the block-keeping one (reuses), option pass-through, and a document 3x the
model's window split by DaserVectorStore before any write."""

from __future__ import annotations

import warnings
from importlib.metadata import version

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser  # noqa: F401 - part of the stock recipe's vocabulary
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

import langchain_daser as pkg
from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import InvalidInputError
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.types import GenerationResult, Timings
from daser_rag.context import SHARED_TENANT
from langchain_daser import (
    DOC_ID_KEY,
    PARENT_ID_KEY,
    ChatDaser,
    DaserRetriever,
    DaserVectorStore,
    DocumentsToMessages,
    MiniLMEmbeddings,
    NoKVReuseWarning,
)

KB = {
    "vault": "The vault at the Harbor Bank opens with the code 4172.",
    "ferry": "The ferry to Gull Island leaves every day at 7 in the morning.",
    "library": "The city library closes at 9 in the evening on weekdays.",
}
VAULT_Q = "What is the code of the vault at the Harbor Bank?"
CASTLE = "Castle notes. The gate code of the castle is 4417. Guards change shift at dawn."


def test_package_surface_is_pinned():
    assert pkg.__all__ == [
        "DOC_ID_KEY", "ChatDaser", "DaserRetriever", "DaserVectorStore", "DocumentsToMessages", "MiniLMEmbeddings",
        "NoKVReuseWarning", "PARENT_ID_KEY", "__version__", "create_daser_rag_chain", "documents_to_blocks",
        "documents_to_messages",
    ]
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    assert pkg.__version__ == version("langchain-daser")


@pytest.fixture(scope="module")
def embedding() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_stock_chain_warns_once_and_reports_no_reuse_while_block_chain_reuses(generator, embedding):
    store = DaserVectorStore(generator, embedding=embedding)
    store.add_documents([Document(page_content=t) for t in KB.values()], ids=list(KB))
    retriever = DaserRetriever.from_vectorstore(store, k=2)
    llm = ChatDaser(generator=generator, max_tokens=20)
    prompt = ChatPromptTemplate.from_messages(
        [("human", "Answer from the context.\n\nContext:\n{context}\n\nQuestion: {question}")])
    stock = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm
    with pytest.warns(NoKVReuseWarning, match="text-plain"):
        msg = stock.invoke(VAULT_Q)
    meta = msg.response_metadata["daser"]
    assert meta["mode"] == "full" and meta["cache_hits"] == 0 and meta["cache_misses"] == 0
    assert "input_token_details" not in msg.usage_metadata  # no cache_read claimed
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)  # once per ChatDaser
        stock.invoke(VAULT_Q)

    # the same recipe with DocumentsToMessages in place of format_docs | prompt keeps documents as blocks
    blocks = {"context": retriever, "question": RunnablePassthrough()} | DocumentsToMessages | llm
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)
        fast = blocks.invoke(VAULT_Q)
    meta = fast.response_metadata["daser"]
    assert (meta["cache_hits"], meta["cache_misses"]) == (2, 0) and meta["mode"] == "blend"
    assert fast.usage_metadata["input_token_details"]["cache_read"] == meta["exact_tokens"] + meta["reused_tokens"]
    assert "4172" in fast.content
    with pytest.raises(InvalidInputError, match="one formatted string"):
        DocumentsToMessages.invoke({"context": "already formatted", "question": VAULT_Q})


class FakeGenerator:
    """Answers canned results and records what it was asked (no model)."""

    def __init__(self):
        self.calls: list[tuple[str, list, dict]] = []

    def generate(self, question, contexts=None, **kwargs):
        self.calls.append((question, list(contexts or []), kwargs))
        n = len(contexts or [])
        return GenerationResult(text="ok", token_ids=[1], prompt_tokens=10, context_tokens=8, query_tokens=2,
                                exact_tokens=3, reused_tokens=5, recomputed_tokens=0, cache_hits=n, cache_misses=0,
                                mode="blend", recompute_ratio=0.15, finish_reason="length", timings=Timings())

    def stream(self, question, contexts=None, **kwargs):
        raise NotImplementedError

    def add_documents(self, documents, **kwargs):
        return None

    def invalidate(self, doc_id, tenant=""):
        return []

    def split(self, text):
        return [text]

    def count_tokens(self, texts):
        return sum(len(t.split()) for t in texts)

    def token_ids(self, text):
        return list(range(len(text.split())))


def test_options_pass_through_and_no_chunks_is_never_a_blend():
    fake = FakeGenerator()
    llm = ChatDaser(generator=fake, recompute_ratio="auto", selector="query")
    assert llm.max_tokens == DEFAULT_MAX_NEW_TOKENS
    llm.invoke("q", documents=["a doc"])
    kwargs = fake.calls[-1][2]
    assert kwargs["recompute_ratio"] == "auto" and kwargs["selector"] == "query"
    assert kwargs["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS and "tenant" not in kwargs
    llm.invoke("q", documents=["a doc"], recompute_ratio=0.3, selector="hybrid", max_tokens=5, top_k=4)
    assert {k: fake.calls[-1][2][k] for k in ("recompute_ratio", "selector", "max_new_tokens", "top_k")} == \
        {"recompute_ratio": 0.3, "selector": "hybrid", "max_new_tokens": 5, "top_k": 4}
    with pytest.warns(NoKVReuseWarning):
        plain = llm.invoke("no documents here")  # the fake says "blend": no chunk means it was not
    assert plain.response_metadata["daser"]["mode"] == "full"
    assert "input_token_details" not in plain.usage_metadata
    with pytest.raises(InvalidInputError, match="recompute_ratio"):
        llm.invoke("q", documents=["d"], recompute_ratio=1.5)
    with pytest.raises(InvalidInputError, match="selector"):
        llm.invoke("q", documents=["d"], selector="nope")
    with pytest.raises(ValueError):
        ChatDaser(generator=fake, recompute_ratio="sometimes")


def test_calibration_field_and_per_call_option_reach_the_generator():
    fake = FakeGenerator()
    llm = ChatDaser(generator=fake)
    assert llm.calibration is None
    msg = llm.invoke("q", documents=["a doc"])
    assert "calibration" not in fake.calls[-1][2]  # unset: the generator's own choice
    assert msg.response_metadata["daser"]["calibrated"] is False
    off = ChatDaser(generator=fake, calibration=False)
    off.invoke("q", documents=["a doc"])
    assert fake.calls[-1][2]["calibration"] is False
    off.invoke("q", documents=["a doc"], calibration=True)  # per call wins
    assert fake.calls[-1][2]["calibration"] is True
    assert off._identifying_params["calibration"] is False
    with pytest.raises(InvalidInputError, match="calibration"):
        off.invoke("q", documents=["d"], calibration="yes")
    for bad in ("yes", 1, "false"):
        with pytest.raises(ValueError, match="calibration"):
            ChatDaser(generator=fake, calibration=bad)


@pytest.fixture
def small_window(lm, tmp_path, monkeypatch):
    """The real model with a 512-token window and 64-token chunks: oversized input stays cheap."""
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "small", codec="fp32"), chunk_tokens=64)
    monkeypatch.setattr(gen.runner, "max_positions", 512)
    return gen


def long_document(generator, window: int) -> str:
    topics = [d.text for d in python_reference_corpus()]
    parts: list[str] = []
    while len(generator.tokenizer.encode("\n\n".join(parts))) < 3 * window:
        parts.append(topics[len(parts) % len(topics)][:1500].strip())
        if len(parts) == 3:
            parts.append(CASTLE)
    return "\n\n".join(parts)


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_document_three_times_the_window_is_split_before_any_write(small_window, embedding):
    gen = small_window
    window = gen.runner.max_positions
    text = long_document(gen, window)
    store = DaserVectorStore(gen, embedding=embedding, show_progress=False)
    limit = store.max_document_tokens()
    assert limit is not None and limit < window
    assert store.add_documents([Document(page_content=text, metadata={"source": "big"})], ids=["big"]) == ["big"]
    records = dict(store.vectorstore.store)
    assert len(records) > 3 and all(i.startswith("big#") for i in records)
    assert all(r["metadata"][PARENT_ID_KEY] == "big" for r in records.values())
    assert all(len(gen.resolve([r["text"]], "")[0].token_ids) <= limit for r in records.values())
    keys = gen.store.document_chunk_keys("big", SHARED_TENANT)  # one KV document, split the same way
    assert keys and all(gen.store.contains(k) and gen.store.get(k).num_tokens <= limit for k in keys)

    docs = DaserRetriever.from_vectorstore(store, k=2).invoke("What is the gate code of the castle?")
    assert all(d.metadata[DOC_ID_KEY] == "big" for d in docs) and any("4417" in d.page_content for d in docs)
    msg = ChatDaser(generator=gen, max_tokens=12).invoke("What is the gate code of the castle?", documents=docs)
    assert msg.response_metadata["daser"]["cache_misses"] == 0  # answerable, from precomputed KV

    store.add_documents([Document(page_content=KB["ferry"])], ids=["big"])  # upsert: now one short record
    assert list(store.vectorstore.store) == ["big"]  # no part of the old version is left to retrieve
    assert not any(gen.store.contains(k) for k in keys)
    store.add_documents([Document(page_content=text)], ids=["big"])  # and split again
    assert set(store.vectorstore.store) == set(records)
    keys = gen.store.document_chunk_keys("big", SHARED_TENANT)

    assert store.delete(["big"]) is True
    assert store.vectorstore.store == {} and not any(gen.store.contains(k) for k in keys)

    strict = DaserVectorStore(gen, embedding=embedding, split_oversized=False)
    with pytest.raises(InvalidInputError, match="nothing was written"):
        strict.add_documents([Document(page_content=text)], ids=["big2"])
    assert strict.vectorstore.store == {} and gen.store.documents(SHARED_TENANT) == []
