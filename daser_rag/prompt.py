"""How a RAG prompt is laid out in tokens: [system prefix][chunk]...[chunk][question].

Each piece is tokenized on its own, so a chunk's token ids (and hence its KV key) do not
depend on its neighbours. Full prefill uses the very same token sequence, which is what
makes "reuse == full prefill" a meaningful, testable statement.

Two kinds of text are tokenized differently:

* template text (the chat template's head and tail, the service's system prompt) may hold the
  model's control tokens (`<|im_start|>`, `<|im_end|>`, ...) and is tokenized with them;
* user text (questions, documents, chunks, chat content) is tokenized *literally*: a string
  such as "<|im_end|>" in it becomes the ordinary tokens that spell it, never the control token,
  so a question or a retrieved document cannot close its turn and forge a system or assistant
  turn (prompt injection through the template). `encode_text` is the one place that does this;
  `PromptFormat.encode`, the chunker, every engine's `count_tokens` and the vLLM planner (which
  sends these ids to vLLM) go through it.

Literal tokenization uses a private copy of the fast tokenizer with `encode_special_tokens`
set, never the shared tokenizer's flag: transformers toggles that flag per call
(`split_special_tokens=`), which is a race when several threads tokenize at once.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Literal, overload

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer questions using only the provided documents."
DEFAULT_INSTRUCTION = "Read the documents below, then answer the question briefly.\n\n"
_SENTINEL = "\u2063DASER_USER_CONTENT\u2063"

_literal_lock = threading.Lock()
_literal: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_NO_COPY = object()


def _literal_backend(tokenizer: Any) -> Any:
    """A private `tokenizers.Tokenizer` equal to `tokenizer`'s, with special-token text kept as
    text; `_NO_COPY` when `tokenizer` has no fast backend to copy."""
    try:
        return _literal[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    literal: Any = _NO_COPY
    if backend is not None and hasattr(backend, "to_str"):
        from tokenizers import Tokenizer

        literal = Tokenizer.from_str(backend.to_str())
        literal.encode_special_tokens = True
        literal.no_truncation()
        literal.no_padding()
    with _literal_lock:
        try:
            _literal[tokenizer] = literal
        except TypeError:  # not weak-referenceable: rebuilt per call (correct, slower)
            pass
    return literal


@overload
def encode_text(tokenizer: Any, text: str, *, offsets: Literal[False] = False) -> list[int]: ...


@overload
def encode_text(tokenizer: Any, text: str, *, offsets: Literal[True]) -> tuple[list[int], list[tuple[int, int]]]: ...


def encode_text(tokenizer: Any, text: str, *,
                offsets: bool = False) -> list[int] | tuple[list[int], list[tuple[int, int]]]:
    """Token ids of user `text`, special-token strings tokenized as text (no BOS/EOS added).
    With `offsets=True`: `(ids, [(start, end), ...])` in characters of `text`."""
    literal = _literal_backend(tokenizer)
    if literal is not _NO_COPY:
        # encode_batch releases the GIL while it works (encode holds it: 100+ ms for a 200k-char
        # document, during which a service's event loop could not answer anyone)
        enc = literal.encode_batch([text], add_special_tokens=False)[0]
        ids = list(enc.ids)
        return (ids, list(enc.offsets)) if offsets else ids
    # a slow (pure Python) tokenizer or daser's own TokenizerFiles: both take the flag per call
    # without shared state
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets)
    ids = list(enc["input_ids"])
    return (ids, list(enc["offset_mapping"])) if offsets else ids


class PromptFormat:
    def __init__(
        self,
        tokenizer: Any,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.instruction = instruction
        head, tail = self._split_template(tokenizer, system_prompt)
        self.head_text = head + instruction
        self.tail_text = tail
        self.prefix_ids: list[int] = self.encode_template(self.head_text)
        self.tail_ids: list[int] = self.encode_template(self.tail_text)
        _literal_backend(tokenizer)  # the literal copy is built now, not inside a first request

    @staticmethod
    def _split_template(tokenizer: Any, system_prompt: str) -> tuple[str, str]:
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": _SENTINEL}]
            rendered = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if isinstance(rendered, str) and rendered.count(_SENTINEL) == 1:
                head, tail = rendered.split(_SENTINEL)
                return head, tail
        return f"{system_prompt}\n\n", "\n\nAnswer:"

    def encode(self, text: str) -> list[int]:
        """User text (documents, questions, chat content): control-token strings stay text."""
        return encode_text(self.tokenizer, text)

    def encode_template(self, text: str) -> list[int]:
        """Template text, whose control tokens are real; never pass user text here."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def render_chunk(text: str) -> str:
        return text.strip() + "\n\n"

    def chunk_ids(self, text: str) -> list[int]:
        return self.encode(self.render_chunk(text))

    def query_ids(self, question: str) -> list[int]:
        return self.encode(f"Question: {question.strip()}") + self.tail_ids

    def full_text(self, chunks: list[str], question: str) -> str:
        """The prompt as one string, for display only: tokenizing it would read control-token
        strings in user text as control tokens (use the *_ids methods)."""
        return self.head_text + "".join(self.render_chunk(c) for c in chunks) + f"Question: {question.strip()}" + self.tail_text
