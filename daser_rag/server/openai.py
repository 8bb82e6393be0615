"""OpenAI shaping: request contexts and chats in, completion objects and SSE chunks out.

Wire compatibility with the official `openai` client (tests/test_openai_client.py): a streamed
chat's first chunk carries `delta.role`; `stream_options.include_usage` adds a last chunk with
`choices: []` and `usage`; errors carry `param`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from daser_rag.server.schemas import ChatMessage, ContextItem
from daser_rag.types import ChunkRef, Document, GenerationResult


def contexts(items: Sequence[ContextItem | str]) -> list[Any]:
    """Request context entries as the generator's context items."""
    out: list[Any] = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif it.kind == "chunk":
            out.append(ChunkRef(text=it.text, doc_id=it.id))
        elif it.id is not None and it.text is not None:
            out.append(Document(doc_id=it.id, text=it.text))
        elif it.id is not None:
            out.append(ChunkRef(doc_id=it.id))
        else:
            out.append(it.text)
    return out


def chat_question(messages: Sequence[ChatMessage]) -> str:
    """Fold a chat into the generator's single question. The system prompt that prefixes every
    cached chunk is fixed per service (it is part of the cache key), so request-level system
    messages travel with the question instead."""
    instructions = [m.text().strip() for m in messages if m.role in ("system", "developer") and m.text().strip()]
    turns = [m for m in messages[:-1] if m.role in ("user", "assistant")]
    parts = []
    if instructions:
        parts.append("Instructions: " + " ".join(instructions))
    if turns:
        parts.append("Conversation so far:\n" + "\n".join(f"{m.role.capitalize()}: {m.text().strip()}" for m in turns))
    parts.append(messages[-1].text().strip())
    return "\n\n".join(parts)


def daser_block(result: GenerationResult) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("text", None)
    return d


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(result: GenerationResult, rid: str, created: int, model: str, chat: bool) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(result), "daser": daser_block(result)}


def sse_chunk(delta: str | None, rid: str, created: int, model: str, chat: bool, finish: str | None = None,
              **extra: Any) -> str:
    if chat:
        d: dict[str, Any] = {} if delta is None else {"content": delta}
        if delta == "" and finish is None:  # the role announcement that opens a chat stream
            d = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], **extra}
    return f"data: {json.dumps(body)}\n\n"


def sse_error(message: str, code: str, type_: str = "server_error") -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'param': None, 'code': code}})}\n\n"


async def shape_stream(events: AsyncIterator[str], chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The service's SSE events as OpenAI clients expect them: a chat stream opens with a
    `delta.role` (added if the first chunk lacks it), and with `include_usage` the usage travels
    in its own last chunk (`choices: []`) before `[DONE]`."""
    first = True
    try:
        async for event in events:
            if first and chat and event.startswith("data: {"):
                first = False
                body = json.loads(event[6:])
                choices = body.get("choices") or []
                if choices and "role" not in choices[0].get("delta", {"role": None}):
                    choices[0]["delta"] = {"role": "assistant", **choices[0]["delta"]}
                    event = f"data: {json.dumps(body)}\n\n"
            if include_usage and event.startswith("data: {") and '"usage"' in event:
                body = json.loads(event[6:])
                if body.get("usage") is not None and body.get("choices"):
                    usage_chunk = {k: v for k, v in body.items() if k not in ("usage", "daser")}
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = body["usage"]
                    yield event
                    yield f"data: {json.dumps(usage_chunk)}\n\n"
                    continue
            yield event
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
