"""Request/response bodies. Validation here is the first line against malformed or hostile input:
every field has a type, a range and a size cap, and unknown fields are rejected by name."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from daser_rag.server.ids import normalize_id

# Generous but finite caps; the app can tighten them (see Limits). docs/service.md lists them.
MAX_TEXT_CHARS = 200_000
MAX_PROMPT_CHARS = 32_000
MAX_CONTEXT_ITEMS = 64
MAX_DOCS_PER_CALL = 256
MAX_STOP = 4
MAX_MESSAGES = 64
MAX_CONTENT_PARTS = 64
"""Content parts in one chat message (a list of {"type": "text", "text": ...})."""

# Strict scalars: "3" or true is not a number, 1 is not a boolean (no silent coercion).
Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

_TENANT_RE = re.compile(r"[A-Za-z0-9._:@-]{0,128}")
# lone surrogates (not encodable as UTF-8) and control characters other than tab / newline / CR
_BAD_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _describe(ch: str) -> str:
    return "a lone surrogate" if 0xD800 <= ord(ch) <= 0xDFFF else "a control character"


def check_text(value: str, what: str = "text") -> str:
    """The one check every string in a request goes through (ids and tenants are stricter)."""
    m = _BAD_CHAR.search(value)
    if m is not None:
        raise ValueError(f"{what} contains {_describe(m.group())} (U+{ord(m.group()):04X}) at position {m.start()}")
    return value


def check_tenant(value: str | None) -> str:
    value = value or ""
    if not isinstance(value, str) or not _TENANT_RE.fullmatch(value):
        raise ValueError("tenant must be at most 128 characters from [A-Za-z0-9._:@-]")
    return value


def check_id(value: str) -> str:
    """A document id as stored: NFC-normalized, addressable by URL, no invisible characters
    (see daser_rag/server/ids.py for the rules)."""
    return normalize_id(value)


def _walk(value: Any, path: str) -> None:
    if isinstance(value, str):
        check_text(value, path or "a string")
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                check_text(k, f"a key in {path or 'the body'}")
            _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _strings(cls, data: Any) -> Any:
        _walk(data, "")
        return data


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


class StreamOptions(_Strict):
    """OpenAI's `stream_options`: `include_usage` adds a last chunk with `choices: []` and the
    usage (ignored without `stream`, as frameworks send it regardless)."""

    include_usage: Bool = False
    include_obfuscation: Bool | None = None  # accepted, not used (no obfuscation padding is sent)


# OpenAI request fields this service does not implement. A request that sends one with its
# neutral value (what the field means when absent) is served as if it were absent, since common
# clients send defaults explicitly; any other value is refused, 400 `unsupported_parameter`.
NEUTRAL_OPENAI_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,), "prediction": (None,), "audio": (None,), "web_search_options": (None,),
    "verbosity": (None,), "prompt_cache_key": (None,), "safety_identifier": (None,),
}


def unsupported_openai_field(body: Any, known: set[str]) -> tuple[str, Any] | None:
    """The first OpenAI field of `body` this service cannot honour, with its value; neutral ones
    are removed from `body` in place."""
    if not isinstance(body, dict):
        return None
    for name in [k for k in body if k not in known]:
        if name in NEUTRAL_OPENAI_FIELDS:
            value = body[name]
            if any(type(value) is type(n) and value == n for n in NEUTRAL_OPENAI_FIELDS[name]) or value is None:
                del body[name]
                continue
            return name, value
    return None


class _GenParams(_Strict):
    model: str | None = Field(default=None, max_length=256)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    """OpenAI's newer name for `max_tokens` (either may be sent; both must then agree)."""
    stream_options: StreamOptions | None = None
    temperature: Num = Field(default=0.0, ge=0.0, le=2.0)
    top_p: Num = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Int = Field(default=0, ge=0, le=10_000)
    seed: Int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: Bool = False
    n: Int = Field(default=1, ge=1, le=1)
    user: str | None = Field(default=None, max_length=256)
    # daser extensions
    documents: list[ContextEntry] = Field(default_factory=list, max_length=MAX_CONTEXT_ITEMS)
    tenant: str | None = None
    recompute_ratio: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] | Literal["auto"] | None = None
    selector: str | None = Field(default=None, max_length=32)
    use_cache: Bool = True
    calibration: Bool | None = None
    """Use the engine's calibration (daser_rag/calibration): null when it has one for the
    request's regime, false never, true required (400 when it has none); the answer's
    `daser.calibrated` says whether one acted."""

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

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> _GenParams:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

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
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)]
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
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

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
    precompute: Bool = True
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
    precompute: Bool = True
    tenant: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str:
        return check_tenant(v)


class SplitRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_tokens: Int | None = Field(default=None, ge=8)
    """/v1/split only: pieces of at most this many tokens instead of the engine's chunk size."""


# -- index-time chunks for the adapters (routes /v1/chunks*, engine/chunk_index.py) -------------
MAX_CHUNKS_PER_CALL = 1024
"""Chunk texts in one /v1/chunks, /v1/chunks/info or /v1/chunks/refs request."""
MAX_KEYS_PER_CALL = 4096
_KEY_RE = re.compile(r"[cp][0-9a-f]{1,128}")

ChunkText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


def _chunk_texts(texts: list[str]) -> list[str]:
    if any(not t.strip() for t in texts):
        raise ValueError("a chunk text is empty")
    return texts


class _TenantField(_Strict):
    tenant: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str | None) -> str:
        return check_tenant(v)


class ChunkDocumentIn(_Strict):
    id: str
    texts: list[ChunkText] = Field(min_length=1, max_length=MAX_CHUNKS_PER_CALL)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        return _chunk_texts(v)


class AddChunksRequest(_TenantField):
    """POST /v1/chunks: each text is one chunk of its document (not split again)."""

    documents: list[ChunkDocumentIn] = Field(min_length=1, max_length=MAX_DOCS_PER_CALL)
    precompute: Bool = True
    replace: Bool = False

    @model_validator(mode="after")
    def _limits(self) -> AddChunksRequest:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids in one request must be unique")
        if sum(len(d.texts) for d in self.documents) > MAX_CHUNKS_PER_CALL:
            raise ValueError(f"at most {MAX_CHUNKS_PER_CALL} chunk texts per request")
        return self


class ChunkInfoRequest(_TenantField):
    """POST /v1/chunks/info: keys and token counts of texts, each as one chunk."""

    texts: list[ChunkText] = Field(min_length=1, max_length=MAX_CHUNKS_PER_CALL)

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        return _chunk_texts(v)


class ReplaceRefsRequest(ChunkDocumentIn, _TenantField):
    """POST /v1/chunks/refs: the keys of these texts become exactly the document's refs."""


class StoredRequest(_Strict):
    """POST /v1/chunks/stored: which of these chunk keys the store holds."""

    keys: list[str] = Field(min_length=1, max_length=MAX_KEYS_PER_CALL)

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        bad = next((k for k in v if not _KEY_RE.fullmatch(k)), None)
        if bad is not None:
            raise ValueError(f"{bad[:40]!r} is not a chunk key (as returned by /v1/chunks or a completion)")
        return v
