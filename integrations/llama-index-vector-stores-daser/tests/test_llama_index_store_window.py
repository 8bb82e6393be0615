"""llama-index-vector-stores-daser: the package surface, and a node 3x the model's window reaching
the store straight from `VectorStoreIndex` (no KV transform): split before any write, every
part fits, the question is answerable; with splitting off, refused before FAISS or KV is touched."""

from __future__ import annotations

from importlib.metadata import version

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("faiss")

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import TextNode

import llama_index.vector_stores.daser as pkg
from daser_rag.corpus import python_reference_corpus
from daser_rag.errors import InvalidInputError
from daser_rag.context import SHARED_TENANT
from llama_index.llms.daser import DASER_KEY, CacheAwareSynthesizer, DaserLLM, MiniLMEmbedding, rendered_text
from llama_index.vector_stores.daser import DaserFaissVectorStore, InvalidatingFaissVectorStore

CASTLE = "Castle notes. The gate code of the castle is 4417. Guards change shift at dawn."


def test_package_surface_is_pinned():
    assert pkg.__all__ == ["DaserFaissVectorStore", "InvalidatingFaissVectorStore", "KnowledgeBaseHook", "__version__"]
    assert InvalidatingFaissVectorStore is DaserFaissVectorStore  # the old name still works
    assert pkg.__version__ == version("llama-index-vector-stores-daser")


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


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
def test_index_insert_of_a_node_three_times_the_window_is_split_before_any_write(small_window, embed):
    gen = small_window
    window = gen.runner.max_positions
    text = long_document(gen, window)
    store = DaserFaissVectorStore(generator=gen, embed_model=embed, show_progress=False)
    limit = store.kv.max_chunk_tokens()
    one_node = SentenceSplitter(chunk_size=8 * window, chunk_overlap=0, tokenizer=gen.tokenizer.encode)
    index = VectorStoreIndex.from_documents(
        [Document(text=text, id_="big")], storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed, transformations=[one_node])
    nodes = store.get_nodes()
    assert len(nodes) > 3 and store.ref_doc_ids() == ["big"]
    assert all(len(gen.resolve([rendered_text(n)], "")[0].token_ids) <= limit for n in nodes)
    keys = gen.store.document_chunk_keys("big", SHARED_TENANT)
    assert len(keys) == len(nodes) and all(gen.store.get(k).num_tokens <= limit for k in keys)
    vectors = {tuple(store.client.reconstruct(store.faiss_id(n.node_id)).tolist()) for n in nodes}
    assert len(vectors) == len(nodes)  # each part embedded on its own

    llm = DaserLLM(gen, max_new_tokens=12)
    resp = index.as_query_engine(llm=llm, similarity_top_k=2, response_synthesizer=CacheAwareSynthesizer(llm)) \
        .query("What is the gate code of the castle?")
    assert any("4417" in n.node.get_content() for n in resp.source_nodes)
    assert resp.metadata[DASER_KEY]["cache_hits"] == 2 and resp.metadata[DASER_KEY]["cache_misses"] == 0

    big_node = TextNode(text=text, id_="whole", embedding=embed.get_text_embedding("castle"))
    store.add([big_node])  # split into whole#part0..
    n_parts = len(store.node_ids("whole"))
    assert n_parts > 3 and "whole" not in store.node_ids()
    store.add([TextNode(text=CASTLE, id_="whole", embedding=embed.get_text_embedding(CASTLE))])  # re-added short
    assert store.node_ids("whole") == ["whole"]  # no part of the old version is left
    store.delete("whole")

    index.delete_ref_doc("big")
    assert store.node_count == 0 and not any(gen.store.contains(k) for k in keys)

    strict = DaserFaissVectorStore(generator=gen, split_oversized=False)
    node = TextNode(text=text, id_="n1", embedding=embed.get_text_embedding("castle"))
    with pytest.raises(InvalidInputError, match="nothing was written"):
        strict.add([node])
    assert strict.node_count == 0 and strict.client is None  # FAISS never created
    assert gen.store.document_chunk_keys("n1", SHARED_TENANT) == [] and gen.store.stats()["entries"]["host"] == 0
