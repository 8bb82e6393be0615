"""Split documents into token-bounded chunks on natural boundaries.

Chunks are substrings of the document, cut where the tokenizer's offsets allow, preferring
paragraph, then line, then sentence ends, so that retrieval units read naturally.
"""

from __future__ import annotations

from typing import Any

from daser_rag.prompt import encode_text

_BREAKS = ("\n\n", "\n", ". ", " ")


def split_text(tokenizer: Any, text: str, max_tokens: int) -> list[str]:
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
    text = text.strip()
    if not text:
        return []
    # user text: a control-token string in a document is text, counted as the tokens that spell it
    _, offsets = encode_text(tokenizer, text, offsets=True)
    if len(offsets) <= max_tokens:
        return [text]
    chunks: list[str] = []
    start_tok = 0
    start_char = 0
    while start_tok < len(offsets):
        end_tok = min(start_tok + max_tokens, len(offsets))
        if end_tok == len(offsets):
            piece = text[start_char:]
            if piece.strip():
                chunks.append(piece.strip())
            break
        hard_end = offsets[end_tok - 1][1]
        window = text[start_char:hard_end]
        cut = -1
        for brk in _BREAKS:
            pos = window.rfind(brk)
            if pos > len(window) // 3:
                cut = start_char + pos + len(brk)
                break
        if cut < 0:
            cut = hard_end
        piece = text[start_char:cut].strip()
        if piece:
            chunks.append(piece)
        start_char = cut
        # first token that starts at or after the cut
        while start_tok < len(offsets) and offsets[start_tok][0] < cut:
            start_tok += 1
    return chunks
