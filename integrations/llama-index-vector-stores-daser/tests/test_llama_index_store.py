"""InvalidatingFaissVectorStore on real FAISS with real MiniLM embeddings (no LLM needed).

The stock LlamaIndex FAISS stores cannot delete a document, or reuse FAISS ids after a delete;
these tests pin down the behaviour that KV invalidation relies on.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")
faiss = pytest.importorskip("faiss")

from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    ExactMatchFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from llama_index.llms.daser import MiniLMEmbedding
from llama_index.vector_stores.daser import InvalidatingFaissVectorStore

TEXTS = {
    "doc-pass": ["The pass statement is a null operation.", "Nothing happens when pass is executed."],
    "doc-break": ["break terminates the nearest enclosing loop.", "The optional else clause of the loop is skipped."],
    "doc-del": ["Deletion of a name removes its binding from the namespace."],
}


class RecordingHook:
    """A listener that records what the store reports (the KV side is tested with the real model)."""

    def __init__(self) -> None:
        self.added: list[list[str]] = []
        self.changed: list[dict[str, list[str]]] = []

    def on_nodes_added(self, nodes):
        self.added.append([n.node_id for n in nodes])

    def on_documents_changed(self, current):
        self.changed.append({d: sorted(n.node_id for n in ns) for d, ns in current.items()})


@pytest.fixture(scope="module")
def embed():
    return MiniLMEmbedding()


def make_nodes(embed, texts=TEXTS):
    nodes = []
    for doc_id, chunks in texts.items():
        for i, text in enumerate(chunks):
            node = TextNode(text=text, id_=f"{doc_id}/{i}", metadata={"doc": doc_id, "part": i})
            node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=doc_id)
            nodes.append(node)
    vectors = embed.get_text_embedding_batch([n.get_content() for n in nodes])
    for n, v in zip(nodes, vectors):
        n.embedding = v
    return nodes


def search(store, embed, text, k=5, **kw):
    res = store.query(VectorStoreQuery(query_embedding=embed.get_query_embedding(text), similarity_top_k=k, **kw))
    return res.ids


def test_embedding_is_normalized_and_semantic(embed):
    q, a, b = embed.get_text_embedding_batch(["Which loop does break end?", TEXTS["doc-break"][0], TEXTS["doc-del"][0]])
    assert len(q) == 384
    assert abs(sum(x * x for x in q) - 1.0) < 1e-4

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    assert dot(q, a) > dot(q, b) + 0.2


def test_delete_ref_doc_and_nodes_never_reuse_ids(embed):
    hook = RecordingHook()
    store = InvalidatingFaissVectorStore(hook=hook)
    nodes = make_nodes(embed)
    store.add(nodes)
    assert store.client.ntotal == 5 and store.node_count == 5
    assert store.ref_doc_ids() == ["doc-break", "doc-del", "doc-pass"]
    assert search(store, embed, "What happens when pass runs?", k=1) == ["doc-pass/1"]
    used = {store.faiss_id(n.node_id) for n in nodes}

    store.delete("doc-pass")
    assert store.client.ntotal == 3
    assert not any(i.startswith("doc-pass") for i in search(store, embed, "pass statement null operation"))
    assert hook.changed[-1] == {"doc-pass": []}

    store.delete_nodes(["doc-break/1"])
    assert store.client.ntotal == 2
    assert store.node_ids("doc-break") == ["doc-break/0"]
    assert hook.changed[-1] == {"doc-break": ["doc-break/0"]}

    again = make_nodes(embed, {"doc-pass": TEXTS["doc-pass"]})
    store.add(again)
    new = {store.faiss_id(n.node_id) for n in again}
    assert not new & used, "FAISS ids were reused after a delete"
    assert store.client.ntotal == 4
    # Deleting an unknown document is a no-op for FAISS but still reaches the hook (idempotent).
    store.delete("never-added")
    assert store.client.ntotal == 4 and hook.changed[-1] == {"never-added": []}


def test_readding_a_node_id_replaces_its_vector(embed):
    hook = RecordingHook()
    store = InvalidatingFaissVectorStore(hook=hook)
    store.add(make_nodes(embed))
    edited = make_nodes(embed, {"doc-del": ["del x unbinds x; later use of x raises NameError."]})
    store.add(edited)
    assert store.client.ntotal == 5
    assert store.get_nodes(["doc-del/0"])[0].get_content().startswith("del x unbinds")
    assert hook.changed[-1] == {"doc-del": ["doc-del/0"]}


def test_filters_and_doc_ids_restrict_search(embed):
    store = InvalidatingFaissVectorStore()
    store.add(make_nodes(embed))
    only_del = MetadataFilters(filters=[ExactMatchFilter(key="doc", value="doc-del")])
    assert search(store, embed, "break loop", filters=only_del) == ["doc-del/0"]
    assert set(search(store, embed, "anything", doc_ids=["doc-break"])) == {"doc-break/0", "doc-break/1"}
    store.delete_nodes(filters=MetadataFilters(filters=[ExactMatchFilter(key="part", value=1)]))
    assert sorted(store.node_ids()) == ["doc-break/0", "doc-del/0", "doc-pass/0"]


def test_bad_input_is_named(embed):
    store = InvalidatingFaissVectorStore(faiss.IndexFlatIP(384))
    node = TextNode(text="no vector", id_="x")
    with pytest.raises(ValueError, match="no embedding"):
        store.add([node])
    node.embedding = [0.1] * 10
    with pytest.raises(ValueError, match="does not match the index dimension 384"):
        store.add([node])
    with pytest.raises(ValueError, match="needs node_ids, filters"):
        store.delete_nodes()
    full = faiss.IndexFlatIP(2)
    full.add(faiss.rand((1, 2)))
    with pytest.raises(ValueError, match="pass an empty one"):
        InvalidatingFaissVectorStore(full)
    assert store.node_count == 0  # nothing half-added


def test_persist_roundtrip_through_storage_context(embed, tmp_path):
    store = InvalidatingFaissVectorStore()
    store.add(make_nodes(embed))
    store.delete("doc-del")
    ctx = StorageContext.from_defaults(vector_store=store)
    ctx.persist(persist_dir=str(tmp_path))
    loaded = InvalidatingFaissVectorStore.from_persist_dir(str(tmp_path))
    assert loaded.node_count == 4 and loaded.client.ntotal == 4
    assert search(loaded, embed, "Which loop does break end?", k=1) == search(store, embed, "Which loop does break end?", k=1)
    before = {loaded.faiss_id(n) for n in loaded.node_ids()}
    loaded.add(make_nodes(embed, {"doc-del": TEXTS["doc-del"]}))
    assert loaded.faiss_id("doc-del/0") > max(before)  # the id counter survived the restart
    index = VectorStoreIndex.from_vector_store(loaded, embed_model=embed)
    hits = index.as_retriever(similarity_top_k=1).retrieve("What does deleting a name do?")
    assert hits[0].node.node_id == "doc-del/0" and hits[0].node.ref_doc_id == "doc-del"
    with pytest.raises(FileNotFoundError):
        InvalidatingFaissVectorStore.from_persist_dir(str(tmp_path / "nope"))
