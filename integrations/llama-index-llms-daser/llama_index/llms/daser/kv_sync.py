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

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, NodeWithScore, TextNode

from daser_rag.api import KVGenerator
from daser_rag.errors import InvalidInputError
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.types import ChunkRef, Document, ResolvedChunk

PROGRESS_AUTO_NODES = 16
"""With show_progress=None (auto), a progress bar appears when at least this many nodes are processed."""

RESERVED_TOKENS = DEFAULT_MAX_NEW_TOKENS + 256
"""Room a chunk must leave in the model's window for the system prompt, a question and an answer."""


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
    """An in-process generator's KV store, reached through the generator's public protocol
    (`lock`, `resolve`, `compute_chunk`, `store`, `runner.max_positions`).

    Isolated here so the rest of the adapter depends on the KVGenerator protocol alone.
    """

    REQUIRED = ("lock", "resolve", "compute_chunk", "store", "runner")

    def __init__(self, generator: Any) -> None:
        self.gen = generator
        self.store = generator.store

    @classmethod
    def probe(cls, generator: Any) -> _LocalKV | None:
        if all(hasattr(generator, n) for n in cls.REQUIRED) and hasattr(generator.store, "document_chunk_keys"):
            return cls(generator)
        return None

    def piece(self, text: str, tenant: str) -> ResolvedChunk:
        """The chunk as the generator places it: token ids and store key (reads nothing)."""
        return self.gen.resolve([text], tenant)[0]

    def ensure(self, piece: ResolvedChunk, tenant: str) -> bool:
        """Compute and store the chunk's KV unless present. True if it was computed."""
        with self.gen.lock:
            if self.store.contains(piece.key):
                return False
            self.store.put(self.gen.compute_chunk(list(piece.token_ids), piece.key, tenant))
            return True

    def add_refs(self, doc_id: str, keys: Sequence[str], tenant: str) -> None:
        self.store.add_refs(doc_id, list(keys), tenant)

    def replace_refs(self, doc_id: str, keys: Sequence[str], tenant: str) -> list[str]:
        with self.gen.lock:
            return self.store.replace_document_refs(doc_id, list(keys), tenant)

    def contains(self, key: str) -> bool:
        return self.store.contains(key)

    def doc_keys(self, doc_id: str, tenant: str) -> list[str]:
        return self.store.document_chunk_keys(doc_id, tenant)

    def context_window(self) -> int | None:
        return getattr(self.gen.runner, "max_positions", None)


class KVSync:
    """Keeps a generator's chunk KV in step with a LlamaIndex knowledge base.

    Implements the vector store's `KnowledgeBaseHook`: nodes added -> their KV is ensured and
    referenced by their document; a document's node set changed -> its refs become exactly the
    keys of its current nodes (KV nobody else references is dropped); no nodes left -> the
    document is invalidated.
    """

    def __init__(self, generator: KVGenerator, *, tenant: str = "", show_progress: bool | None = None) -> None:
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
        return self._local.piece(text, self.tenant).key if self._local else None

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

    # -- oversized nodes ---------------------------------------------------------------------------
    def max_chunk_tokens(self) -> int | None:
        """The longest node (in tokens) whose KV is ever computed: the model's window less room
        for the system prompt, a question and an answer. None when the window is unknown (a
        remote generator: the service checks lengths itself)."""
        window = self.context_window()
        if not window:
            return None
        return window - min(window // 2, RESERVED_TOKENS)

    def fit_nodes(
        self, nodes: Sequence[BaseNode], *, split: bool = True, embed_model: Any | None = None
    ) -> list[BaseNode]:
        """Nodes that fit the model's window: a longer node is split into parts (the generator's
        `split`, so at most `chunk_tokens` tokens each), or, with `split=False`, rejected with
        InvalidInputError before anything is written or computed.

        A part keeps its node's metadata and document (SOURCE relationship); its embedding is
        computed with `embed_model` when given, otherwise the node's embedding is carried over
        (None if the node had none, so a later embedding step fills it in).
        """
        limit = self.max_chunk_tokens()
        if limit is None or self._local is None:
            return list(nodes)
        out: list[BaseNode] = []
        for node in nodes:
            text = rendered_text(node)
            size = self._local.piece(text, self.tenant).num_tokens if text.strip() else 0
            if size <= limit:
                out.append(node)
                continue
            where = (f"node {node.node_id!r} (document {node_doc_id(node)!r}) has {size} tokens; at most {limit} fit "
                     f"the model's {self.context_window()}-token window with a question and an answer")
            if not split:
                raise InvalidInputError(f"{where}: split it first (nothing was written)")
            if not isinstance(node, TextNode):
                raise InvalidInputError(f"{where}, and a {type(node).__name__} cannot be split (nothing was written)")
            out.extend(self._split_node(node, limit, where, embed_model))
        return out

    def _split_node(self, node: TextNode, limit: int, where: str, embed_model: Any | None) -> list[BaseNode]:
        source = node.source_node or node.as_related_node_info()
        parts: list[BaseNode] = []
        for i, piece in enumerate(self.generator.split(node.get_content(metadata_mode=MetadataMode.NONE))):
            part = TextNode(
                id_=f"{node.node_id}#part{i}",
                text=piece,
                metadata=dict(node.metadata),
                excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
                excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
                metadata_template=node.metadata_template,
                metadata_separator=node.metadata_separator,
                text_template=node.text_template,
                relationships={NodeRelationship.SOURCE: source},
                embedding=None if embed_model is not None else node.embedding,
            )
            size = self._local.piece(rendered_text(part), self.tenant).num_tokens  # type: ignore[union-attr]
            if size > limit:
                raise InvalidInputError(f"{where}, and a part still has {size} tokens (its metadata is too long, or "
                                        "the generator's chunk_tokens exceeds the window); nothing was written")
            parts.append(part)
        if embed_model is not None and parts:
            vectors = embed_model.get_text_embedding_batch(
                [p.get_content(metadata_mode=MetadataMode.EMBED) for p in parts])
            for part, vector in zip(parts, vectors):
                part.embedding = vector
        return parts

    # -- index time ------------------------------------------------------------------------------
    def ensure(self, nodes: Sequence[BaseNode], *, show_progress: bool | None = None) -> PrecomputeReport:
        """Make sure every node's chunk KV is stored and referenced by the node's document."""
        report = PrecomputeReport(nodes=len(nodes))
        t0 = time.perf_counter()
        if self._local is None:
            report.deferred = len(nodes)
            self._register_remote(nodes)
            return report
        show = self.show_progress if show_progress is None else show_progress
        if show is None:  # auto: a bar for work that takes a while
            show = len(nodes) >= PROGRESS_AUTO_NODES
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
                    piece = self._local.piece(text, self.tenant)
                    key = piece.key
                    if self._local.ensure(piece, self.tenant):
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

    def _register_remote(self, nodes: Sequence[BaseNode]) -> None:
        """Make a remote service know the nodes' documents (it refuses refs to unknown ones).

        Registration only (no KV computed): each node's KV is computed on first use and, being
        referenced by its document then, dropped when the document is invalidated.
        """
        texts: dict[str, list[str]] = {}
        for node in nodes:
            text = rendered_text(node)
            if text.strip():
                texts.setdefault(node_doc_id(node), []).append(text)
        if texts:
            docs = [Document(doc_id, "\n\n".join(parts)) for doc_id, parts in texts.items()]
            self.generator.add_documents(docs, precompute=False, **({"tenant": self.tenant} if self.tenant else {}))

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
                keys = [self._local.piece(t, self.tenant).key for t in texts]
                dropped[doc_id] = self._local.replace_refs(doc_id, keys, self.tenant)
            else:
                # No ref-level access: dropping the whole document is coarse but never stale;
                # the nodes it still has are registered again, so queries may name it.
                dropped[doc_id] = self._invalidate(doc_id)
                self._register_remote(nodes)
        return dropped
