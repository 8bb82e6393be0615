"""llama-index-llms-daser: the package surface, the stock query-engine path (warns, reports no
reuse) next to the cache-aware one, prompt templates, option pass-through, and oversized nodes
split by the KV-precompute transform so nothing longer than the window is computed."""

from __future__ import annotations

import warnings
from importlib.metadata import version

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.prompts import PromptTemplate

import llama_index.llms.daser as pkg
from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import InvalidInputError
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.types import GenerationResult, Timings
from daser_rag.context import SHARED_TENANT
from llama_index.llms.daser import (
    DASER_KEY,
    CacheAwareSynthesizer,
    DaserLLM,
    KVPrecomputeTransform,
    MiniLMEmbedding,
    NoKVReuseWarning,
    rendered_text,
)
from llama_index.vector_stores.daser import DaserFaissVectorStore

CASTLE = "Castle notes. The gate code of the castle is 4417. Guards change shift at dawn."
CASTLE_Q = "What is the gate code of the castle?"


def test_package_surface_is_pinned():
    assert pkg.__all__ == [
        "DASER_KEY", "CacheAwareCondensePlusContextChatEngine", "CacheAwareContextChatEngine",
        "CacheAwareSynthesizer", "DaserLLM", "KVPrecomputeTransform",
        "KVSync", "MiniLMEmbedding",
        "NoKVReuseWarning", "PrecomputeReport", "__version__", "node_chunk_ref", "node_doc_id", "rendered_text",
        "result_summary",
    ]
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    assert pkg.__version__ == version("llama-index-llms-daser")


class Recorder:
    """A KVGenerator that records each request and delegates it (or answers canned, without a model)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.calls: list[tuple[str, list, dict]] = []
        self.results: list[GenerationResult] = []

    def generate(self, question, contexts=None, **kwargs):
        self.calls.append((question, list(contexts or []), kwargs))
        if self.inner is not None:
            result = self.inner.generate(question, contexts, **kwargs)
        else:
            n = len(contexts or [])
            result = GenerationResult(text="ok", token_ids=[1], prompt_tokens=10, context_tokens=8, query_tokens=2,
                                      exact_tokens=3, reused_tokens=5, recomputed_tokens=0, cache_hits=n,
                                      cache_misses=0, mode="blend" if n else "full", recompute_ratio=0.15,
                                      finish_reason="length", timings=Timings())
        self.results.append(result)
        return result

    def stream(self, question, contexts=None, **kwargs):
        raise NotImplementedError

    def add_documents(self, documents, **kwargs):
        return self.inner.add_documents(documents, **kwargs)

    def invalidate(self, doc_id, tenant=""):
        return self.inner.invalidate(doc_id, tenant)

    def split(self, text):
        return self.inner.split(text)

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)

    def token_ids(self, text):
        return self.inner.token_ids(text)


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


def small_docs() -> list[Document]:
    docs = [Document(text=d.text, id_=d.doc_id) for d in python_reference_corpus(("pass", "break"))]
    return docs + [Document(text=CASTLE, id_="notes:castle")]


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_stock_query_engine_warns_once_and_reports_no_reuse_while_cache_aware_one_reuses(generator, embed):
    store = DaserFaissVectorStore(generator=generator, show_progress=False)
    pipe = IngestionPipeline(transformations=[
        SentenceSplitter(chunk_size=80, chunk_overlap=0, tokenizer=generator.tokenizer.encode), embed,
        KVPrecomputeTransform(generator, show_progress=False)], vector_store=store)
    pipe.run(documents=small_docs())
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)

    rec = Recorder(generator)
    llm = DaserLLM(rec, max_new_tokens=16)
    stock = index.as_query_engine(llm=llm, similarity_top_k=2)
    with pytest.warns(NoKVReuseWarning, match="CacheAwareSynthesizer"):
        stock.query(CASTLE_Q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)  # once per DaserLLM
        stock.query(CASTLE_Q)
    assert rec.calls and all(not contexts for _, contexts, _ in rec.calls)  # documents were in the prompt text
    for result in rec.results:
        assert result.cache_hits == 0 and result.cache_misses == 0
        assert pkg.result_summary(result)["mode"] == "full"  # never reported as a blend

    # the one line that gets reuse
    fast = index.as_query_engine(llm=llm, similarity_top_k=2, response_synthesizer=CacheAwareSynthesizer(llm))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoKVReuseWarning)
        resp = fast.query(CASTLE_Q)
    info = resp.metadata[DASER_KEY]
    assert info["cache_hits"] == len(resp.source_nodes) == 2 and info["cache_misses"] == 0
    assert info["mode"] == "blend" and "4417" in str(resp)


def test_synthesizer_prompt_templates_and_option_pass_through():
    fake = Recorder()
    llm = DaserLLM(fake, recompute_ratio="auto", selector="query")
    assert llm.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    synth = CacheAwareSynthesizer(llm, top_k=5)
    prompts = synth.get_prompts()
    assert set(prompts) == {"question_template"} and prompts["question_template"].format(query_str="q") == "q"
    synth.update_prompts({"question_template": PromptTemplate("Answer in one word. {query_str}")})
    synth.get_response("Which colour?", ["The sky is blue.", "Grass is green."])
    question, contexts, kwargs = fake.calls[-1]
    assert question == "Answer in one word. Which colour?" and contexts == ["The sky is blue.", "Grass is green."]
    assert kwargs["recompute_ratio"] == "auto" and kwargs["selector"] == "query" and kwargs["top_k"] == 5
    assert kwargs["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS and "tenant" not in kwargs
    llm.complete("hi", contexts=["x"], recompute_ratio=0.5, selector="hybrid", max_tokens=3)
    assert {k: fake.calls[-1][2][k] for k in ("recompute_ratio", "selector", "max_new_tokens")} == \
        {"recompute_ratio": 0.5, "selector": "hybrid", "max_new_tokens": 3}
    with pytest.raises(ValueError, match="query_str"):
        synth.update_prompts({"question_template": PromptTemplate("no variable")})
    with pytest.raises(InvalidInputError, match="recompute_ratio"):
        llm.complete("hi", contexts=["x"], recompute_ratio=2.0)
    with pytest.raises(InvalidInputError, match="selector"):
        llm.complete("hi", contexts=["x"], selector="nope")
    with pytest.raises(ValueError):
        DaserLLM(fake, recompute_ratio="sometimes")


def test_calibration_field_and_per_call_option_reach_the_generator_and_the_summary():
    fake = Recorder()
    llm = DaserLLM(fake)
    assert llm.calibration is None
    resp = llm.complete("hi", contexts=["x"])
    assert "calibration" not in fake.calls[-1][2]  # unset: the generator's own choice
    assert resp.additional_kwargs["calibrated"] is False and resp.raw["daser"]["calibrated"] is False
    off = DaserLLM(fake, calibration=False)
    off.complete("hi", contexts=["x"])
    assert fake.calls[-1][2]["calibration"] is False
    off.complete("hi", contexts=["x"], calibration=True)  # per call wins
    assert fake.calls[-1][2]["calibration"] is True
    CacheAwareSynthesizer(off).get_response("q", ["ctx"])
    assert fake.calls[-1][2]["calibration"] is False
    fake.results[-1].calibrated = True
    assert pkg.result_summary(fake.results[-1])["calibrated"] is True
    assert DaserLLM.from_dict(off.to_dict(), generator=fake).calibration is False
    with pytest.raises(InvalidInputError, match="calibration"):
        off.complete("hi", contexts=["x"], calibration="yes")
    for bad in ("yes", 1, "false"):
        with pytest.raises(ValueError, match="calibration"):
            DaserLLM(fake, calibration=bad)


def long_document(generator, window: int) -> str:
    """A real-text document about 3x `window` tokens long, with the castle fact in the middle."""
    topics = [d.text for d in python_reference_corpus()]
    parts: list[str] = []
    while len(generator.tokenizer.encode("\n\n".join(parts))) < 3 * window:
        parts.append(topics[len(parts) % len(topics)][:1500].strip())
        if len(parts) == 3:
            parts.append(CASTLE)
    return "\n\n".join(parts)


@pytest.fixture
def small_window(lm, tmp_path, monkeypatch):
    """The real model with a 512-token window and 64-token chunks: oversized input stays cheap."""
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path / "small", codec="fp32"), chunk_tokens=64)
    monkeypatch.setattr(gen.runner, "max_positions", 512)
    return gen


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_transform_splits_a_node_three_times_the_window_and_it_stays_answerable(small_window, embed):
    gen = small_window
    window = gen.runner.max_positions
    text = long_document(gen, window)
    assert len(gen.tokenizer.encode(text)) >= 3 * window
    transform = KVPrecomputeTransform(gen, show_progress=False)
    store = DaserFaissVectorStore(generator=gen, show_progress=False)
    pipe = IngestionPipeline(transformations=[
        SentenceSplitter(chunk_size=8 * window, chunk_overlap=0, tokenizer=gen.tokenizer.encode),  # one big node
        transform, embed], vector_store=store)
    pipe.run(documents=[Document(text=text, id_="big")])
    limit = transform.kv.max_chunk_tokens()
    assert limit is not None and limit < window
    nodes = store.get_nodes()
    assert len(nodes) > 3 and {n.ref_doc_id for n in nodes} == {"big"}
    for node in nodes:  # nothing longer than the window is stored, in FAISS or as KV
        assert len(gen.resolve([rendered_text(node)], "")[0].token_ids) <= limit
    keys = gen.store.document_chunk_keys("big", SHARED_TENANT)
    assert len(keys) == len(nodes) and all(gen.store.contains(k) for k in keys)
    for key in keys:
        assert gen.store.get(key).num_tokens <= limit
    assert transform.reports[-1].computed == len(nodes)

    llm = DaserLLM(gen, max_new_tokens=12)
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
    resp = index.as_query_engine(llm=llm, similarity_top_k=2, response_synthesizer=CacheAwareSynthesizer(llm)) \
        .query(CASTLE_Q)
    assert any("4417" in n.node.get_content() for n in resp.source_nodes)
    assert resp.metadata[DASER_KEY]["cache_hits"] == 2

    with pytest.raises(InvalidInputError, match="nothing was written"):
        KVPrecomputeTransform(gen, show_progress=False, split_oversized=False)(
            SentenceSplitter(chunk_size=8 * window, tokenizer=gen.tokenizer.encode)(
                [Document(text=text.replace("4417", "5521"), id_="big2")]))
    assert gen.store.document_chunk_keys("big2", SHARED_TENANT) == []
