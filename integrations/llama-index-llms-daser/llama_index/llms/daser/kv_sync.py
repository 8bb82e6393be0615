"""KV bookkeeping for LlamaIndex nodes: the bridge between node ids and content-keyed KV.

LlamaIndex identifies chunks by node ids that are random per ingest; daser-rag keys chunk KV
by content. This module keeps the two apart: KV is keyed on the node's *rendered* text (what
the LLM sees, `MetadataMode.LLM`), and the node's document id (its `ref_doc_id`) is carried
only so that a knowledge-base change can drop exactly the KV of the documents it touched.

It programs against the engine protocol's index-time side only
(`daser_rag.engine.protocol.IndexingEngine`): daser's embedded engine, the vLLM control plane
and `DaserClient` (the service) all precompute a node's chunk KV at index time, tie it to the
node's document, and replace or drop a document's refs when its node set changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, NodeWithScore, TextNode

from daser_rag.context import SHARED_TENANT
from daser_rag.embed_window import BUNDLED_EMBED_MAX_TOKENS as BUNDLED_EMBED_MAX_TOKENS  # re-exported
from daser_rag.embed_window import Counter, bundled_window, counter, fit_parts
from daser_rag.engine.protocol import IndexingEngine
from daser_rag.errors import InvalidInputError
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.textcheck import check_document_text, duplicate_ids_error
from daser_rag.types import ChunkRef, Document

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


def node_text(node: BaseNode) -> object:
    """A node's own text (no metadata): what must not be empty."""
    try:
        return node.get_content(metadata_mode=MetadataMode.NONE)
    except UnicodeError as exc:  # pragma: no cover - defensive: LlamaIndex hashing/encoding a bad str
        raise InvalidInputError(f"{node_doc_id(node)!r}: {exc}") from None


def check_nodes(nodes: Sequence[BaseNode]) -> None:
    """Reject, before anything is written, what would poison the index: a node with no text (an
    empty or None Document: every later query retrieving it would fail), text with a lone
    surrogate, and two versions of one document in the same call (two Documents with one id,
    which LlamaIndex would store side by side). Same errors as the core's `add_documents`.
    """
    source_hash: dict[str, str | None] = {}
    spans: set[tuple[Any, ...]] = set()
    node_ids: set[str] = set()
    dups: list[str] = []
    for node in nodes:
        doc = node_doc_id(node)
        text = node_text(node)
        check_document_text(doc, text)
        src = node.source_node
        if src is None:  # a document (or a node without one): its own id must be unique
            if node.node_id in node_ids:
                dups.append(node.node_id)
            node_ids.add(node.node_id)
            continue
        # nodes of one document come from one version of it (one source hash) and do not repeat
        h = src.hash
        if doc in source_hash and source_hash[doc] != h:
            dups.append(doc)
        source_hash.setdefault(doc, h)
        span = (doc, getattr(node, "start_char_idx", None), getattr(node, "end_char_idx", None), text)
        if span in spans:
            dups.append(doc)
        spans.add(span)
    if dups:
        raise duplicate_ids_error(list(dict.fromkeys(dups)))


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
    deferred: int = 0  # kept for compatibility: every engine precomputes now, so always 0
    skipped_empty: int = 0
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)


def embedding_window(embed_model: Any | None = None, max_tokens: int | None = None) -> tuple[Counter | None, int]:
    """(count_tokens(text) -> int, window) of the embedding that will read split parts.

    `max_tokens` wins (0: no embedding limit); then `embed_model` (its tokenizer and
    `max_length`, as MiniLMEmbedding has); then the bundled all-MiniLM-L6-v2 tokenizer (256
    tokens), which is what the integration's own embedding reads (daser_rag.embed_window, shared
    with the LangChain adapter). (None, 0) when none is known: no embedding limit.
    """
    tok = getattr(embed_model, "_tokenizer", None) if embed_model is not None else None
    window = max_tokens if max_tokens is not None else getattr(embed_model, "max_length", None)
    if tok is None and (embed_model is None or isinstance(getattr(embed_model, "max_length", None), int)):
        return bundled_window(window)
    if tok is None or not window:
        return (None, 0)
    return (counter(tok), int(window))


class KVSync:
    """Keeps a generator's chunk KV in step with a LlamaIndex knowledge base.

    Implements the vector store's `KnowledgeBaseHook`: nodes added -> their KV is ensured and
    referenced by their document; a document's node set changed -> its refs become exactly the
    keys of its current nodes (KV nobody else references is dropped); no nodes left -> the
    document is invalidated.
    """

    def __init__(self, generator: IndexingEngine, *, tenant: str = SHARED_TENANT,
                 show_progress: bool | None = None) -> None:
        if not isinstance(generator, IndexingEngine):
            raise TypeError(
                "expected an engine satisfying daser_rag.engine.protocol.IndexingEngine (CacheAwareGenerator, "
                f"the vLLM engine, or DaserClient), got {type(generator).__name__}")
        self.generator = generator
        self.tenant = tenant
        self.show_progress = show_progress

    @property
    def precomputes(self) -> bool:
        """Chunk KV is computed at index time, through any engine (in process or the service)."""
        return True

    def key_for(self, text_or_node: str | BaseNode) -> str:
        text = rendered_text(text_or_node) if isinstance(text_or_node, BaseNode) else text_or_node
        return self.generator.chunk_info([text], tenant=self.tenant)[0].key

    def contains(self, key: str) -> bool:
        return self.generator.stored([key])[0]

    def document_keys(self, doc_id: str) -> list[str]:
        return self.generator.document_keys(doc_id, tenant=self.tenant)

    def context_window(self) -> int | None:
        return self.generator.context_window

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
        self, nodes: Sequence[BaseNode], *, split: bool = True, embed_model: Any | None = None,
        embed_max_tokens: int | None = None,
    ) -> list[BaseNode]:
        """Nodes that fit the model's window: a longer node (a `Document` included) is split
        into parts, or, with `split=False`, rejected with InvalidInputError before anything is
        written or computed.

        Parts also fit the embedding model's window, so that retrieval sees every fact of a part
        (all-MiniLM-L6-v2 reads 256 tokens and silently drops the rest): the limit is
        `embed_max_tokens`, else the window of `embed_model` (`max_length`), else that of the
        bundled MiniLM when it is installed. A part keeps its node's metadata and document
        (SOURCE relationship); its embedding is computed with `embed_model` when given,
        otherwise the node's embedding is carried over (None if the node had none, so a later
        embedding step fills it in; pass `embed_model` when the node was embedded already,
        since its vector describes only the node's first 256 embedding tokens).
        """
        limit = self.max_chunk_tokens()
        if limit is None:
            return list(nodes)
        out: list[BaseNode] = []
        embed_fit: tuple[Counter | None, int] | None = None
        texts = [rendered_text(node) for node in nodes]
        sized = [t for t in texts if t.strip()]
        sizes = iter([c.tokens for c in self.generator.chunk_info(sized, tenant=self.tenant)] if sized else [])
        for node, text in zip(nodes, texts):
            size = next(sizes) if text.strip() else 0
            if size <= limit:
                out.append(node)
                continue
            where = (f"node {node.node_id!r} (document {node_doc_id(node)!r}) has {size} tokens; at most {limit} fit "
                     f"the model's {self.context_window()}-token window with a question and an answer")
            if not split:
                raise InvalidInputError(f"{where}: split it first (nothing was written)")
            if embed_fit is None:
                embed_fit = embedding_window(embed_model, embed_max_tokens)
            out.extend(self._split_node(node, limit, where, embed_model, embed_fit))
        return out

    def _split_node(self, node: BaseNode, limit: int, where: str, embed_model: Any | None,
                    embed_fit: tuple[Counter | None, int]) -> list[BaseNode]:
        source = node.as_related_node_info() if node.source_node is None or node.ref_doc_id is None \
            else node.source_node
        count_embed, embed_max = embed_fit

        def part_node(i: int, piece: str) -> TextNode:
            return TextNode(
                id_=f"{node.node_id}#part{i}",
                text=piece,
                metadata=dict(node.metadata),
                excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
                excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
                metadata_template=node.metadata_template,
                metadata_separator=node.metadata_separator,
                text_template=getattr(node, "text_template", TextNode.model_fields["text_template"].default),
                relationships={NodeRelationship.SOURCE: source},
                # without embed_model a part carries its node's vector (None before an embedding step)
                embedding=None if embed_model is not None else node.embedding,
            )

        def fits(piece: str) -> bool:
            part = part_node(0, piece)
            if self.generator.chunk_info([rendered_text(part)], tenant=self.tenant)[0].tokens > limit:
                return False
            return count_embed is None or embed_max <= 0 or \
                count_embed(part.get_content(metadata_mode=MetadataMode.EMBED)) <= embed_max

        start = limit if embed_max <= 0 else min(limit, embed_max)
        pieces = fit_parts(node.get_content(metadata_mode=MetadataMode.NONE), self.generator.split, fits, start,
                           where)
        parts: list[BaseNode] = [part_node(i, p) for i, p in enumerate(pieces)]
        if embed_model is not None and parts:
            vectors = embed_model.get_text_embedding_batch(
                [p.get_content(metadata_mode=MetadataMode.EMBED) for p in parts])
            for part, vector in zip(parts, vectors):
                part.embedding = vector
        return parts

    # -- index time ------------------------------------------------------------------------------
    def ensure(self, nodes: Sequence[BaseNode], *, show_progress: bool | None = None) -> PrecomputeReport:
        """Make sure every node's chunk KV is stored and referenced by the node's document: one
        `add_chunks` call to the engine, which computes what is missing (on vLLM, batched;
        behind the service, through its routes) and registers a document it does not know."""
        report = PrecomputeReport(nodes=len(nodes))
        t0 = time.perf_counter()
        groups: dict[str, list[str]] = {}
        for node in nodes:
            text = rendered_text(node)
            if not text.strip():
                report.skipped_empty += 1
            else:
                groups.setdefault(node_doc_id(node), []).append(text)
        if groups:
            show = self.show_progress if show_progress is None else show_progress
            done = self.generator.add_chunks(groups, tenant=self.tenant, progress=show)
            report.computed, report.reused = done.computed, done.reused
            keys = {d: iter(k) for d, k in done.keys.items()}
            report.keys = [next(keys[node_doc_id(n)]) for n in nodes if rendered_text(n).strip()]
        report.seconds = time.perf_counter() - t0
        return report

    def _invalidate(self, doc_id: str) -> list[str]:
        return list(self.generator.invalidate(doc_id, tenant=self.tenant))

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
            else:
                dropped[doc_id] = self.generator.replace_refs(doc_id, texts, tenant=self.tenant)
        return dropped
