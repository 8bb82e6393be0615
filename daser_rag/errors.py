"""Error types: every user-facing failure names what was wrong so callers can act on it."""

from __future__ import annotations


class DaserError(Exception):
    """Base class for all daser-rag errors."""


class InvalidInputError(DaserError, ValueError):
    """A request was malformed: empty question, bad parameter, wrong type."""


class UnknownDocumentError(DaserError, KeyError):
    """A document id was referenced that the store has never seen (or has invalidated)."""

    def __init__(self, doc_id: str) -> None:
        super().__init__(doc_id)
        self.doc_id = doc_id

    def __str__(self) -> str:  # KeyError would otherwise print the repr with quotes
        return f"unknown document id {self.doc_id!r}: it was never ingested or has been invalidated"


class ContextTooLongError(DaserError, ValueError):
    """The assembled prompt does not fit in the model's context window."""

    def __init__(self, needed: int, limit: int) -> None:
        super().__init__(
            f"prompt needs {needed} tokens (+ generation) but the model's context window is {limit}; "
            "pass fewer or shorter documents, or lower max_new_tokens"
        )
        self.needed = needed
        self.limit = limit


class ModelLoadError(DaserError, RuntimeError):
    """The model path is missing, unreadable, or not a supported architecture."""


class CorruptEntryError(DaserError):
    """A stored KV entry failed its integrity check; it is dropped, never served."""


class EngineUnavailableError(DaserError):
    """No engine instance could take the request (all down, hung or overloaded); nothing was
    generated, so the request may be retried as it is."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
