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
from daser_rag.kv.keys import text_digest
from daser_rag.chunking import split_text
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.textcheck import check_document_text, duplicate_ids_error
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
    deferred: int = 0  # generator offers no precompute: KV is built on first use instead
    skipped_empty: int = 0
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)


def embedding_window(embed_model: Any | None = None, max_tokens: int | None = None) -> tuple[Any, int]:
    """(count_tokens(text) -> int, window) of the embedding that will read split parts.

    `max_tokens` wins; then `embed_model` (its tokenizer and `max_length`, as MiniLMEmbedding
    has); then the bundled all-MiniLM-L6-v2 tokenizer (256 tokens), which is what the
    integration's own embedding reads. (None, 0) when none is known: no embedding limit.
    """
    tok = getattr(embed_model, "_tokenizer", None) if embed_model is not None else None
    window = max_tokens if max_tokens is not None else getattr(embed_model, "max_length", None)
    if tok is None and (embed_model is None or isinstance(getattr(embed_model, "max_length", None), int)):
        tok = _bundled_embed_tokenizer()
        if window is None and tok is not None:
            window = BUNDLED_EMBED_MAX_TOKENS
    if tok is None or not window:
        return (None, 0)
    return (lambda text: len(tok(text, truncation=False)["input_ids"]), int(window))


BUNDLED_EMBED_MAX_TOKENS = 256
"""all-MiniLM-L6-v2 (MiniLMEmbedding's model) reads at most this many tokens of a text."""

_EMBED_TOKENIZER: list[Any] = []


def _bundled_embed_tokenizer() -> Any:
    """The bundled MiniLM's tokenizer (offline, loaded once), or None when it is not installed."""
    if not _EMBED_TOKENIZER:
        try:
            from transformers import AutoTokenizer

            from llama_index.llms.daser.embeddings import bundled_model_dir

            _EMBED_TOKENIZER.append(AutoTokenizer.from_pretrained(str(bundled_model_dir()), local_files_only=True))
        except Exception:  # noqa: BLE001 - no bundled embedding: parts are bounded by the LLM's window only
            _EMBED_TOKENIZER.append(None)
    return _EMBED_TOKENIZER[0]


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

    def add_refs(self, doc_id: str, keys: Sequence[str], tenant: str, texts: Sequence[str] = ()) -> None:
        """Tie keys to the node's document. A document the store does not know (new, or removed
        by an upsert a moment ago) is registered first, with these texts: the store refuses bare
        refs to a removed document (no ghost refs), which would leave the new version's KV
        without an owner and so never invalidated."""
        with self.gen.lock:
            if texts and self.store.document_info(doc_id, tenant) is None:
                self.store.register_document(doc_id, list(texts), text_digest("\n\n".join(texts)), tenant)
                self.store.replace_document_refs(doc_id, list(keys), tenant)
            else:
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
        if limit is None or self._local is None:
            return list(nodes)
        out: list[BaseNode] = []
        embed_fit: tuple[Any, int] | None = None
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
            if embed_fit is None:
                embed_fit = embedding_window(embed_model, embed_max_tokens)
            out.extend(self._split_node(node, limit, where, embed_model, embed_fit))
        return out

    def _split_node(self, node: BaseNode, limit: int, where: str, embed_model: Any | None,
                    embed_fit: tuple[Any, int]) -> list[BaseNode]:
        source = node.as_related_node_info() if node.source_node is None or node.ref_doc_id is None \
            else node.source_node
        count_embed, embed_max = embed_fit
        tokenizer = self._local.gen.tokenizer  # type: ignore[union-attr]

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
            if self._local.piece(rendered_text(part), self.tenant).num_tokens > limit:  # type: ignore[union-attr]
                return False
            return embed_max <= 0 or count_embed(part.get_content(metadata_mode=MetadataMode.EMBED)) <= embed_max

        def pieces(text: str, max_tokens: int) -> list[str]:
            out: list[str] = []
            for piece in split_text(tokenizer, text, max_tokens):
                if fits(piece):
                    out.append(piece)
                elif max_tokens <= 8:
                    raise InvalidInputError(
                        f"{where}, and even an 8-token part does not fit (its metadata is too long for the "
                        f"model's or the embedding's window); nothing was written")
                else:
                    out.extend(pieces(piece, max(8, max_tokens * 3 // 4)))
            return out

        start = limit if embed_max <= 0 else min(limit, embed_max)
        parts: list[BaseNode] = [part_node(i, p) for i, p in
                                 enumerate(pieces(node.get_content(metadata_mode=MetadataMode.NONE), start))]
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
        texts: dict[str, list[str]] = {}
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
                    texts.setdefault(node_doc_id(node), []).append(text)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        for doc_id, keys in refs.items():
            self._local.add_refs(doc_id, keys, self.tenant, texts[doc_id])
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
