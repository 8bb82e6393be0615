"""KV precompute as an IngestionPipeline step: chunk KV is built at index time, not on the first query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from daser_rag.context import SHARED_TENANT
from daser_rag.engine.protocol import IndexingEngine
from llama_index.llms.daser.kv_sync import KVSync, PrecomputeReport, check_nodes


class KVPrecomputeTransform(TransformComponent):
    """Compute and store each node's chunk KV (keyed on its rendered text), at index time,
    through any engine of the engine protocol: daser's own, the vLLM control plane, or the
    service (`DaserClient`), which computes it on its engine (vLLM: batched prefills).

    Put it after the node parser and before the embedding step: a node or `Document` longer
    than the model's window is split into parts that fit both the model's window and the
    embedding's (`embed_max_tokens`; default: the window of `embed_model`, else the bundled
    all-MiniLM-L6-v2's 256 tokens), and the embedding step then embeds each part whole. Placed
    after the embedding step, pass `embed_model=` so that parts get their own embeddings.
    With `split_oversized=False` an oversized node raises InvalidInputError instead, before any
    KV is computed. Other nodes pass through unchanged.

    A node with no text (an empty or None `Document`), text with a lone surrogate, or two
    versions of one document in one call raise the same InvalidInputError as the core's
    `add_documents`, before any KV is computed.

    The pipeline's cache skips a transform on a hit, and KV lives outside the nodes, so a hit
    alone cannot vouch for the KV: `DaserFaissVectorStore.add` re-checks every node it receives
    and computes what is missing, which is what keeps a cache hit from leaving chunks without
    KV. With any other vector store, run the pipeline with the cache disabled.
    """

    show_progress: bool = Field(default=True, description="Show a progress bar while computing KV.")
    tenant: str = Field(default="", description="Tenant salt for the chunk keys.")
    split_oversized: bool = Field(default=True, description="Split nodes longer than the model's window.")
    embed_max_tokens: int | None = Field(
        default=None, description="Most embedding tokens per split part (None: the embedding model's window, "
                                  "else the bundled MiniLM's 256; 0: no embedding limit).")

    _sync: KVSync = PrivateAttr()
    _embed_model: Any = PrivateAttr(default=None)
    _reports: list[PrecomputeReport] = PrivateAttr(default_factory=list)

    def __init__(self, generator: IndexingEngine | KVSync, *, show_progress: bool = True,
                 tenant: str = SHARED_TENANT,
                 split_oversized: bool = True, embed_model: Any | None = None, embed_max_tokens: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(show_progress=show_progress, tenant=tenant, split_oversized=split_oversized,
                         embed_max_tokens=embed_max_tokens, **kwargs)
        self._sync = generator if isinstance(generator, KVSync) else KVSync(generator, tenant=tenant)
        self._embed_model = embed_model

    @classmethod
    def class_name(cls) -> str:
        return "DaserKVPrecomputeTransform"

    @property
    def kv(self) -> KVSync:
        return self._sync

    @property
    def reports(self) -> list[PrecomputeReport]:
        """One report per call, oldest first (a pipeline cache hit adds none)."""
        return list(self._reports)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        check_nodes(list(nodes))
        fitted = self._sync.fit_nodes(list(nodes), split=self.split_oversized, embed_model=self._embed_model,
                                      embed_max_tokens=self.embed_max_tokens)
        show = kwargs.get("show_progress")
        report = self._sync.ensure(fitted, show_progress=self.show_progress if show is None else bool(show))
        self._reports.append(report)
        return fitted

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        # KV compute is CPU/GPU bound: keep it off the event loop.
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
