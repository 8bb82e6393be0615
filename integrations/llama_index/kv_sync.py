"""KV bookkeeping for LlamaIndex nodes: the bridge between node ids and content-keyed KV.

LlamaIndex identifies chunks by node ids that are random per ingest; daser-rag keys chunk KV
by content. This module keeps the two apart: KV is keyed on the node's *rendered* text (what
the LLM sees, `MetadataMode.LLM`), and the node's document id (its `ref_doc_id`) is carried
only so that a knowledge-base change can drop exactly the KV of the documents it touched.

It is also the only place in this package that reaches past the `KVGenerator` protocol into
an in-process generator's store (`_LocalKV`). A generator without that access (a remote
client) still works: KV is then computed lazily on first use and invalidation goes through
`KVGenerator.invalidate`, so nothing stale is ever served, only less is precomputed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

from daser_rag.api import KVGenerator
from daser_rag.errors import InvalidInputError
from daser_rag.types import ChunkRef, Document


def node_doc_id(node: BaseNode) -> str:
    """The document a node's KV belongs to: its source document, or itself if it has none.

    The same rule as `IngestionPipeline._handle_upserts`, so upserts and KV agree on identity.
    """
    return node.ref_doc_id or node.node_id


def rendered_text(node: BaseNode) -> str:
    """The exact text the LLM sees for this node; its KV is keyed on this."""
    return node.get_content(metadata_mode=MetadataMode.LLM)


def node_chunk_ref(node: BaseNode | NodeWithScore) -> ChunkRef:
    if isinstance(node, NodeWithScore):
        node = node.node
    text = rendered_text(node)
    if not text.strip():
        raise InvalidInputError(f"node {node.node_id!r} has no text to place in the prompt")
    return ChunkRef(text=text, doc_id=node_doc_id(node), chunk_id=node.node_id)


ContextLike = str | ChunkRef | Document | BaseNode | NodeWithScore


def to_context_items(contexts: Iterable[ContextLike] | None) -> list[str | ChunkRef | Document] | None:
    """Normalize LlamaIndex nodes into generator context items, keeping their order and boundaries."""
    if contexts is None:
        return None
    if isinstance(contexts, (str, bytes)):
        raise InvalidInputError("contexts must be a list of chunks, not a single string")
    out: list[str | ChunkRef | Document] = []
    for item in contexts:
        if isinstance(item, (BaseNode, NodeWithScore)):
            out.append(node_chunk_ref(item))
        elif isinstance(item, (str, ChunkRef, Document)):
            out.append(item)
        else:
            raise InvalidInputError(
                "contexts items must be str, ChunkRef, Document, BaseNode or NodeWithScore, "
                f"got {type(item).__name__}")
    return out


@dataclass
class PrecomputeReport:
    nodes: int = 0
    computed: int = 0
    reused: int = 0
    deferred: int = 0  # generator offers no precompute: KV is built on first use instead
    skipped_empty: int = 0
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)


class _LocalKV:
    """Direct access to an in-process generator's KV store (CacheAwareGenerator).

    Isolated here so the rest of the adapter depends on the KVGenerator protocol alone.
    """

    REQUIRED = ("chunk_key_for", "compute_chunk", "store", "prompt")

    def __init__(self, generator: Any) -> None:
        self.gen = generator
        self.store = generator.store

    @classmethod
    def probe(cls, generator: Any) -> _LocalKV | None:
        if all(hasattr(generator, n) for n in cls.REQUIRED) and hasattr(generator.store, "index"):
            return cls(generator)
        return None

    def lock(self) -> Any:
        lock = getattr(self.gen, "lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def key(self, text: str, tenant: str) -> str:
        return self.gen.chunk_key_for(text, tenant)

    def ensure(self, text: str, key: str, tenant: str) -> bool:
        """Compute and store the chunk's KV unless present. True if it was computed."""
        with self.lock():
            if self.store.contains(key):
                return False
            ids = self.gen.prompt.chunk_ids(text)
            self.store.put(self.gen.compute_chunk(ids, key, tenant))
            return True

    def add_refs(self, doc_id: str, keys: Sequence[str], tenant: str) -> None:
        self.store.add_refs(doc_id, list(keys), tenant)

    def replace_refs(self, doc_id: str, keys: Sequence[str], tenant: str) -> list[str]:
        with self.lock():
            return self.store.replace_document_refs(doc_id, list(keys), tenant)

    def contains(self, key: str) -> bool:
        return self.store.contains(key)

    def doc_keys(self, doc_id: str, tenant: str) -> list[str]:
        return self.store.index.chunk_keys(doc_id, tenant)

    def context_window(self) -> int | None:
        runner = getattr(self.gen, "runner", None)
        return getattr(runner, "max_positions", None)


class KVSync:
    """Keeps a generator's chunk KV in step with a LlamaIndex knowledge base.

    Implements the vector store's `KnowledgeBaseHook`: nodes added -> their KV is ensured and
    referenced by their document; a document's node set changed -> its refs become exactly the
    keys of its current nodes (KV nobody else references is dropped); no nodes left -> the
    document is invalidated.
    """

    def __init__(self, generator: KVGenerator, *, tenant: str = "", show_progress: bool = False) -> None:
        if not isinstance(generator, KVGenerator):
            raise TypeError(
                f"expected an object satisfying daser_rag.api.KVGenerator, got {type(generator).__name__}")
        self.generator = generator
        self.tenant = tenant
        self.show_progress = show_progress
        self._local = _LocalKV.probe(generator)

    @property
    def precomputes(self) -> bool:
        """Whether chunk KV can be computed at index time (in-process generator)."""
        return self._local is not None

    def key_for(self, text_or_node: str | BaseNode) -> str | None:
        text = rendered_text(text_or_node) if isinstance(text_or_node, BaseNode) else text_or_node
        return self._local.key(text, self.tenant) if self._local else None

    def contains(self, key: str) -> bool:
        if self._local is None:
            raise NotImplementedError("this generator does not expose its KV store")
        return self._local.contains(key)

    def document_keys(self, doc_id: str) -> list[str]:
        if self._local is None:
            raise NotImplementedError("this generator does not expose its KV store")
        return self._local.doc_keys(doc_id, self.tenant)

    def context_window(self) -> int | None:
        return self._local.context_window() if self._local else None

    # -- index time ------------------------------------------------------------------------------
    def ensure(self, nodes: Sequence[BaseNode], *, show_progress: bool | None = None) -> PrecomputeReport:
        """Make sure every node's chunk KV is stored and referenced by the node's document."""
        report = PrecomputeReport(nodes=len(nodes))
        t0 = time.perf_counter()
        if self._local is None:
            report.deferred = len(nodes)
            return report
        show = self.show_progress if show_progress is None else show_progress
        bar = None
        if show and nodes:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(nodes), desc="daser-rag: chunk KV", unit="chunk")
        refs: dict[str, list[str]] = {}
        try:
            for node in nodes:
                text = rendered_text(node)
                if not text.strip():
                    report.skipped_empty += 1
                else:
                    key = self._local.key(text, self.tenant)
                    if self._local.ensure(text, key, self.tenant):
                        report.computed += 1
                    else:
                        report.reused += 1
                    report.keys.append(key)
                    refs.setdefault(node_doc_id(node), []).append(key)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        for doc_id, keys in refs.items():
            self._local.add_refs(doc_id, keys, self.tenant)
        report.seconds = time.perf_counter() - t0
        return report

    def _invalidate(self, doc_id: str) -> list[str]:
        # An empty tenant is left out so that a remote client's own default tenant applies.
        dropped = self.generator.invalidate(doc_id, tenant=self.tenant) if self.tenant else \
            self.generator.invalidate(doc_id)
        return list(dropped)

    # -- KnowledgeBaseHook -----------------------------------------------------------------------
    def on_nodes_added(self, nodes: Sequence[BaseNode]) -> None:
        # Also covers an IngestionPipeline cache hit, which skips KVPrecomputeTransform.
        self.ensure(nodes)

    def on_documents_changed(self, current: Mapping[str, Sequence[BaseNode]]) -> dict[str, list[str]]:
        """`current` maps each touched document id to the nodes it has now. Returns dropped keys."""
        dropped: dict[str, list[str]] = {}
        for doc_id, nodes in current.items():
            texts = [t for t in (rendered_text(n) for n in nodes) if t.strip()]
            if not texts:
                dropped[doc_id] = self._invalidate(doc_id)
            elif self._local is not None:
                keys = [self._local.key(t, self.tenant) for t in texts]
                dropped[doc_id] = self._local.replace_refs(doc_id, keys, self.tenant)
            else:
                # No ref-level access: dropping the whole document is coarse but never stale.
                dropped[doc_id] = self._invalidate(doc_id)
        return dropped
