"""Request/response bodies. Validation here is the first line against malformed or hostile input:
every field has a type, a range and a size cap, and unknown fields are rejected by name."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Generous but finite caps; the app can tighten them (see Limits).
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 200_000
MAX_PROMPT_CHARS = 32_000
MAX_CONTEXT_ITEMS = 64
MAX_DOCS_PER_CALL = 256
MAX_STOP = 4

_TENANT_RE = re.compile(r"^[A-Za-z0-9._:@-]{0,128}$")


def check_tenant(value: str | None) -> str:
    value = value or ""
    if not _TENANT_RE.match(value):
        raise ValueError("tenant must be at most 128 characters from [A-Za-z0-9._:@-]")
    return value


def check_id(value: str) -> str:
    if not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"document id must be 1..{MAX_ID_CHARS} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("document id must not contain control characters")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextItem(_Strict):
    """One context entry beside the prompt.

    kind="document": {"id"} = an ingested document by id; {"id", "text"} = that document with
    its (possibly new) text, registered on the fly; {"text"} = anonymous text.
    kind="chunk": {"text", "id"?} = one retrieved chunk placed as-is (id ties it to a document).
    """

    id: str | None = None
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    kind: Literal["document", "chunk"] = "document"

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v)

    @model_validator(mode="after")
    def _needs_something(self) -> ContextItem:
        if self.id is None and self.text is None:
            raise ValueError("a context item needs 'id', 'text', or both")
        if self.text is not None and not self.text.strip():
            raise ValueError("a context item's 'text' is empty")
        if self.kind == "chunk" and self.text is None:
            raise ValueError("a context item of kind 'chunk' needs 'text'")
        return self


ContextEntry = Union[ContextItem, str]


class _GenParams(_Strict):
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=10_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = Field(default=None, max_length=256)
    # daser extensions
    documents: list[ContextEntry] = Field(default_factory=list, max_length=MAX_CONTEXT_ITEMS)
    tenant: str | None = None
    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    use_cache: bool = True

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str:
        return check_tenant(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP or any(len(s) > 64 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} strings of at most 64 characters")
        return [s for s in stops if s]

    @field_validator("documents")
    @classmethod
    def _plain_texts(cls, v: list[ContextEntry]) -> list[ContextEntry]:
        for item in v:
            if isinstance(item, str) and (not item.strip() or len(item) > MAX_TEXT_CHARS):
                raise ValueError(f"a plain-text context entry must be non-empty and at most {MAX_TEXT_CHARS} characters")
        return v


class CompletionRequest(_GenParams):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] = Field()
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user' (it is the question)")
        total = 0
        for m in self.messages:
            total += len(m.text())
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters")
        if not self.messages[-1].text().strip():
            raise ValueError("the last user message is empty")
        return self


class DocumentIn(_Strict):
    id: str
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("document text is empty")
        return v


class AddDocumentsRequest(_Strict):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCS_PER_CALL)
    precompute: bool = True
    tenant: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str:
        return check_tenant(v)

    @model_validator(mode="after")
    def _unique(self) -> AddDocumentsRequest:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids in one request must be unique")
        return self


class UpdateDocumentRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    metadata: dict[str, Any] = Field(default_factory=dict)
    precompute: bool = True
    tenant: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str:
        return check_tenant(v)


class SplitRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
