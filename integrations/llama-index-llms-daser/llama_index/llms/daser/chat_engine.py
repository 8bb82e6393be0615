"""CacheAwareContextChatEngine: a LlamaIndex context chat engine that reuses the retrieved nodes' KV.

LlamaIndex's own chat engines (`context`, `condense_plus_context`, `simple`) format the
retrieved nodes and the history into one prompt string, so DaserLLM can reuse nothing and
runs full prefill on every turn. This engine does what `ContextChatEngine` does (retrieve for
the latest message, answer with the nodes as context, keep the conversation in memory), but
hands each retrieved node to daser-rag as its own chunk (through `CacheAwareSynthesizer`), so
every turn decodes on the nodes' cached KV. The conversation so far is placed in front of the
question (the system prefix is fixed: it is what every stored chunk was computed after).

    chat = CacheAwareContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=2), llm=DaserLLM(gen))
    reply = chat.chat("When does the ferry leave?")
    reply.metadata["daser"]["cache_hits"]       # the nodes' KV came from the cache

`chat`, `stream_chat`, `achat` and `astream_chat` work as on any chat engine; the daser numbers
are in `response.metadata["daser"]` (for a streaming reply, filled in when the stream ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator, Sequence
from threading import Thread
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.callbacks import CallbackManager
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine, StreamingAgentChatResponse
from llama_index.core.memory import BaseMemory, ChatMemoryBuffer
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.settings import Settings
from llama_index.core.tools import ToolOutput

from llama_index.llms.daser.base import DaserLLM
from llama_index.llms.daser.synthesizer import DASER_KEY, CacheAwareSynthesizer


def conversation_question(message: str, history: Sequence[ChatMessage], system_prompt: str | None = None) -> str:
    """The question text for one turn: instructions, the conversation so far, then the message."""
    parts: list[str] = []
    if system_prompt and system_prompt.strip():
        parts.append(system_prompt.strip())
    lines = []
    for m in history:
        text = (m.content or "").strip() if isinstance(m.content, str) or m.content is None else str(m.content)
        if not text:
            continue
        if m.role == MessageRole.SYSTEM:
            parts.append(text)
        elif m.role == MessageRole.USER:
            lines.append(f"User: {text}")
        else:
            lines.append(f"Assistant: {text}")
    if lines:
        parts.append("Conversation so far:\n" + "\n".join(lines))
    parts.append(message)
    return "\n\n".join(parts)


class CacheAwareContextChatEngine(BaseChatEngine):
    """Context chat engine over a retriever; each retrieved node is answered from its cached KV."""

    def __init__(
        self,
        retriever: BaseRetriever,
        llm: DaserLLM,
        memory: BaseMemory,
        *,
        system_prompt: str | None = None,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        callback_manager: CallbackManager | None = None,
        **generate_kwargs: Any,
    ) -> None:
        if not isinstance(llm, DaserLLM):
            raise TypeError(f"CacheAwareContextChatEngine needs a DaserLLM (it passes nodes as chunks), "
                            f"got {type(llm).__name__}")
        self._retriever = retriever
        self._llm = llm
        self._memory = memory
        self._system_prompt = system_prompt
        self._node_postprocessors = node_postprocessors or []
        self._callback_manager = callback_manager or Settings.callback_manager
        self._generate_kwargs = generate_kwargs
        self.last_question: str | None = None
        """The question the model answered on the last turn (for logs and tests)."""
        llm.generation_options(**generate_kwargs)  # bad options fail now, not on the first turn

    @classmethod
    def from_defaults(
        cls,
        retriever: BaseRetriever,
        llm: DaserLLM | None = None,
        chat_history: list[ChatMessage] | None = None,
        memory: BaseMemory | None = None,
        system_prompt: str | None = None,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        callback_manager: CallbackManager | None = None,
        token_limit: int | None = None,
        **generate_kwargs: Any,
    ) -> CacheAwareContextChatEngine:
        """As `ContextChatEngine.from_defaults`; the memory counts tokens with the model's own
        tokenizer (offline) and keeps at most a quarter of the window by default."""
        llm = llm if llm is not None else Settings.llm  # type: ignore[assignment]
        if not isinstance(llm, DaserLLM):
            raise TypeError(f"CacheAwareContextChatEngine needs a DaserLLM, got {type(llm).__name__}")
        if memory is None:
            extra: dict[str, Any] = {}
            if llm.tokenizer is not None:
                extra["tokenizer_fn"] = llm.tokenizer
            memory = ChatMemoryBuffer.from_defaults(
                chat_history=chat_history or [], token_limit=token_limit or llm.context_window // 4, **extra)
        elif chat_history is not None:
            memory.set(chat_history)
        return cls(retriever, llm, memory, system_prompt=system_prompt, node_postprocessors=node_postprocessors,
                   callback_manager=callback_manager, **generate_kwargs)

    # -- parts -------------------------------------------------------------------------------------
    def _nodes(self, message: str) -> list[NodeWithScore]:
        nodes = self._retriever.retrieve(message)
        for post in self._node_postprocessors:
            nodes = post.postprocess_nodes(nodes, query_bundle=QueryBundle(message))
        return nodes

    async def _anodes(self, message: str) -> list[NodeWithScore]:
        nodes = await self._retriever.aretrieve(message)
        for post in self._node_postprocessors:
            nodes = await post.apostprocess_nodes(nodes, query_bundle=QueryBundle(message))
        return nodes

    def _synthesizer(self, streaming: bool) -> CacheAwareSynthesizer:
        return CacheAwareSynthesizer(self._llm, streaming=streaming, callback_manager=self._callback_manager,
                                     **self._generate_kwargs)

    def _question(self, message: str) -> str:
        return conversation_question(message, self._memory.get(input=message), self._system_prompt)

    def _prepare(self, message: str) -> tuple[list[NodeWithScore], str]:
        """(retrieved nodes, the question the model answers) for one turn."""
        nodes = self._nodes(message)
        self.last_question = self._question(message)
        return nodes, self.last_question

    async def _aprepare(self, message: str) -> tuple[list[NodeWithScore], str]:
        nodes = await self._anodes(message)
        self.last_question = self._question(message)
        return nodes, self.last_question

    @staticmethod
    def _sources(message: str, nodes: list[NodeWithScore]) -> list[ToolOutput]:
        return [ToolOutput(tool_name="retriever", content=str(nodes), raw_input={"message": message},
                           raw_output=nodes)]

    def _plain(self, question: str, streaming: bool) -> tuple[Any, dict[str, Any]]:
        """No node retrieved: the question alone (nothing to reuse, so no warning either)."""
        info: dict[str, Any] = {}
        if not streaming:
            resp = self._llm.complete(question, contexts=[], **self._generate_kwargs)
            info.update(resp.additional_kwargs)
            return resp.text, info
        stream = self._llm.stream_complete(question, contexts=[], **self._generate_kwargs)

        def deltas() -> Generator[str, None, None]:
            for r in stream:
                if r.additional_kwargs:
                    info.update(r.additional_kwargs)
                if r.delta:
                    yield r.delta

        return deltas(), info

    # -- BaseChatEngine ----------------------------------------------------------------------------
    def chat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        nodes, question = self._prepare(message)
        if nodes:
            response = self._synthesizer(False).synthesize(question, nodes)
            text, info = str(response), (response.metadata or {}).get(DASER_KEY, {})
        else:
            text, info = self._plain(question, streaming=False)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        self._memory.put(ChatMessage(role=MessageRole.ASSISTANT, content=text))
        return AgentChatResponse(response=text, sources=self._sources(message, nodes), source_nodes=nodes,
                                 metadata={DASER_KEY: info})

    def stream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        nodes, question = self._prepare(message)
        if nodes:
            response = self._synthesizer(True).synthesize(question, nodes)
            gen, info = response.response_gen, response.metadata[DASER_KEY]
        else:
            gen, info = self._plain(question, streaming=True)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))

        def chat_stream() -> Generator[ChatResponse, None, None]:
            text = ""
            for delta in gen:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

        reply = StreamingAgentChatResponse(chat_stream=chat_stream(), sources=self._sources(message, nodes),
                                           source_nodes=nodes)
        reply.metadata = {DASER_KEY: info}  # type: ignore[attr-defined]  # filled when the stream ends
        thread = Thread(target=reply.write_response_to_history, args=(self._memory,), daemon=True)
        reply.write_response_to_history_thread = thread
        thread.start()
        return reply

    async def achat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        nodes, question = await self._aprepare(message)
        if nodes:
            response = await self._synthesizer(False).asynthesize(question, nodes)
            text, info = str(response), (response.metadata or {}).get(DASER_KEY, {})
        else:
            text, info = await asyncio.to_thread(self._plain, question, False)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        self._memory.put(ChatMessage(role=MessageRole.ASSISTANT, content=text))
        return AgentChatResponse(response=text, sources=self._sources(message, nodes), source_nodes=nodes,
                                 metadata={DASER_KEY: info})

    async def astream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        nodes, question = await self._aprepare(message)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        info: dict[str, Any]
        if nodes:
            response = await self._synthesizer(True).asynthesize(question, nodes)
            agen, info = response.async_response_gen(), response.metadata[DASER_KEY]
        else:
            stream = await self._llm.astream_complete(question, contexts=[], **self._generate_kwargs)
            info = {}

            async def plain() -> AsyncGenerator[str, None]:
                async for r in stream:
                    if r.additional_kwargs:
                        info.update(r.additional_kwargs)
                    if r.delta:
                        yield r.delta

            agen = plain()

        async def chat_stream() -> AsyncGenerator[ChatResponse, None]:
            text = ""
            async for delta in agen:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

        reply = StreamingAgentChatResponse(achat_stream=chat_stream(), sources=self._sources(message, nodes),
                                           source_nodes=nodes)
        reply.metadata = {DASER_KEY: info}  # type: ignore[attr-defined]
        reply.awrite_response_to_history_task = asyncio.create_task(reply.awrite_response_to_history(self._memory))
        return reply

    def reset(self) -> None:
        self._memory.reset()

    @property
    def chat_history(self) -> list[ChatMessage]:
        return self._memory.get_all()


DEFAULT_CONDENSE_PROMPT = (
    "Given the following conversation between a user and an assistant and a follow up question from the user, "
    "rephrase the follow up question to be a standalone question.\n\nChat History:\n{chat_history}\n"
    "Follow Up Input: {question}\nStandalone question:")
"""LlamaIndex's condense prompt for `condense_plus_context` (its wording, one string)."""


class CacheAwareCondensePlusContextChatEngine(CacheAwareContextChatEngine):
    """`chat_mode="condense_plus_context"` with KV reuse: each turn first condenses the
    conversation and the new message into a standalone question (one short LLM call on the
    question alone, nothing to reuse there), then that question is both the retrieval query and
    the question the model answers, with every retrieved node handed to daser-rag as its own
    reusable chunk (`CacheAwareSynthesizer`). LlamaIndex's own engine formats the nodes and the
    history into one prompt string, so DaserLLM runs full prefill on every turn.

        chat = CacheAwareCondensePlusContextChatEngine.from_defaults(index.as_retriever(), llm=DaserLLM(gen))
    """

    def __init__(self, retriever: BaseRetriever, llm: DaserLLM, memory: BaseMemory, *,
                 condense_prompt: str | None = None, skip_condense: bool = False,
                 condense_max_new_tokens: int = 48, **kwargs: Any) -> None:
        super().__init__(retriever, llm, memory, **kwargs)
        self._condense_prompt = condense_prompt or DEFAULT_CONDENSE_PROMPT
        if "{question}" not in self._condense_prompt or "{chat_history}" not in self._condense_prompt:
            raise ValueError("condense_prompt needs the {chat_history} and {question} fields")
        self._skip_condense = skip_condense
        self._condense_max_new_tokens = condense_max_new_tokens
        self.last_condensed: str | None = None

    @classmethod
    def from_defaults(  # type: ignore[override]
        cls,
        retriever: BaseRetriever,
        llm: DaserLLM | None = None,
        chat_history: list[ChatMessage] | None = None,
        memory: BaseMemory | None = None,
        system_prompt: str | None = None,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        callback_manager: CallbackManager | None = None,
        token_limit: int | None = None,
        condense_prompt: str | None = None,
        skip_condense: bool = False,
        **generate_kwargs: Any,
    ) -> CacheAwareCondensePlusContextChatEngine:
        base = CacheAwareContextChatEngine.from_defaults(
            retriever, llm=llm, chat_history=chat_history, memory=memory, system_prompt=system_prompt,
            node_postprocessors=node_postprocessors, callback_manager=callback_manager, token_limit=token_limit,
            **generate_kwargs)
        return cls(retriever, base._llm, base._memory, condense_prompt=condense_prompt, skip_condense=skip_condense,
                   system_prompt=system_prompt, node_postprocessors=node_postprocessors,
                   callback_manager=callback_manager, **generate_kwargs)

    def _condense(self, message: str) -> str:
        history = self._memory.get(input=message)
        if self._skip_condense or not history:
            return message
        lines = [f"{m.role.value}: {m.content}" for m in history if isinstance(m.content, str) and m.content.strip()]
        prompt = self._condense_prompt.format(chat_history="\n".join(lines), question=message)
        options = {k: v for k, v in self._generate_kwargs.items() if k not in ("max_new_tokens", "max_tokens")}
        # the question alone, no chunks: nothing to reuse, so the generator directly (DaserLLM would
        # warn that a prompt without documents reuses nothing, which is expected here)
        gen = self._llm.generation_options(max_new_tokens=self._condense_max_new_tokens, **options)
        condensed = self._llm.generator.generate(prompt, None, **gen).text.strip()
        return condensed or message  # an empty rewrite: the message itself is the best question

    def _standalone(self, message: str) -> str:
        self.last_condensed = self._condense(message)
        parts = [self._system_prompt.strip()] if self._system_prompt and self._system_prompt.strip() else []
        return "\n\n".join([*parts, self.last_condensed])

    def _prepare(self, message: str) -> tuple[list[NodeWithScore], str]:
        self.last_question = self._standalone(message)
        assert self.last_condensed is not None
        return self._nodes(self.last_condensed), self.last_question

    async def _aprepare(self, message: str) -> tuple[list[NodeWithScore], str]:
        self.last_question = await asyncio.to_thread(self._standalone, message)
        assert self.last_condensed is not None
        return await self._anodes(self.last_condensed), self.last_question
