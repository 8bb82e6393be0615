"""A FAISS vector store that can delete, and tells daser-rag when the knowledge base changes.

LlamaIndex's stock `FaissVectorStore` cannot delete at all and `FaissMapVectorStore` ignores
deletes by document and hands out FAISS ids again after a delete. Every path by which
LlamaIndex changes a knowledge base (IngestionPipeline upserts, `VectorStoreIndex.delete_ref_doc`,
`update_ref_doc`, `refresh_ref_docs`, `delete_nodes`) ends in this store's `add`, `delete` or
`delete_nodes`, so this is where stale chunk KV is invalidated: the store calls a
`KnowledgeBaseHook` (normally `KVSync`) with the documents whose node set changed.

The store keeps node text and metadata itself (`stores_text=True`), so an index built on it
needs no docstore, and persists as a FAISS file plus a JSON sidecar.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import (
    build_metadata_filter_fn,
    metadata_dict_to_node,
    node_to_metadata_dict,
)

from daser_rag.context import SHARED_TENANT
from daser_rag.engine.protocol import IndexingEngine
from llama_index.llms.daser.kv_sync import KVSync, check_nodes, node_doc_id

SIDECAR_SUFFIX = ".records.json"
_FORMAT_VERSION = 1


@runtime_checkable
class KnowledgeBaseHook(Protocol):
    def on_nodes_added(self, nodes: Sequence[BaseNode]) -> None:
        """New nodes are now retrievable."""

    def on_documents_changed(self, current: Mapping[str, Sequence[BaseNode]]) -> Any:
        """Nodes were removed or replaced: each touched document id -> the nodes it has now."""


@dataclass
class _Record:
    fid: int
    doc_id: str
    payload: dict[str, Any]  # node_to_metadata_dict: metadata at top level, node JSON inside


class DaserFaissVectorStore(BasePydanticVectorStore):
    """FAISS (`IndexIDMap2`) vector store with working deletes and a knowledge-base change hook.

    FAISS ids come from a counter that is never rewound, so an id is never reused after a
    delete. Pass `generator=` (any engine of the engine protocol, `IndexingEngine`: daser's own, the vLLM
    control plane, or `DaserClient`) to keep its chunk KV in step, computed at index time.

    A node longer than the model's window is split into parts that fit before anything is
    written; parts also fit the embedding's window (`embed_max_tokens`, default: `embed_model`'s,
    else the bundled MiniLM's 256 tokens) and are embedded with `embed_model` when given (else
    they carry the node's embedding, which saw only its start: pass `embed_model=`); with `split_oversized=False` such a node raises InvalidInputError and neither
    FAISS nor the KV store is touched. `show_progress`: True, False, or None (a bar when many
    nodes need KV); `add(nodes, show_progress=...)` overrides it per call.
    """

    stores_text: bool = True
    flat_metadata: bool = False

    _index: Any = PrivateAttr(default=None)
    _records: dict[str, _Record] = PrivateAttr(default_factory=dict)
    _by_doc: dict[str, set[str]] = PrivateAttr(default_factory=dict)
    _by_fid: dict[int, str] = PrivateAttr(default_factory=dict)
    _next_id: int = PrivateAttr(default=0)
    _hook: KnowledgeBaseHook | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.RLock)
    _split_oversized: bool = PrivateAttr(default=True)
    _embed_model: Any = PrivateAttr(default=None)
    _embed_max_tokens: int | None = PrivateAttr(default=None)

    def __init__(
        self,
        faiss_index: Any | None = None,
        *,
        generator: IndexingEngine | None = None,
        hook: KnowledgeBaseHook | None = None,
        tenant: str = SHARED_TENANT,
        show_progress: bool | None = None,
        split_oversized: bool = True,
        embed_model: Any | None = None,
        embed_max_tokens: int | None = None,
    ) -> None:
        super().__init__(stores_text=True)
        self._split_oversized = split_oversized
        self._embed_model = embed_model
        self._embed_max_tokens = embed_max_tokens
        if generator is not None and hook is not None:
            raise ValueError("pass either generator= or hook=, not both")
        if generator is not None:
            hook = KVSync(generator, tenant=tenant, show_progress=show_progress)
        if hook is not None and not isinstance(hook, KnowledgeBaseHook):
            raise TypeError(f"hook must implement on_nodes_added/on_documents_changed, got {type(hook).__name__}")
        self._hook = hook
        if faiss_index is not None:
            self._index = self._wrap(faiss_index)

    @staticmethod
    def _wrap(index: Any) -> Any:
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            if index.ntotal:
                raise ValueError("pass an empty FAISS index; load a populated store with from_persist_path")
            return index
        if index.ntotal:
            raise ValueError("the FAISS index already holds vectors this store has no records for; pass an empty one")
        return faiss.IndexIDMap2(index)

    @classmethod
    def class_name(cls) -> str:
        return "DaserFaissVectorStore"

    @property
    def client(self) -> Any:
        return self._index

    @property
    def hook(self) -> KnowledgeBaseHook | None:
        return self._hook

    @property
    def kv(self) -> KVSync | None:
        return self._hook if isinstance(self._hook, KVSync) else None

    # -- introspection ---------------------------------------------------------------------------
    # No __len__: LlamaIndex writes `vector_store or SimpleVectorStore()`, and an empty store must stay truthy.
    @property
    def node_count(self) -> int:
        return len(self._records)

    def ref_doc_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._by_doc)

    def node_ids(self, ref_doc_id: str | None = None) -> list[str]:
        with self._lock:
            if ref_doc_id is None:
                return list(self._records)
            return sorted(self._by_doc.get(ref_doc_id, ()))

    def faiss_id(self, node_id: str) -> int:
        return self._records[node_id].fid

    def _node(self, node_id: str) -> BaseNode:
        return metadata_dict_to_node(self._records[node_id].payload)

    def _doc_nodes(self, doc_id: str) -> list[BaseNode]:
        return [self._node(n) for n in sorted(self._by_doc.get(doc_id, ()), key=lambda n: self._records[n].fid)]

    # -- writes ----------------------------------------------------------------------------------
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        if not nodes:
            return []
        check_nodes(nodes)  # empty text, lone surrogates, two versions of one document: nothing written
        originals = [n.node_id for n in nodes]
        if isinstance(self._hook, KVSync):  # before any write: nothing longer than the window is stored
            nodes = self._hook.fit_nodes(nodes, split=self._split_oversized, embed_model=self._embed_model,
                                         embed_max_tokens=self._embed_max_tokens)
        vectors = []
        for node in nodes:
            if node.embedding is None:
                raise ValueError(
                    f"node {node.node_id!r} has no embedding; run an embedding model before adding it")
            vectors.append(node.embedding)
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError("all node embeddings must have the same length")
        payloads = [node_to_metadata_dict(n, remove_text=False, flat_metadata=self.flat_metadata) for n in nodes]
        changed: set[str] = set()
        with self._lock:
            if self._index is None:
                self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(matrix.shape[1]))
            if matrix.shape[1] != self._index.d:
                raise ValueError(f"embedding length {matrix.shape[1]} does not match the index dimension {self._index.d}")
            ids = [n.node_id for n in nodes]
            if len(set(ids)) != len(ids):
                raise ValueError("the same node id appears twice in one add() call")
            replaced = [i for i in ids if i in self._records]
            # a re-added node replaces every record of its previous version (its parts, if it was split)
            new = set(ids)
            replaced += [r for o in originals for r in (o, *self._parts_of(o)) if r in self._records and r not in new]
            changed.update(self._records[i].doc_id for i in replaced)
            self._remove(replaced)
            fids = np.arange(self._next_id, self._next_id + len(nodes), dtype=np.int64)
            self._index.add_with_ids(matrix, fids)
            self._next_id += len(nodes)
            for node, fid, payload in zip(nodes, fids.tolist(), payloads):
                doc_id = node_doc_id(node)
                self._records[node.node_id] = _Record(fid, doc_id, payload)
                self._by_doc.setdefault(doc_id, set()).add(node.node_id)
                self._by_fid[fid] = node.node_id
            current = {d: self._doc_nodes(d) for d in changed}
        if self._hook is not None:
            if current:
                self._hook.on_documents_changed(current)
            if isinstance(self._hook, KVSync):
                self._hook.ensure(list(nodes), show_progress=add_kwargs.get("show_progress"))
            else:
                self._hook.on_nodes_added(list(nodes))
        return ids

    def _parts_of(self, node_id: str) -> list[str]:
        """Stored parts of a node that was split to fit the window (caller holds the lock)."""
        parts, k = [], 0
        while f"{node_id}#part{k}" in self._records:
            parts.append(f"{node_id}#part{k}")
            k += 1
        return parts

    def _remove(self, node_ids: Sequence[str]) -> None:
        """Remove nodes from FAISS and the records; caller holds the lock."""
        if not node_ids:
            return
        fids = np.asarray([self._records[n].fid for n in node_ids], dtype=np.int64)
        removed = self._index.remove_ids(fids)
        if removed != len(fids):
            raise RuntimeError(f"FAISS removed {removed} of {len(fids)} vectors; the store is inconsistent")
        for n in node_ids:
            rec = self._records.pop(n)
            del self._by_fid[rec.fid]
            members = self._by_doc.get(rec.doc_id)
            if members is not None:
                members.discard(n)
                if not members:
                    del self._by_doc[rec.doc_id]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of a document and invalidate its KV (idempotent)."""
        with self._lock:
            self._remove(sorted(self._by_doc.get(ref_doc_id, ())))
        if self._hook is not None:
            # Also when no node was here: KV may have been registered at query time.
            self._hook.on_documents_changed({ref_doc_id: []})

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        if node_ids is None and filters is None:
            raise ValueError("delete_nodes needs node_ids, filters, or both")
        with self._lock:
            targets = self._select(node_ids, filters)
            touched = {self._records[n].doc_id for n in targets}
            self._remove(targets)
            current = {d: self._doc_nodes(d) for d in touched}
        if self._hook is not None and current:
            self._hook.on_documents_changed(current)

    def clear(self) -> None:
        with self._lock:
            touched = list(self._by_doc)
            if self._index is not None:
                self._index.reset()
            self._records.clear()
            self._by_doc.clear()
            self._by_fid.clear()
        if self._hook is not None and touched:
            self._hook.on_documents_changed({d: [] for d in touched})

    # -- reads -----------------------------------------------------------------------------------
    def _select(self, node_ids: Sequence[str] | None, filters: MetadataFilters | None) -> list[str]:
        candidates = [n for n in node_ids if n in self._records] if node_ids is not None else list(self._records)
        if filters is not None:
            keep = build_metadata_filter_fn(lambda n: self._records[n].payload, filters)
            candidates = [n for n in candidates if keep(n)]
        return candidates

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        with self._lock:
            return [self._node(n) for n in self._select(node_ids, filters)]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise NotImplementedError(f"query mode {query.mode!r} is not supported; use the default dense mode")
        if query.query_embedding is None:
            raise ValueError("the query has no embedding; set an embed_model on the index or retriever")
        with self._lock:
            if self._index is None or not self._records:
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            q = np.asarray([query.query_embedding], dtype=np.float32)
            if q.shape[1] != self._index.d:
                raise ValueError(f"query embedding length {q.shape[1]} does not match the index dimension {self._index.d}")
            params = None
            pool = len(self._records)
            # Empty lists mean "no restriction": VectorStoreIndex.as_retriever passes node_ids=[] for
            # stores that keep their own text.
            node_ids = query.node_ids or None
            filters = query.filters if query.filters is not None and query.filters.filters else None
            if node_ids is not None or query.doc_ids or filters is not None:
                allowed = self._select(node_ids, filters)
                if query.doc_ids:
                    docs = set(query.doc_ids)
                    allowed = [n for n in allowed if self._records[n].doc_id in docs]
                if not allowed:
                    return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
                sel = faiss.IDSelectorBatch(np.asarray([self._records[n].fid for n in allowed], dtype=np.int64))
                params = faiss.SearchParameters(sel=sel)
                pool = len(allowed)
            k = min(query.similarity_top_k, pool)
            if k <= 0:
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            dist, fids = self._index.search(q, k, params=params)
            nodes, sims, ids = [], [], []
            inner = self._index.metric_type == faiss.METRIC_INNER_PRODUCT
            for d, fid in zip(dist[0].tolist(), fids[0].tolist()):
                if fid < 0:
                    continue
                node_id = self._by_fid[fid]
                nodes.append(self._node(node_id))
                sims.append(d if inner else 1.0 / (1.0 + d))  # higher is better either way
                ids.append(node_id)
            return VectorStoreQueryResult(nodes=nodes, similarities=sims, ids=ids)

    # -- persistence -----------------------------------------------------------------------------
    def persist(self, persist_path: str, fs: Any | None = None) -> None:
        """Write the FAISS index to `persist_path` and the node records beside it (atomically)."""
        if fs is not None and "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            raise NotImplementedError("DaserFaissVectorStore persists to the local filesystem only")
        path = Path(persist_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            state = {
                "version": _FORMAT_VERSION,
                "has_index": self._index is not None,
                "next_id": self._next_id,
                "records": {n: {"fid": r.fid, "doc_id": r.doc_id, "payload": r.payload}
                            for n, r in self._records.items()},
            }
            sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
            tmp_side = sidecar.with_name(sidecar.name + ".tmp")
            tmp_side.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
            if self._index is not None:
                tmp_index = path.with_name(path.name + ".tmp")
                faiss.write_index(self._index, str(tmp_index))
                os.replace(tmp_index, path)
            os.replace(tmp_side, sidecar)

    @classmethod
    def from_persist_path(
        cls,
        persist_path: str,
        fs: Any | None = None,
        *,
        generator: IndexingEngine | None = None,
        hook: KnowledgeBaseHook | None = None,
        tenant: str = SHARED_TENANT,
    ) -> DaserFaissVectorStore:
        path = Path(persist_path)
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if not sidecar.exists():
            raise FileNotFoundError(f"no persisted store at {path} ({sidecar.name} is missing)")
        state = json.loads(sidecar.read_text(encoding="utf-8"))
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{sidecar} has format version {state.get('version')}, expected {_FORMAT_VERSION}")
        index = None
        if state["has_index"]:
            if not path.exists():
                raise FileNotFoundError(f"{sidecar.name} refers to a FAISS index at {path}, which is missing")
            index = faiss.read_index(str(path))
            if index.ntotal != len(state["records"]):
                raise ValueError(
                    f"{path} holds {index.ntotal} vectors but {sidecar.name} has {len(state['records'])} records")
        store = cls(generator=generator, hook=hook, tenant=tenant)
        store._index = index
        store._next_id = int(state["next_id"])
        for node_id, r in state["records"].items():
            rec = _Record(int(r["fid"]), r["doc_id"], r["payload"])
            store._records[node_id] = rec
            store._by_doc.setdefault(rec.doc_id, set()).add(node_id)
            store._by_fid[rec.fid] = node_id
        return store

    @classmethod
    def from_persist_dir(
        cls, persist_dir: str, namespace: str = "default", **kwargs: Any
    ) -> DaserFaissVectorStore:
        from llama_index.core.vector_stores.simple import (
            DEFAULT_PERSIST_FNAME as VS_FNAME,
        )
        from llama_index.core.vector_stores.simple import NAMESPACE_SEP

        return cls.from_persist_path(str(Path(persist_dir) / f"{namespace}{NAMESPACE_SEP}{VS_FNAME}"), **kwargs)


InvalidatingFaissVectorStore = DaserFaissVectorStore
"""The old name of `DaserFaissVectorStore`."""
