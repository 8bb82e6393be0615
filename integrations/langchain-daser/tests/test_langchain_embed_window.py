"""Issue 21 item 7 for LangChain: parts of a split document fit the embedding's window, not only the
LLM's. The bundled MiniLM reads 256 tokens of a text; a part of up to a chunk (here 400 LLM tokens)
hides its tail from retrieval, so a fact there was never retrieved. The parts (cut by the shared
core implementation, daser_rag.embed_window) are also the document's KV chunks, precomputed."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import Document

from daser_rag.corpus import python_reference_corpus
from daser_rag.embed_window import BUNDLED_EMBED_MAX_TOKENS, bundled_window
from langchain_daser import ChatDaser, DaserVectorStore, MiniLMEmbeddings

FACT = "Castle notes: the gate code of the castle is 4417."
QUESTION = "What is the gate code of the castle?"


@pytest.fixture
def gen(lm, tmp_path, monkeypatch):
    """The real model with 400-token chunks and a 1,024-token window: a chunk is wider than MiniLM reads."""
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    g = CacheAwareGenerator(lm, store=KVStore(tmp_path / "kv", codec="fp32"), chunk_tokens=400)
    monkeypatch.setattr(g.runner, "max_positions", 1024)
    return g


def paragraph(gen, sentences: list[str], tokens: int, tail: str = "") -> str:
    """Sentences up to just under `tokens` LLM tokens (one old-style part), then `tail`."""
    out: list[str] = []
    for sentence in sentences:
        if gen.count_tokens([" ".join([*out, sentence, tail])]) > tokens:
            continue
        out.append(sentence)
    return " ".join([*out, tail]).strip()


def long_document(gen) -> str:
    """Four ~380-token paragraphs (each one old-style part); the fact ends the last one."""
    sentences = [" ".join(s.split()) + "." for d in python_reference_corpus() for s in d.text.split(". ")
                 if len(s) > 40]
    paras = [paragraph(gen, sentences[i * 40:], 390) for i in range(3)]
    paras.append(paragraph(gen, sentences[200:], 390, FACT))
    return "\n\n".join(paras)


@pytest.mark.slow  # a service process (or a 1,500-token document) loads and computes: minutes on 2 cores
def test_a_fact_in_the_last_part_of_a_long_document_is_retrieved(gen):
    count, window = bundled_window()
    assert count is not None and window == BUNDLED_EMBED_MAX_TOKENS == 256
    embedding = MiniLMEmbeddings()
    text = long_document(gen)
    assert gen.count_tokens([text]) > 1024

    # parts sized by the LLM's chunk only (embed_max_tokens=0, what LangChain did): the fact lies past
    # MiniLM's 256 tokens of the last part, and retrieval does not find it
    old = DaserVectorStore(gen, embedding=embedding, embed_max_tokens=0, precompute=False, doc_id_prefix="old:")
    old.add_documents([Document(page_content=text)], ids=["big"])
    old_parts = [d for d in old.vectorstore.store.values()]
    assert [r["text"] for r in old_parts] == text.split("\n\n")  # one part per paragraph
    last = next(r["text"] for r in old_parts if FACT in r["text"])
    assert count(last) > 256 and count(last[: last.index(FACT)]) > 256
    assert FACT not in old.similarity_search(QUESTION, k=1)[0].page_content

    new = DaserVectorStore(gen, embedding=embedding, show_progress=False)
    new.add_documents([Document(page_content=text)], ids=["big"])
    parts = [r["text"] for r in new.vectorstore.store.values()]
    assert len(parts) > len(old_parts) and all(count(p) <= 256 for p in parts)
    hit = new.similarity_search(QUESTION, k=1)[0]
    assert FACT in hit.page_content
    # one KV document whose chunks are exactly the parts, computed at add time
    keys = gen.store.document_chunk_keys(new.kv_doc_id("big"), "")
    assert sorted(keys) == sorted(gen.chunk_key_for(p) for p in parts) and all(gen.store.contains(k) for k in keys)
    answer = ChatDaser(generator=gen, max_tokens=12).invoke(QUESTION, documents=[hit])
    meta = answer.response_metadata["daser"]
    assert (meta["cache_hits"], meta["cache_misses"]) == (1, 0) and "4417" in answer.content
