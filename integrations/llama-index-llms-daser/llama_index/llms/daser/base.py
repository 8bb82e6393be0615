"""DaserLLM: a LlamaIndex `CustomLLM` backed by any daser-rag `KVGenerator`.

Used like any LlamaIndex LLM (`Settings.llm = DaserLLM(generator)`), it answers a plain prompt
with no retrieved context. Given document refs (`contexts=` nodes, `ChunkRef`s, documents or
strings), it places them as separate chunks and reuses their cached KV instead of re-reading
them; `CacheAwareSynthesizer` is the component that passes retrieved nodes this way.

A prompt that arrives as one string (LlamaIndex's stock synthesizers format the retrieved
nodes into the prompt text) has no separable documents: it is answered by full prefill, the
result says so (`mode="full"`, no cache hits), and the LLM warns once (`NoKVReuseWarning`).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    MessageRole,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from daser_rag.api import KVGenerator
from daser_rag.engine.protocol import IndexingEngine
from daser_rag.generator_spec import build_from_spec as _build_from_spec
from daser_rag.generator_spec import generator_spec, model_name_of
from daser_rag.params import (
    DEFAULT_MAX_NEW_TOKENS,
    SELECTORS,
    GenerationParams,
    check_recompute_ratio,
    check_selector,
)
from daser_rag.types import GenerationResult
from llama_index.llms.daser.instrumentation import current_collector, record, stream_collector
from llama_index.llms.daser.kv_sync import ContextLike, to_context_items


class NoKVReuseWarning(UserWarning):
    """A request reached daser-rag with its documents inside the prompt text: nothing was reused."""


NO_REUSE_MESSAGE = (
    "DaserLLM got a prompt with no separate documents (a stock LlamaIndex synthesizer formats the "
    "retrieved nodes into the prompt string), so it runs full prefill and reuses no cached KV. "
    "For KV reuse use index.as_query_engine(response_synthesizer=CacheAwareSynthesizer(llm)), for chat "
    "CacheAwareContextChatEngine.from_defaults(index.as_retriever(), llm=llm), or pass contexts= "
    "(this warning is shown once per DaserLLM)."
)


def result_summary(result: GenerationResult | None) -> dict[str, Any]:
    """The numbers a caller wants next to a completion: token counts, cache hits, timings."""
    if result is None:
        return {}
    return {
        "model_provider": "daser",
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "context_tokens": result.context_tokens,
        "cache_hits": result.cache_hits,
        "cache_misses": result.cache_misses,
        "reused_tokens": result.reused_tokens,
        "recomputed_tokens": result.recomputed_tokens,
        "exact_tokens": result.exact_tokens,
        # "full" whenever nothing was reused (0 hits, 0 reused tokens), whatever a generator says
        "mode": result.mode if result.cache_hits + result.cache_misses > 0
        and (result.cache_hits > 0 or result.reused_tokens > 0) else "full",
        "recompute_ratio": result.recompute_ratio,
        "calibrated": result.calibrated,
        "finish_reason": result.finish_reason,
        "ttft_s": result.timings.ttft_s,
        "total_s": result.timings.total_s,
        "chunk_keys": list(result.chunk_keys),
    }


def result_raw(result: GenerationResult | None) -> dict[str, Any] | None:
    """`CompletionResponse.raw` as LlamaIndex expects it: a dict, with OpenAI-style `usage`.

    LlamaIndex's `TokenCountingHandler` (and other callbacks) read `raw` as a mapping and take
    token counts from `raw["usage"]`; a dataclass there made every call fail. The
    `GenerationResult` itself stays available as `raw["result"]`.
    """
    if result is None:
        return None
    return {
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "daser": result_summary(result),
        "result": result,
    }


def build_from_spec(spec: dict[str, Any]) -> KVGenerator:
    """The generator `generator_spec` describes; a remote one takes its API key from DASER_API_KEY."""
    import os

    generator: KVGenerator = _build_from_spec(spec, api_key=os.environ.get("DASER_API_KEY") or None)
    return generator


class DaserLLM(CustomLLM):
    """A drop-in LlamaIndex LLM; with document refs it decodes on fused cached chunk KV."""

    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    recompute_ratio: float | str | None = Field(
        default=None,
        description="CacheBlend share of context tokens recomputed, or 'auto' (None: the generator's default; "
                    "1.0: full prefill quality).")
    selector: str | None = Field(
        default=None,
        description=f"How recomputed tokens are chosen, one of {SELECTORS} (None: the generator's default).")
    use_cache: bool = Field(default=True, description="False runs full prefill (the baseline).")
    calibration: bool | None = Field(
        default=None,
        description="The engine's calibration of reused KV: None uses it when the engine has one for the request's "
                    "regime, False never, True requires it (InvalidInputError when there is none).")
    tenant: str = Field(default="", description="Tenant salt: tenants never share chunk KV.")
    context_window: int = Field(default=8192, gt=0)
    model_name: str = Field(default="daser-rag", description="The model's name (default: taken from the generator).")

    _generator: Any = PrivateAttr()
    _warned: bool = PrivateAttr(default=False)

    @field_validator("recompute_ratio")
    @classmethod
    def _check_ratio(cls, value: Any) -> Any:
        return None if value is None else check_recompute_ratio(value)

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, value: Any) -> Any:
        return None if value is None else check_selector(value)

    @field_validator("calibration", mode="before")
    @classmethod
    def _check_calibration(cls, value: Any) -> Any:
        return GenerationParams(calibration=value).calibration  # strictly True, False or None

    def __init__(self, generator: KVGenerator, **kwargs: Any) -> None:
        if not isinstance(generator, KVGenerator):
            raise TypeError(
                f"DaserLLM needs an object satisfying daser_rag.api.KVGenerator, got {type(generator).__name__}")
        if "context_window" not in kwargs and isinstance(generator, IndexingEngine):
            kwargs["context_window"] = generator.context_window  # the engine's (or the service's) window
        if kwargs.get("model_name") is None:
            kwargs["model_name"] = model_name_of(generator)
        super().__init__(**kwargs)
        self._generator = generator

    # -- serialization: LlamaIndex's to_dict/from_dict round trip ----------------------------------
    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The LLM's settings plus `generator_spec` (how to rebuild its generator elsewhere)."""
        data = super().to_dict(**kwargs)
        data.pop("callback_manager", None)
        data["generator_spec"] = generator_spec(self._generator)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> DaserLLM:  # type: ignore[override]
        """Rebuild from `to_dict()`: pass `generator=` to reuse one already built; otherwise the
        generator is rebuilt from `generator_spec` (the model is loaded, or the service's URL used)."""
        data = dict(data)
        data.update(kwargs)
        data.pop("class_name", None)
        data.pop("callback_manager", None)
        spec = data.pop("generator_spec", None)
        generator = data.pop("generator", None)
        if generator is None:
            if not spec:
                raise TypeError("DaserLLM.from_dict needs generator=<KVGenerator>, or a dict from DaserLLM.to_dict() "
                                "that names its generator (generator_spec)")
            generator = build_from_spec(spec)
        return cls(generator, **data)

    @property
    def tokenizer(self) -> Callable[[str], list[int]]:
        """The generator's own token counter (`text -> list of ids`), offline: pass it to
        `TokenCountingHandler(tokenizer=llm.tokenizer)`: the generator's `token_ids` (in process, the
        engine's tokenizer; through `DaserClient`, the service's), so counts match the engine's."""
        return self._generator.token_ids

    @classmethod
    def class_name(cls) -> str:
        return "DaserLLM"

    @property
    def generator(self) -> KVGenerator:
        return self._generator

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            model_name=self.model_name,
            is_chat_model=False,
        )

    # -- request assembly --------------------------------------------------------------------------
    def generation_options(self, **kwargs: Any) -> dict[str, Any]:
        """This LLM's generation options with `kwargs` applied, validated by `GenerationParams`.

        Unknown names raise TypeError (as any Python call would); bad values InvalidInputError.
        """
        unknown = sorted(set(kwargs) - set(GenerationParams.keys()) - {"max_tokens"})
        if unknown:
            raise TypeError(f"DaserLLM got unexpected keyword argument(s) {unknown}; "
                            f"supported: contexts, max_tokens, {', '.join(GenerationParams.keys())}")
        options: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "use_cache": self.use_cache,
            "tenant": self.tenant,
            "recompute_ratio": self.recompute_ratio,
            "selector": self.selector,
            "calibration": self.calibration,
        }
        if kwargs.get("max_tokens") is not None:  # the name most LlamaIndex LLMs use
            kwargs.setdefault("max_new_tokens", kwargs["max_tokens"])
        kwargs.pop("max_tokens", None)
        options.update({k: v for k, v in kwargs.items() if v is not None})
        GenerationParams.from_kwargs(**options)  # rejects bad values with a clear message
        # Unset options are left out: the generator's (or a remote service's) defaults apply.
        return {k: v for k, v in options.items() if v is not None and not (k == "tenant" and v == "")}

    def _request(self, kwargs: dict[str, Any]) -> tuple[list[Any] | None, dict[str, Any]]:
        contexts: Iterable[ContextLike] | None = kwargs.pop("contexts", None)
        gen = self.generation_options(**kwargs)
        items = to_context_items(contexts)
        if not items:
            self._warn_no_reuse()
        return items, gen

    def _warn_no_reuse(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(NO_REUSE_MESSAGE, NoKVReuseWarning, stacklevel=5)

    # -- the work, once; the public methods below add LlamaIndex's instrumentation -------------------
    # Chat methods call these directly (not complete()), so one chat call is one LLM event and a
    # TokenCountingHandler counts its tokens once.
    def _complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        contexts, gen = self._request(dict(kwargs))
        result = self._generator.generate(prompt, contexts, **gen)
        record(current_collector(), result_summary(result))  # -> a stock Response's metadata["daser"]
        return CompletionResponse(text=result.text, raw=result_raw(result), additional_kwargs=result_summary(result))

    def _stream_complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponseGen:
        contexts, gen = self._request(dict(kwargs))
        stream = self._generator.stream(prompt, contexts, **gen)
        collector = stream_collector()  # the stream may be consumed elsewhere: keep the synthesis' collector

        def responses() -> CompletionResponseGen:
            text = ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            result = stream.result
            record(collector, result_summary(result))
            # A closing empty delta carries the result, as OpenAI-style streams end with usage.
            yield CompletionResponse(text=text, delta="", raw=result_raw(result),
                                     additional_kwargs=result_summary(result))

        return responses()

    async def _acomplete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        contexts, gen = self._request(dict(kwargs))
        # generation is compute bound, so it runs in a worker thread
        result = await asyncio.to_thread(self._generator.generate, prompt, contexts, **gen)
        record(current_collector(), result_summary(result))
        return CompletionResponse(text=result.text, raw=result_raw(result), additional_kwargs=result_summary(result))

    async def _astream_complete(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponseAsyncGen:
        contexts, gen = self._request(dict(kwargs))
        collector = stream_collector()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                stream = self._generator.stream(prompt, contexts, **gen)
                for delta in stream:
                    if cancelled.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", stream.result))
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        async def responses() -> CompletionResponseAsyncGen:
            worker = loop.run_in_executor(None, produce)
            text = ""
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        text += value
                        yield CompletionResponse(text=text, delta=value)
                    elif kind == "done":
                        record(collector, result_summary(value))
                        yield CompletionResponse(text=text, delta="", raw=result_raw(value),
                                                 additional_kwargs=result_summary(value))
                        break
                    else:
                        raise value
            finally:
                cancelled.set()
                await worker

        return responses()

    @staticmethod
    def _to_chat(resp: CompletionResponse) -> ChatResponse:
        """A chat response carrying the daser numbers on the message AND on the response
        (`ChatResponse.additional_kwargs`), as the completion path does."""
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=resp.text,
                                additional_kwargs=dict(resp.additional_kwargs)),
            delta=resp.delta, raw=resp.raw, additional_kwargs=dict(resp.additional_kwargs))

    # -- completion ---------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await self._acomplete(prompt, kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return await self._astream_complete(prompt, kwargs)

    # -- chat: messages -> one prompt (messages_to_prompt), then the completion work ------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._to_chat(self._complete(self.messages_to_prompt(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        inner = self._stream_complete(self.messages_to_prompt(messages), kwargs)
        return (self._to_chat(r) for r in inner)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._to_chat(await self._acomplete(self.messages_to_prompt(messages), kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        inner = await self._astream_complete(self.messages_to_prompt(messages), kwargs)

        async def gen() -> ChatResponseAsyncGen:
            async for resp in inner:
                yield self._to_chat(resp)

        return gen()
