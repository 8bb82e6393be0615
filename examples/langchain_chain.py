"""LangChain end to end: index() a knowledge base, answer through an LCEL chain, edit, re-index.

    python examples/langchain_chain.py [--cache-dir DIR] [--k 3]

What it shows, with the real SmolLM2-135M model and real MiniLM embeddings, all offline:
1. `langchain_core.indexing.index()` writes documents into a DaserVectorStore, which
   precomputes each document's chunk KV.
2. `retriever | DocumentsToMessages | ChatDaser` answers questions from that KV; the same
   chain with `use_cache=False` (full prefill) is timed for comparison.
3. A document is edited and `index()` runs again: the old version's KV is dropped, the answer
   changes, and untouched documents still hit the cache.
4. `cleanup="full"` without a source removes its KV.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document
from langchain_core.indexing import InMemoryRecordManager, index

from daser_rag import CacheAwareGenerator
from daser_rag.corpus import python_reference_corpus
from langchain_daser import (
    ChatDaser,
    DaserRetriever,
    DaserVectorStore,
    MiniLMEmbeddings,
    create_daser_rag_chain,
)

TOPICS = ("pass", "break", "continue", "assert", "return", "del")
STYLE_GUIDE = "Team style guide: the maximum line length in our Python code is {n} characters."
QUESTIONS = (
    "What exception does a failing assert statement raise?",
    "What happens when a pass statement is executed?",
)
STYLE_Q = "What is the maximum line length in our team's Python code?"


def knowledge_base(line_length: int, with_style_guide: bool = True) -> list[Document]:
    docs = [Document(page_content=d.text, metadata={"source": d.doc_id}) for d in python_reference_corpus(TOPICS)]
    if with_style_guide:
        docs.append(Document(page_content=STYLE_GUIDE.format(n=line_length), metadata={"source": "style-guide"}))
    return docs


def ask(chain, question: str, label: str = "") -> dict:
    t0 = time.perf_counter()
    out = chain.invoke(question)
    wall = time.perf_counter() - t0
    meta = out["answer"].response_metadata["daser"]
    sources = ", ".join(d.metadata["source"] for d in out["documents"])
    print(f"  Q{label}: {question}\n     A: {out['answer'].content.strip()!r}\n"
          f"     [{meta['mode']}] hits={meta['cache_hits']} misses={meta['cache_misses']} "
          f"recomputed={meta['recomputed_tokens']}/{meta['reused_tokens'] + meta['recomputed_tokens']} "
          f"ttft={meta['timings']['ttft_s'] * 1000:.0f} ms total={wall:.2f} s  sources: {sources}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="KV cache directory (default: a fresh temporary one)")
    ap.add_argument("--k", type=int, default=3, help="documents retrieved per question")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="daser-langchain-")

    print(f"loading model and embeddings (KV cache in {cache_dir}) ...")
    generator = CacheAwareGenerator(cache_dir=cache_dir)
    store = DaserVectorStore(generator, embedding=MiniLMEmbeddings())
    records = InMemoryRecordManager("daser-example")
    records.create_schema()

    def reindex(docs: list[Document], cleanup: str) -> None:
        t0 = time.perf_counter()
        res = index(docs, records, store, cleanup=cleanup, source_id_key="source", key_encoder="sha256")
        dropped = sum(len(v) for v in store.last_dropped.values()) if res["num_deleted"] else 0
        print(f"  index(cleanup={cleanup!r}): {res}, dropped chunk KV: {dropped}, {time.perf_counter() - t0:.2f} s")
        store.last_dropped = {}

    print("\n1. index() the knowledge base (KV precomputed at add_documents time)")
    reindex(knowledge_base(100), "incremental")

    retriever = DaserRetriever.from_vectorstore(store, k=args.k)
    llm = ChatDaser(generator=generator, max_tokens=args.max_tokens)
    chain = create_daser_rag_chain(retriever, llm, return_documents=True)
    full_chain = create_daser_rag_chain(retriever, llm.model_copy(update={"use_cache": False}),
                                        return_documents=True)
    exact_chain = create_daser_rag_chain(retriever, llm.model_copy(update={"recompute_ratio": 1.0}),
                                         return_documents=True)

    print("\n2. answer through the LCEL chain: cached KV vs full prefill")
    for q in QUESTIONS:
        cached = ask(chain, q, " (cached, r=0.15)")
        exact = ask(exact_chain, q, " (cached, r=1.0)")
        full = ask(full_chain, q, " (full prefill)")
        same = exact["answer"].response_metadata["daser"]["token_ids"] == \
            full["answer"].response_metadata["daser"]["token_ids"]
        print(f"     r=1.0 answer identical to full prefill: {same}; "
              f"r=0.15 identical: {cached['answer'].content == full['answer'].content}")

    print("\n3. edit a document and index() again")
    ask(chain, STYLE_Q, " (before edit)")
    old_key = generator.chunk_key_for(STYLE_GUIDE.format(n=100))
    reindex(knowledge_base(120), "incremental")
    print(f"  old style-guide KV still stored: {generator.store.contains(old_key)}")
    ask(chain, STYLE_Q, " (after edit)")
    ask(chain, QUESTIONS[0], " (untouched documents)")

    print("\n4. index(cleanup='full') without the style guide")
    new_key = generator.chunk_key_for(STYLE_GUIDE.format(n=120))
    reindex(knowledge_base(120, with_style_guide=False), "full")
    print(f"  style-guide KV still stored: {generator.store.contains(new_key)}")
    print("\nstore:", {k: v for k, v in generator.store.stats().items() if k in ("documents", "entries", "hit_rate")})


if __name__ == "__main__":
    main()
