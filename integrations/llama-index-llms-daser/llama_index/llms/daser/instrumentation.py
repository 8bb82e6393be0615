"""Two bridges into stock LlamaIndex paths that have no hook of their own.

1. Daser metadata on stock query-engine responses. A stock synthesizer hands DaserLLM one
   prompt string and builds its `Response` from the nodes alone, so "this answer was full
   prefill, nothing reused" was invisible at the query-engine level. An instrumentation event
   handler (LlamaIndex's public extension point) opens a collector on `SynthesizeStartEvent`;
   DaserLLM records each generation's summary into it; on `SynthesizeEndEvent` the summary is
   put into `response.metadata["daser"]` (for a streaming response the same dict is filled in
   when the stream ends). Responses that already carry it (CacheAwareSynthesizer) are left alone.

2. `index.as_query_engine(response_synthesizer=CacheAwareSynthesizer(llm), streaming=True)`.
   `RetrieverQueryEngine.from_args` applies `streaming` only to a synthesizer it builds itself
   and silently ignores it for a given one, so the request came back non-streaming. The bridge
   wraps `from_args` (same signature, same result otherwise): when the given synthesizer is a
   non-streaming CacheAwareSynthesizer and `streaming=True` was asked for, the engine gets a
   streaming copy of it (the caller's object is not changed).
"""

from __future__ import annotations

import functools
import inspect
from contextvars import ContextVar
from typing import Any

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent

DASER_KEY = "daser"

_collector: ContextVar[dict[str, Any] | None] = ContextVar("daser_synthesis_collector", default=None)


_pending_stream: ContextVar[dict[str, Any] | None] = ContextVar("daser_pending_stream", default=None)


def current_collector() -> dict[str, Any] | None:
    """The info dict of the synthesis running in this context, if any (DaserLLM records into it)."""
    return _collector.get()


def stream_collector() -> dict[str, Any] | None:
    """For a stream: the running synthesis' info dict, else that of a streaming response that
    ended its synthesis before its LLM stream started (stock synthesizers start it lazily, when
    the caller reads `response_gen`); taken once."""
    info = _collector.get()
    if info is not None:
        return info
    info = _pending_stream.get()
    if info is not None:
        _pending_stream.set(None)
    return info


def record(collector: dict[str, Any] | None, summary: dict[str, Any]) -> None:
    """Add one generation's summary (the last one wins; `llm_calls` counts them)."""
    if collector is None or not summary:
        return
    calls = int(collector.get("llm_calls", 0)) + 1
    collector.update(summary)
    collector["llm_calls"] = calls


class DaserResponseMetadata(BaseEventHandler):
    """Puts DaserLLM's numbers into stock synthesizers' `response.metadata["daser"]`."""

    @classmethod
    def class_name(cls) -> str:
        return "DaserResponseMetadata"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, SynthesizeStartEvent):
            _collector.set({})
        elif isinstance(event, SynthesizeEndEvent):
            info = _collector.get()
            _collector.set(None)
            response = event.response
            if info is None or response is None or not hasattr(response, "metadata"):
                return
            if response.metadata is None:
                response.metadata = {}
            if DASER_KEY in response.metadata:  # CacheAwareSynthesizer filled it in itself
                return
            if info:  # a DaserLLM answered (for a stream: filled in when it ends)
                response.metadata[DASER_KEY] = info
            elif type(response).__name__ in ("StreamingResponse", "AsyncStreamingResponse"):
                response.metadata[DASER_KEY] = info  # same dict: DaserLLM records into it at the end
                _pending_stream.set(info)


def _install_metadata_handler() -> None:
    root = get_dispatcher()
    if not any(isinstance(h, DaserResponseMetadata) for h in root.event_handlers):
        root.add_event_handler(DaserResponseMetadata())


def _install_streaming_bridge() -> None:
    from llama_index.core.query_engine.retriever_query_engine import RetrieverQueryEngine

    func = RetrieverQueryEngine.__dict__["from_args"].__func__
    if getattr(func, "_daser_bridge", False):
        return
    signature = inspect.signature(func)

    @functools.wraps(func)
    def from_args(cls: Any, *args: Any, **kwargs: Any) -> Any:
        from llama_index.llms.daser.synthesizer import CacheAwareSynthesizer

        bound = signature.bind(cls, *args, **kwargs)
        synth = bound.arguments.get("response_synthesizer")
        if isinstance(synth, CacheAwareSynthesizer) and bound.arguments.get("streaming") and not synth.streaming:
            bound.arguments["response_synthesizer"] = synth.with_streaming(True)
        return func(*bound.args, **bound.kwargs)

    from_args._daser_bridge = True  # type: ignore[attr-defined]
    RetrieverQueryEngine.from_args = classmethod(from_args)  # type: ignore[method-assign,assignment]


def _install_chat_bridge() -> None:
    """`index.as_chat_engine(chat_mode="context" | "condense_plus_context" | "best", llm=DaserLLM(...))`
    gives the cache-aware engine of that mode: LlamaIndex's own format the retrieved nodes and the
    history into one prompt string, which a DaserLLM can only answer by full prefill. Other LLMs
    and modes are LlamaIndex's, unchanged."""
    from llama_index.core.chat_engine.types import ChatMode
    from llama_index.core.indices.base import BaseIndex

    func = BaseIndex.as_chat_engine
    if getattr(func, "_daser_bridge", False):
        return

    @functools.wraps(func)
    def as_chat_engine(self: Any, chat_mode: Any = ChatMode.BEST, llm: Any = None, **kwargs: Any) -> Any:
        from llama_index.core.settings import Settings

        from llama_index.llms.daser.base import DaserLLM
        from llama_index.llms.daser.chat_engine import (
            CacheAwareCondensePlusContextChatEngine,
            CacheAwareContextChatEngine,
        )

        chosen = llm if llm is not None else Settings._llm  # not Settings.llm: that resolves a default LLM
        if isinstance(chosen, DaserLLM) and chat_mode in (ChatMode.CONTEXT, ChatMode.CONDENSE_PLUS_CONTEXT,
                                                          ChatMode.BEST):
            cls = CacheAwareContextChatEngine if chat_mode == ChatMode.CONTEXT else \
                CacheAwareCondensePlusContextChatEngine
            names = set(inspect.signature(cls.from_defaults).parameters) - {"retriever", "llm", "generate_kwargs"}
            engine_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return cls.from_defaults(self.as_retriever(**kwargs), llm=chosen, **engine_kw)
        return func(self, chat_mode, llm, **kwargs)

    as_chat_engine._daser_bridge = True  # type: ignore[attr-defined]
    BaseIndex.as_chat_engine = as_chat_engine  # type: ignore[method-assign]


def install() -> None:
    """Idempotent; run when `llama_index.llms.daser` is imported."""
    _install_metadata_handler()
    _install_streaming_bridge()
    _install_chat_bridge()
