"""How a RAG prompt is laid out in tokens: [system prefix][chunk]...[chunk][question].

Each piece is tokenized on its own, so a chunk's token ids (and hence its KV key) do not
depend on its neighbours. Full prefill uses the very same token sequence, which is what
makes "reuse == full prefill" a meaningful, testable statement.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer questions using only the provided documents."
DEFAULT_INSTRUCTION = "Read the documents below, then answer the question briefly.\n\n"
_SENTINEL = "\u2063DASER_USER_CONTENT\u2063"


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
        self.prefix_ids: list[int] = self.encode(self.head_text)

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
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def render_chunk(text: str) -> str:
        return text.strip() + "\n\n"

    def chunk_ids(self, text: str) -> list[int]:
        return self.encode(self.render_chunk(text))

    def query_ids(self, question: str) -> list[int]:
        return self.encode(f"Question: {question.strip()}" + self.tail_text)

    def full_text(self, chunks: list[str], question: str) -> str:
        return self.head_text + "".join(self.render_chunk(c) for c in chunks) + f"Question: {question.strip()}" + self.tail_text
