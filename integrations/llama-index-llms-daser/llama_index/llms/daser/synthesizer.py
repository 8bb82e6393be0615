"""CacheAwareSynthesizer: hands retrieved nodes to daser-rag as chunks, not as one stuffed prompt.

LlamaIndex synthesizers see the retrieved nodes only in `synthesize()`; the stock ones then
format them into one flat prompt string, which loses chunk identity and with it any chance to
reuse chunk KV. This synthesizer overrides `synthesize`/`asynthesize` to pass each node (its
exact rendered text, node id and document id) as its own chunk, so
`RetrieverQueryEngine.from_args(retriever, response_synthesizer=CacheAwareSynthesizer(llm))`
answers from cached KV and keeps `source_nodes` on the response.

Prompt templates: `question_template` (variable `{query_str}`) shapes the question text; the
system prompt and the chunk layout belong to the generator (that is what makes KV reusable),
so they are not templates here. `get_prompts()` / `update_prompts({"question_template": ...})`
work as on any LlamaIndex synthesizer.

The generation numbers (cache hits, token counts, TTFT, which chunk keys were used for which
node) are in `response.metadata["daser"]`; for a streaming response that dict is filled in
when the stream is exhausted.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import (
    BaseSynthesizer,
    QueryTextType,
    dispatcher,
)
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.settings import Settings
from llama_index.core.types import RESPONSE_TEXT_TYPE

from llama_index.llms.daser.kv_sync import node_chunk_ref
from llama_index.llms.daser.base import DaserLLM, result_summary

DASER_KEY = "daser"
QUESTION_TEMPLATE = PromptTemplate("{query_str}")
"""The default question template: the query as the user wrote it."""


def _record(info: dict[str, Any], raw: Any) -> None:
    """Put the generation numbers into the response info, and each node's chunk key beside it."""
    result = raw.get("result") if isinstance(raw, dict) else raw  # DaserLLM's raw is a dict (result_raw)
    info.update(result_summary(result))
    info["result"] = result
    keys = info.get("chunk_keys", [])
    for entry, key in zip(info.get("nodes", []), keys):
        entry["chunk_key"] = key


class CacheAwareSynthesizer(BaseSynthesizer):
    """Answer from the retrieved nodes' cached chunk KV; each node stays one chunk, in retrieval order."""

    def __init__(
        self,
        llm: DaserLLM | None = None,
        *,
        streaming: bool = False,
        callback_manager: CallbackManager | None = None,
        empty_response: str | None = None,
        question_template: BasePromptTemplate | str | None = None,
        **generate_kwargs: Any,
    ) -> None:
        llm = llm if llm is not None else Settings.llm
        if not isinstance(llm, DaserLLM):
            raise TypeError(f"CacheAwareSynthesizer needs a DaserLLM (it passes chunks, not a prompt string), "
                            f"got {type(llm).__name__}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming,
                         empty_response=empty_response)
        self._generate_kwargs = generate_kwargs
        llm.generation_options(**generate_kwargs)  # reject bad generation options now, not at query time
        self._question_template = self._check_template(question_template or QUESTION_TEMPLATE)

    @property
    def llm(self) -> DaserLLM:
        return self._llm  # type: ignore[return-value]

    @property
    def streaming(self) -> bool:
        return bool(self._streaming)

    def with_streaming(self, streaming: bool = True) -> CacheAwareSynthesizer:
        """A copy that streams (or not); this one is unchanged. `as_query_engine(streaming=True)`
        uses it, since LlamaIndex applies `streaming` only to synthesizers it builds itself."""
        import copy

        other = copy.copy(self)
        other._streaming = streaming
        return other

    @staticmethod
    def _check_template(template: BasePromptTemplate | str) -> BasePromptTemplate:
        if isinstance(template, str):
            template = PromptTemplate(template)
        if not isinstance(template, BasePromptTemplate):
            raise TypeError(f"question_template must be a prompt template or a string, got {type(template).__name__}")
        if "query_str" not in template.template_vars:
            raise ValueError("question_template must contain {query_str}")
        return template

    def _get_prompts(self) -> PromptDictType:
        return {"question_template": self._question_template}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if "question_template" in prompts:
            self._question_template = self._check_template(prompts["question_template"])

    def _question(self, query_str: str) -> str:
        return self._question_template.format(query_str=query_str)

    # -- plain text chunks (no node identity: KV is still reused by content) ----------------------------
    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        return self._run(query_str, list(text_chunks), {}, response_kwargs)

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        return await self._arun(query_str, list(text_chunks), {}, response_kwargs)

    # -- nodes ------------------------------------------------------------------------------------
    def _call_kwargs(self, response_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(self._generate_kwargs)
        kwargs.update(response_kwargs)
        return kwargs

    def _run(self, query: str, contexts: list[Any], info: dict[str, Any], response_kwargs: dict[str, Any]) -> Any:
        kwargs = self._call_kwargs(response_kwargs)
        query = self._question(query)
        if not self._streaming:
            resp = self.llm.complete(query, contexts=contexts, **kwargs)
            _record(info, resp.raw)
            return resp.text
        stream = self.llm.stream_complete(query, contexts=contexts, **kwargs)

        def deltas() -> Generator[str, None, None]:
            for resp in stream:
                if resp.raw is not None:
                    _record(info, resp.raw)
                if resp.delta:
                    yield resp.delta

        return deltas()

    async def _arun(self, query: str, contexts: list[Any], info: dict[str, Any], response_kwargs: dict[str, Any]) -> Any:
        kwargs = self._call_kwargs(response_kwargs)
        query = self._question(query)
        if not self._streaming:
            resp = await self.llm.acomplete(query, contexts=contexts, **kwargs)
            _record(info, resp.raw)
            return resp.text
        stream = await self.llm.astream_complete(query, contexts=contexts, **kwargs)

        async def deltas() -> AsyncGenerator[str, None]:
            async for resp in stream:
                if resp.raw is not None:
                    _record(info, resp.raw)
                if resp.delta:
                    yield resp.delta

        return deltas()

    @staticmethod
    def _prepare(nodes: list[NodeWithScore]) -> tuple[list[Any], dict[str, Any]]:
        refs = [node_chunk_ref(n) for n in nodes]
        info: dict[str, Any] = {
            "nodes": [
                {"node_id": n.node.node_id, "ref_doc_id": r.doc_id, "hash": n.node.hash, "chars": len(r.text or "")}
                for n, r in zip(nodes, refs)
            ]
        }
        return refs, info

    def _finish(self, response_str: Any, nodes: list[NodeWithScore],
                additional: Sequence[NodeWithScore] | None, info: dict[str, Any]) -> RESPONSE_TYPE:
        response = self._prepare_response_output(response_str, list(nodes) + list(additional or []))
        if response.metadata is None:
            response.metadata = {}
        response.metadata[DASER_KEY] = info
        return response

    @dispatcher.span
    def synthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not nodes:
            return super().synthesize(query, nodes, additional_source_nodes, **response_kwargs)
        if isinstance(query, str):
            query = QueryBundle(query_str=query)
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE,
                                          payload={EventPayload.QUERY_STR: query.query_str}) as event:
            refs, info = self._prepare(nodes)
            response_str = self._run(query.query_str, refs, info, response_kwargs)
            response = self._finish(response_str, nodes, additional_source_nodes, info)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not nodes:
            return await super().asynthesize(query, nodes, additional_source_nodes, **response_kwargs)
        if isinstance(query, str):
            query = QueryBundle(query_str=query)
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE,
                                          payload={EventPayload.QUERY_STR: query.query_str}) as event:
            refs, info = self._prepare(nodes)
            response_str = await self._arun(query.query_str, refs, info, response_kwargs)
            response = self._finish(response_str, nodes, additional_source_nodes, info)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

