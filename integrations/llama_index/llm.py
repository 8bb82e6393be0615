"""DaserLLM: a LlamaIndex `CustomLLM` backed by any daser-rag `KVGenerator`.

Used like any LlamaIndex LLM (`Settings.llm = DaserLLM(generator)`), it answers a plain prompt
with no retrieved context. Given document refs (`contexts=` nodes, `ChunkRef`s, documents or
strings), it places them as separate chunks and reuses their cached KV instead of re-reading
them; `CacheAwareSynthesizer` is the component that passes retrieved nodes this way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from daser_rag.api import KVGenerator
from daser_rag.types import GenerationResult
from integrations.llama_index.kv_sync import ContextLike, KVSync, to_context_items

_GEN_KWARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "recompute_ratio", "use_cache",
               "tenant", "stop")


def result_summary(result: GenerationResult | None) -> dict[str, Any]:
    """The numbers a caller wants next to a completion: token counts, cache hits, timings."""
    if result is None:
        return {}
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "context_tokens": result.context_tokens,
        "cache_hits": result.cache_hits,
        "cache_misses": result.cache_misses,
        "reused_tokens": result.reused_tokens,
        "recomputed_tokens": result.recomputed_tokens,
        "mode": result.mode,
        "recompute_ratio": result.recompute_ratio,
        "finish_reason": result.finish_reason,
        "ttft_s": result.timings.ttft_s,
        "total_s": result.timings.total_s,
        "chunk_keys": list(result.chunk_keys),
    }


class DaserLLM(CustomLLM):
    """A drop-in LlamaIndex LLM; with document refs it decodes on fused cached chunk KV."""

    max_new_tokens: int = Field(default=128, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    recompute_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="CacheBlend share of context tokens recomputed (None: the generator's default; 1.0: full prefill quality).")
    use_cache: bool = Field(default=True, description="False runs full prefill (the baseline).")
    tenant: str = Field(default="", description="Tenant salt: tenants never share chunk KV.")
    context_window: int = Field(default=8192, gt=0)
    model_name: str = Field(default="daser-rag")

    _generator: Any = PrivateAttr()

    def __init__(self, generator: KVGenerator, **kwargs: Any) -> None:
        if not isinstance(generator, KVGenerator):
            raise TypeError(
                f"DaserLLM needs an object satisfying daser_rag.api.KVGenerator, got {type(generator).__name__}")
        if "context_window" not in kwargs:
            window = KVSync(generator).context_window()
            if window:
                kwargs["context_window"] = window
        super().__init__(**kwargs)
        self._generator = generator

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
    def _request(self, kwargs: dict[str, Any]) -> tuple[list[Any] | None, dict[str, Any]]:
        contexts: Iterable[ContextLike] | None = kwargs.pop("contexts", None)
        if "max_tokens" in kwargs:  # the name most LlamaIndex LLMs use
            kwargs.setdefault("max_new_tokens", kwargs.pop("max_tokens"))
        unknown = sorted(set(kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise TypeError(f"DaserLLM got unexpected keyword argument(s) {unknown}; "
                            f"supported: contexts, max_tokens, {', '.join(_GEN_KWARGS)}")
        gen = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "use_cache": self.use_cache,
        }
        if self.tenant:  # left out when empty, so a remote client's own default tenant applies
            gen["tenant"] = self.tenant
        if self.recompute_ratio is not None:
            gen["recompute_ratio"] = self.recompute_ratio
        gen.update({k: v for k, v in kwargs.items() if v is not None})
        return to_context_items(contexts), gen

    # -- sync -----------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        contexts, gen = self._request(dict(kwargs))
        result = self._generator.generate(prompt, contexts, **gen)
        return CompletionResponse(text=result.text, raw=result, additional_kwargs=result_summary(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        contexts, gen = self._request(dict(kwargs))
        stream = self._generator.stream(prompt, contexts, **gen)

        def responses() -> CompletionResponseGen:
            text = ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            result = getattr(stream, "result", None)
            # A closing empty delta carries the result, as OpenAI-style streams end with usage.
            yield CompletionResponse(text=text, delta="", raw=result, additional_kwargs=result_summary(result))

        return responses()

    # -- async: generation is compute bound, so it runs in a worker thread ----------------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        contexts, gen = self._request(dict(kwargs))
        result = await asyncio.to_thread(self._generator.generate, prompt, contexts, **gen)
        return CompletionResponse(text=result.text, raw=result, additional_kwargs=result_summary(result))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        contexts, gen = self._request(dict(kwargs))
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
                loop.call_soon_threadsafe(queue.put_nowait, ("done", getattr(stream, "result", None)))
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
                        yield CompletionResponse(text=text, delta="", raw=value,
                                                 additional_kwargs=result_summary(value))
                        break
                    else:
                        raise value
            finally:
                cancelled.set()
                await worker

        return responses()

