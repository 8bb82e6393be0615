"""One validation of user text for every entry point (core, CLI, service, LangChain, LlamaIndex).

Why one module: the same bad input (an empty document, two documents with one id in one call,
text with a lone UTF-16 surrogate) used to fail differently on each path (accepted as a
0-chunk document, a raw tokenizer TypeError, a UnicodeEncodeError, or silently kept twice).
Every path now calls these helpers before anything is written, so the caller gets the same
`InvalidInputError` with the same wording wherever the text came in, and nothing already
stored is touched.
"""

from __future__ import annotations

from collections.abc import Iterable

from daser_rag.errors import InvalidInputError

__all__ = ["check_document_text", "check_text", "check_unique_ids", "describe", "duplicate_ids_error"]


def describe(doc_id: object) -> str:
    """How a document is named in messages: by id when it has one."""
    return f"document {doc_id!r}" if doc_id not in (None, "") else "a document without an id"


def check_text(text: object, what: str) -> str:
    """`text` as a valid, non-empty string, or InvalidInputError naming `what`.

    Rejected: non-strings (None included), empty or whitespace-only strings, and strings that
    cannot be encoded as UTF-8 (lone surrogates, e.g. from a bad `surrogateescape` decode):
    the tokenizer cannot read them, and KV keyed on them could never be matched again.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} has no text (got {type(text).__name__}, expected a string)")
    if not text.strip():
        raise InvalidInputError(f"{what} is empty (no text, or only whitespace); nothing was stored for it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} contains a lone surrogate {text[exc.start]!r} at character {exc.start}, which is not "
            "valid Unicode text; decode the source with errors='replace' (or fix it) first") from None
    return text


def check_document_text(doc_id: object, text: object) -> str:
    """`check_text` for a document: the message names the document's id."""
    return check_text(text, describe(doc_id))


def check_unique_ids(ids: Iterable[object], what: str = "document") -> None:
    """Two items of one call with the same id: which one should win is a guess, so neither does."""
    seen: set[object] = set()
    dups: list[object] = []
    for i in ids:
        if i in seen and i not in dups:
            dups.append(i)
        seen.add(i)
    if dups:
        raise duplicate_ids_error(dups, what)


def duplicate_ids_error(dups: list[object], what: str = "document") -> InvalidInputError:
    """The one message for ids that appear twice in one call (for callers that find them their own way)."""
    shown = ", ".join(repr(d) for d in dups[:5]) + (" ..." if len(dups) > 5 else "")
    return InvalidInputError(
        f"duplicate {what} id(s) in one call: {shown}; each id may appear once (nothing was stored)")
