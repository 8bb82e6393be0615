"""ChatDaser: a LangChain chat model that answers over documents with their cached KV.

Documents that reach it as separate pieces (`text-plain` blocks, or the `documents=` keyword)
are fused from stored chunk KV instead of being prefilled; the answer's
`response_metadata["daser"]` says how many chunks hit the cache and how many tokens were
recomputed. Works against any `daser_rag.api.KVGenerator`: the in-process
`CacheAwareGenerator` or a remote client.

Documents formatted into the prompt text (a chain like `retriever | format_docs | prompt |
ChatDaser`) are not separable: such a request is answered by full prefill, its metadata says
so (`mode="full"`, no `cache_read` tokens) and ChatDaser warns once (`NoKVReuseWarning`).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from daser_rag.api import KVGenerator
from daser_rag.context import SHARED_TENANT
from daser_rag.errors import InvalidInputError
from daser_rag.generator_spec import build_from_spec, generator_spec, model_name_of
from daser_rag.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, check_recompute_ratio, check_selector
from daser_rag.types import GenerationResult
from langchain_daser._convert import DaserRequest, messages_to_request

_IGNORED_PARAMS = ("stream",)  # LangChain may forward these; they mean nothing here


class NoKVReuseWarning(UserWarning):
    """A request reached ChatDaser with its documents inside the prompt text: nothing was reused."""


NO_REUSE_MESSAGE = (
    "ChatDaser got a prompt with no separate documents (documents formatted into the prompt string, "
    "e.g. retriever | format_docs | prompt | llm), so it runs full prefill and reuses no cached KV. "
    "For KV reuse pass documents as text-plain blocks: create_daser_rag_chain(retriever, llm), or "
    "DocumentsToMessages in place of format_docs | prompt, or llm.invoke(question, documents=docs) "
    "(this warning is shown once per ChatDaser)."
)


def result_metadata(result: GenerationResult) -> dict[str, Any]:
    """The cache accounting of one answer, as plain JSON-able values (`mode` as the core
    reports it: "full" whenever nothing was reused, also from a generator that says otherwise)."""
    d = result.to_dict()
    d.pop("text", None)
    placed = result.cache_hits + result.cache_misses > 0
    if not (placed and (result.cache_hits > 0 or result.reused_tokens > 0)):
        d["mode"] = "full"  # nothing reused, whatever a (remote, older) generator calls its path
    return d


def _usage(result: GenerationResult) -> UsageMetadata:
    usage = UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )
    if result.mode != "full" and result.cache_hits > 0 and result.cache_misses == 0:
        # every context token's KV came from the store (exact prefix or fused chunk); with a
        # miss the per-chunk split is unknown here, so nothing is claimed
        usage["input_token_details"] = {"cache_read": result.exact_tokens + result.reused_tokens}
    return usage


class ChatDaser(BaseChatModel):
    """Chat model over a daser KV generator.

    Example:
        ```python
        from daser_rag import CacheAwareGenerator
        from langchain_daser import ChatDaser

        llm = ChatDaser(generator=CacheAwareGenerator())
        llm.invoke("What is a KV cache?")
        llm.invoke("What does pass do?", documents=retrieved_docs)  # fused from cached KV
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    generator: Any = Field(default=None, exclude=True)
    """Any object satisfying `daser_rag.api.KVGenerator` (required unless `generator_spec` is given)."""
    generator_spec: dict[str, Any] | None = None
    """How to rebuild the generator (filled in from `generator`; used by `langchain_core.load.loads`):
    `{"kind": "local", "model": path, "cache_dir": path}` or `{"kind": "remote", "base_url": url}`."""
    api_key: SecretStr | None = None
    """API key of a remote daser service built from `generator_spec` (a secret: `dumpd` writes
    a reference to DASER_API_KEY, never the key)."""
    model_name: str = "daser-rag"
    """The model's name; taken from the generator when not given."""
    max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    recompute_ratio: float | str | None = None
    """Share of context tokens recomputed (CacheBlend), or "auto"; None uses the generator's default,
    1.0 equals full prefill."""
    selector: str | None = None
    """How recomputed tokens are chosen (see `daser_rag.params.SELECTORS`); None: the generator's default."""
    use_cache: bool = True
    """False prefills everything from scratch (the baseline)."""
    calibration: bool | None = None
    """The engine's calibration of reused KV: None uses it when the engine has one for the
    request's regime, False never, True requires it (an InvalidInputError when there is none).
    `response_metadata["daser"]["calibrated"]` says whether one acted."""
    tenant: str = SHARED_TENANT
    stop: list[str] | None = None

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

    @model_validator(mode="before")
    @classmethod
    def _build_generator(cls, data: Any) -> Any:
        """A generator from `generator_spec` when none is passed (`loads(dumpd(llm))`), the spec
        from the generator otherwise, and the model's name from the generator."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        gen = data.get("generator")
        if gen is None:
            spec = data.get("generator_spec")
            if not spec:
                raise TypeError("ChatDaser needs generator=<KVGenerator> (or generator_spec from a serialized "
                                "ChatDaser)")
            key = data.get("api_key")
            key = key.get_secret_value() if isinstance(key, SecretStr) else key
            data["generator"] = gen = build_from_spec(spec, key)
        else:
            if data.get("generator_spec") is None:
                data["generator_spec"] = generator_spec(gen)
            if data.get("api_key") is None and isinstance(getattr(gen, "api_key", None), str):
                data["api_key"] = gen.api_key  # kept as a secret, so that loads() can reconnect
        if not data.get("model_name"):
            data["model_name"] = model_name_of(gen)
        return data

    @field_validator("generator")
    @classmethod
    def _check_generator(cls, value: Any) -> Any:
        if not isinstance(value, KVGenerator):
            raise TypeError(
                f"generator must satisfy daser_rag.api.KVGenerator (generate, stream, add_documents, invalidate, "
                f"split), got {type(value).__name__}"
            )
        return value

    @property
    def _llm_type(self) -> str:
        return "daser-rag"

    # -- serialization (langchain_core.load.dumpd / loads) ------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """Serializable: the settings and `generator_spec` are stored, the live generator is not
        (`loads` rebuilds it from the spec: the model is loaded again, or the service reached)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_daser", "chat_models"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "DASER_API_KEY"}

    # -- token counting: the model's own tokenizer, offline ---------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the engine's own tokenizer (in process, or the service's through
        `DaserClient`): LangChain's default fetches GPT-2 online and returns nothing offline,
        which silently broke `trim_messages`."""
        return self.generator.token_ids(text)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Tool calling is not supported: the model is a plain-text RAG answerer whose prompt
        layout (fixed system prefix + cached chunks) has no place for tool schemas."""
        raise NotImplementedError(
            "ChatDaser does not support tool calling (bind_tools): daser-rag answers questions over documents "
            "with a plain-text model; use a tool-calling chat model for agents and pass ChatDaser the retrieved "
            "documents instead")

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "recompute_ratio": self.recompute_ratio,
            "selector": self.selector,
            "use_cache": self.use_cache,
            "calibration": self.calibration,
        }

    # -- request building -------------------------------------------------------------------
    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[DaserRequest, dict[str, Any]]:
        kwargs = dict(kwargs)
        documents: Sequence[Any] | None = kwargs.pop("documents", None)
        for name in _IGNORED_PARAMS:
            kwargs.pop(name, None)
        for name in [k for k in kwargs if k.startswith("ls_")]:
            kwargs.pop(name)
        known = (*GenerationParams.keys(), "max_tokens")
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise InvalidInputError(
                f"ChatDaser got unknown argument(s) {unknown}; it accepts documents= and {list(known)}")
        if documents is not None and not isinstance(documents, (list, tuple)):
            raise InvalidInputError(f"documents= must be a list, got {type(documents).__name__}")
        request = messages_to_request(messages, self.generator.split, documents)
        options: dict[str, Any] = {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "use_cache": self.use_cache,
            "seed": self.seed,
            "recompute_ratio": self.recompute_ratio,
            "selector": self.selector,
            "calibration": self.calibration,
            "tenant": self.tenant,
        }
        if kwargs.get("max_tokens") is not None:
            kwargs.setdefault("max_new_tokens", kwargs["max_tokens"])
        kwargs.pop("max_tokens", None)
        options.update({k: v for k, v in kwargs.items() if v is not None})
        stops = [*(self.stop or []), *(stop or [])]
        if stops:
            options["stop"] = stops
        GenerationParams.from_kwargs(**options)  # one validation for every entry point
        # Unset options are left out: the generator's (or a remote service's) defaults apply.
        params = {k: v for k, v in options.items() if v not in (None, "")}
        if not request.contexts:
            self._warn_no_reuse()
        return request, params

    def _warn_no_reuse(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(NO_REUSE_MESSAGE, NoKVReuseWarning, stacklevel=5)

    @staticmethod
    def _message_fields(result: GenerationResult, model_name: str) -> dict[str, Any]:
        return {
            "response_metadata": {
                "model_name": model_name,
                "model_provider": "daser",
                "finish_reason": result.finish_reason,
                "daser": result_metadata(result),
            },
            "usage_metadata": _usage(result),
        }

    # -- LangChain hooks --------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, params = self._prepare(messages, stop, kwargs)
        result = self.generator.generate(request.question, request.contexts, **params)
        message = AIMessage(content=result.text, **self._message_fields(result, self.model_name))
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model_name})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, params = self._prepare(messages, stop, kwargs)
        stream = self.generator.stream(request.question, request.contexts, **params)
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        result = stream.result
        if result is not None:
            yield ChatGenerationChunk(message=AIMessageChunk(
                content="", chunk_position="last", **self._message_fields(result, self.model_name)))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The whole sync stream runs on ONE worker thread: the in-process generator holds a
        # re-entrant lock across the stream, which must be released by the thread that took it
        # (stepping the iterator from pool threads, as the default does, breaks that).
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def produce() -> None:
            try:
                for chunk in self._stream(messages, stop, None, **kwargs):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = threading.Thread(target=produce, name="chatdaser-astream", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None and item.text:
                    await run_manager.on_llm_new_token(item.text, chunk=item)
                yield item
        finally:
            cancelled.set()
