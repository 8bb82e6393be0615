"""Request bodies: read after the API key was checked, parsed strictly, shape-checked before
any model validation, and validated off the event loop when they are large.

Routes do not declare pydantic body parameters (FastAPI would parse those before any
dependency, so a client without a key could make the service parse megabytes and learn from
the parser's messages). Instead a route authenticates, then calls `read_body`.

Limits, each answered before the next, more expensive step:
* the Content-Length and body deadline (middleware.Guard: 411 / 413 / 408);
* strict UTF-8 and strict JSON (no NaN / Infinity): 400 `invalid_json`;
* nesting at most `MAX_JSON_DEPTH` levels: 400 `invalid_json`;
* at most `MAX_JSON_VALUES` JSON values (objects, arrays, strings, numbers...) in one body:
  413 `body_too_complex` (279k empty content parts are ~7 MB, well inside the byte limit, but
  each becomes a Python object to validate);
* then the request model (types, ranges, item counts): 400 `invalid_request`.

A body over `INLINE_BYTES` is decoded and validated in a worker thread, in one of the
service's `CpuSlots` lanes: parsing 8 MB holds the GIL for tens of milliseconds, and twelve at
once on the event loop would stall /health for a second.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from daser_rag.server.errors import ApiError

if TYPE_CHECKING:
    from daser_rag.server.admission import CpuSlots

MAX_JSON_DEPTH = 32
"""Deepest nesting of objects / arrays in a request body (metadata included)."""
MAX_JSON_VALUES = 50_000
"""JSON values in one request body."""
INLINE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (microseconds); larger ones in a lane."""

M = TypeVar("M", bound=BaseModel)


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, f"malformed JSON body: {message}", code="invalid_json")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Counter:
    """json.loads hooks that count objects and numbers as they are built and stop the parse
    past the limit: the work on a body of 279k small objects ends after the first
    `MAX_JSON_VALUES`, and each hook call is Python code, where the parsing thread lets the event
    loop have the GIL (a bare json.loads of such a body holds it for hundreds of milliseconds)."""

    def __init__(self) -> None:
        self.n = 0

    def _bump(self, k: int) -> None:
        self.n += k
        if self.n > MAX_JSON_VALUES:
            raise _TooComplex()

    def obj(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self._bump(1 + len(pairs))
        return dict(pairs)

    def num(self, text: str, kind: type) -> Any:
        self._bump(1)
        return kind(text)


class _TooComplex(Exception):
    pass


def _too_complex() -> ApiError:
    return ApiError(413, f"request body holds more than {MAX_JSON_VALUES} JSON values", code="body_too_complex")


def parse_json(raw: bytes) -> Any:
    """Strict UTF-8, strict JSON, bounded nesting and value count."""
    if not raw.strip():
        raise ApiError(400, "a JSON request body is required", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid_json(f"not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise _invalid_json("starts with a byte order mark")
    counter = _Counter()
    try:
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=counter.obj,
                           parse_int=lambda t: counter.num(t, int), parse_float=lambda t: counter.num(t, float))
    except _TooComplex:
        raise _too_complex() from None
    except RecursionError:
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError and the constants above
        raise _invalid_json(str(exc)) from None
    check_shape(value)
    return value


def check_shape(value: Any) -> None:
    """Depth and value count, iteratively (a recursive walk would itself overflow the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        v, depth = stack.pop()
        count += 1
        if count > MAX_JSON_VALUES:
            raise _too_complex()
        if isinstance(v, dict):
            if depth > MAX_JSON_DEPTH:
                raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
            count += len(v)  # the keys
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            if depth > MAX_JSON_DEPTH:
                raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in v)


def validate(model: type[M], raw: bytes, known_openai: bool = False) -> M:
    """Parse and validate `raw` as `model` (400s in the API's shapes)."""
    data = parse_json(raw)
    if known_openai:
        from daser_rag.server.schemas import unsupported_openai_field

        bad = unsupported_openai_field(data, set(model.model_fields))
        if bad is not None:
            name, value = bad
            raise ApiError(400, f"{name}={json.dumps(value)[:80]} is not supported by this service (send it "
                           "without a value, or with its default)", code="unsupported_parameter", param=name)
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    except RecursionError:  # pragma: no cover - bounded by MAX_JSON_DEPTH
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


async def read_body(request: Request, model: type[M], lanes: CpuSlots, share: str, *, openai_fields: bool = False) -> M:
    """The request's body as `model`; call only after the API key was checked."""
    raw = await request.body()
    if len(raw) <= INLINE_BYTES:
        return validate(model, raw, openai_fields)
    return await lanes.run(share, validate, model, raw, openai_fields)


__all__ = ["INLINE_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_VALUES", "check_shape", "parse_json", "read_body",
           "validate"]
