"""KV precompute as an IngestionPipeline step: chunk KV is built at index time, not on the first query."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from integrations.llama_index.kv_sync import KVSync, PrecomputeReport


class KVPrecomputeTransform(TransformComponent):
    """Compute and store each node's chunk KV (keyed on its rendered text); nodes pass through unchanged.

    Put it after the node parser (and usually after the embedding step). The pipeline's cache
    skips a transform on a hit, and KV lives outside the nodes, so a hit alone cannot vouch for
    the KV: `InvalidatingFaissVectorStore.add` re-checks every node it receives and computes what
    is missing, which is what keeps a cache hit from leaving chunks without KV. With any other
    vector store, run the pipeline with the cache disabled.
    """

    show_progress: bool = Field(default=True, description="Show a progress bar while computing KV.")
    tenant: str = Field(default="", description="Tenant salt for the chunk keys.")

    _sync: KVSync = PrivateAttr()
    _reports: list[PrecomputeReport] = PrivateAttr(default_factory=list)

    def __init__(self, generator: Any, *, show_progress: bool = True, tenant: str = "", **kwargs: Any) -> None:
        super().__init__(show_progress=show_progress, tenant=tenant, **kwargs)
        self._sync = generator if isinstance(generator, KVSync) else KVSync(generator, tenant=tenant)

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
        report = self._sync.ensure(list(nodes), show_progress=self.show_progress)
        self._reports.append(report)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        # KV compute is CPU/GPU bound: keep it off the event loop.
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
