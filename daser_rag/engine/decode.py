"""The one decode loop (gpt-fast style): tiny free functions every caller shares.

The generator, the fidelity evaluation and the benchmark harness all decode through
`decode_n_tokens`, so "the answer" means the same token sequence everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Generator, Iterator, Sequence
from typing import Any

import torch

from daser_rag.model.kv_cache import PositionalKVCache
from daser_rag.model.runner import LayerRunner

Chooser = Callable[[torch.Tensor], int]


def stop_token_ids(tokenizer: Any) -> set[int]:
    """EOS plus the chat-end tokens of common templates: any of them ends an answer."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            eos.add(tid)
    return eos


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


@torch.inference_mode()
def decode_one_token(runner: LayerRunner, cache: PositionalKVCache, token: int) -> torch.Tensor:
    """Append `token` at the cache's end; return the next-token logits [vocab]."""
    return runner.forward(torch.tensor([token]), cache.length, cache)[-1]


def decode_n_tokens(
    runner: LayerRunner,
    cache: PositionalKVCache,
    first_logits: torch.Tensor,
    n: int,
    *,
    choose: Chooser = greedy,
    forced: Sequence[int] | None = None,
    stop_ids: Container[int] = (),
    cancel: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield up to `n` (token, logits-it-was-chosen-from) pairs.

    `forced`: teacher-forcing, take these tokens instead of choosing. A token in `stop_ids` is
    yielded and ends the loop (callers decide whether to show it). `cancel()` is polled before
    each token. No forward pass is spent after the last token.
    """
    logits = first_logits.reshape(-1)
    for step in range(n):
        if cancel is not None and cancel():
            return
        tok = int(forced[step]) if forced is not None else choose(logits)
        yield tok, logits
        if tok in stop_ids or step + 1 == n or (forced is not None and step + 1 == len(forced)):
            return
        logits = decode_one_token(runner, cache, tok)


class TextEmitter:
    """Incremental detokenization with stop strings: feed tokens, get printable deltas.

    Waits while the text ends in a partial UTF-8 sequence, and cuts at the first stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = next((s for s in self.stop if s in text), None)
        if hit is not None:
            text = text[: text.index(hit)]
            self.stopped = True
        elif text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if len(text) > len(self.emitted) else ""
        if self.stopped or len(text) > len(self.emitted):
            self.emitted = text
        return delta

    @property
    def text(self) -> str:
        return self.emitted if self.stopped else self.tokenizer.decode(self.ids, skip_special_tokens=True)


class TokenStream:
    """Iterate to receive text deltas; `.result` holds the GenerationResult once finished.

    Wraps an engine's request generator (yields deltas, returns the result), so every engine
    streams and drains the same way."""

    def __init__(self, run: Generator[str, None, Any]) -> None:
        self._run = run
        self._result: Any = None

    def __iter__(self) -> Iterator[str]:
        self._result = yield from self._run

    @property
    def result(self) -> Any:
        return self._result

    def drain(self) -> Any:
        """Run to the end without reading the deltas (a non-streamed request); the result."""
        for _ in self:
            pass
        return self._result


class StreamingEngine:
    """`generate` and `stream` for an engine that runs one request as `_run(...)`: a generator of
    text deltas that returns the request's GenerationResult. Both engines (daser's own, vLLM)
    stream and drain through this one pair."""

    def _run(self, question: str, contexts: Sequence[Any] | None, params: Any,
             **kwargs: Any) -> Generator[str, None, Any]:
        raise NotImplementedError

    def generate(self, question: str, contexts: Sequence[Any] | None = None, params: Any = None,
                 **kwargs: Any) -> Any:
        """The whole answer (the request's GenerationResult)."""
        return self.stream(question, contexts, params, **kwargs).drain()

    def stream(self, question: str, contexts: Sequence[Any] | None = None, params: Any = None,
               **kwargs: Any) -> TokenStream:
        """Text deltas as they are decoded; `.result` once exhausted."""
        return TokenStream(self._run(question, contexts, params, **kwargs))
