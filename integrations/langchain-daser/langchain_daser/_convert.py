"""Turn LangChain inputs (messages, content blocks, Documents) into a daser request.

A daser request is a question plus an ordered list of context chunks. Documents must stay
separate chunks with their exact text, because each chunk's KV is keyed by its own tokens:
flattening them into one string would turn every request into a cache miss.

Documents reach the model in three ways, all ending up here:
- `text-plain` content blocks in a human message (LangChain's standard block for plain-text
  documents); the document id travels in the block's `id` (ids LangChain generates itself,
  `lc_...`, are ignored) or, for a reference to an already ingested document without its
  text, in `file_id`;
- the `documents=` keyword of `invoke`/`bind`;
- `documents_to_blocks`, the helper the LCEL recipe uses to build such blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.documents import Document as LCDocument
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from daser_rag.errors import InvalidInputError
from daser_rag.textcheck import check_document_text, check_text
from daser_rag.types import ChunkRef
from daser_rag.types import Document as DaserDocument

#: Metadata key under which retrieved LangChain Documents carry their daser document id.
DOC_ID_KEY = "daser_doc_id"

_GENERATED_ID_PREFIX = "lc_"  # ids LangChain generates for blocks: not document ids

Splitter = Callable[[str], list[str]]


@dataclass
class DaserRequest:
    question: str
    contexts: list[ChunkRef]


def lc_document_id(doc: LCDocument) -> str | None:
    """The daser doc id of a LangChain Document: explicit metadata first, then `Document.id`."""
    explicit = doc.metadata.get(DOC_ID_KEY) if doc.metadata else None
    if explicit:
        return str(explicit)
    return doc.id or None


def documents_to_blocks(documents: Sequence[LCDocument]) -> list[dict[str, Any]]:
    """LangChain Documents -> `text-plain` content blocks that keep exact text and ids."""
    blocks: list[dict[str, Any]] = []
    for doc in documents:
        if not isinstance(doc, LCDocument):
            raise TypeError(f"documents_to_blocks expects langchain Documents, got {type(doc).__name__}")
        block: dict[str, Any] = {"type": "text-plain", "mime_type": "text/plain", "text": doc.page_content}
        doc_id = lc_document_id(doc)
        if doc_id:
            block["id"] = doc_id
        title = (doc.metadata or {}).get("title") or (doc.metadata or {}).get("source")
        if title:
            block["title"] = str(title)
        blocks.append(block)
    return blocks


def _chunks(text: str, doc_id: str | None, split: Splitter, what: str) -> list[ChunkRef]:
    if doc_id:
        check_document_text(doc_id, text)  # the core's message for an empty / bad document
    else:
        check_text(text, what)
    # Split exactly as add_documents does, so the chunk keys match the precomputed KV.
    return [ChunkRef(text=piece, doc_id=doc_id) for piece in split(text)]


def _block_doc_id(block: dict[str, Any]) -> str | None:
    extras = block.get("extras") or {}
    if extras.get(DOC_ID_KEY):
        return str(extras[DOC_ID_KEY])
    bid = block.get("id")
    if isinstance(bid, str) and bid and not bid.startswith(_GENERATED_ID_PREFIX):
        return bid
    return None


def block_to_contexts(block: dict[str, Any], split: Splitter) -> list[ChunkRef]:
    text = block.get("text")
    doc_id = _block_doc_id(block)
    if text is None:
        ref = block.get("file_id") or doc_id
        if not ref:
            raise InvalidInputError("a text-plain block needs `text`, or a `file_id` naming an ingested document")
        return [ChunkRef(doc_id=str(ref))]  # every stored chunk of that document
    return _chunks(text, doc_id or block.get("file_id"), split, f"text-plain block {doc_id or ''}".strip())


def item_to_contexts(item: Any, split: Splitter) -> list[ChunkRef]:
    """One entry of the `documents=` keyword -> chunk refs."""
    if isinstance(item, LCDocument):
        return _chunks(item.page_content, lc_document_id(item), split, f"document {item.id or ''}".strip())
    if isinstance(item, DaserDocument):
        return _chunks(item.text, item.doc_id, split, f"document {item.doc_id}")
    if isinstance(item, ChunkRef):
        return [item]
    if isinstance(item, str):
        return _chunks(item, None, split, "a string document")
    if isinstance(item, dict) and item.get("type") == "text-plain":
        return block_to_contexts(item, split)
    raise TypeError(
        "documents= entries must be langchain Documents, daser Documents, ChunkRefs, strings or "
        f"text-plain blocks, got {type(item).__name__}"
    )


def _text_of(content: str | list[Any], split: Splitter, contexts: list[ChunkRef] | None) -> str:
    """Text parts of a message; `text-plain` blocks go to `contexts` when it is given."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") == "text-plain":
            if contexts is None:
                raise InvalidInputError("documents (text-plain blocks) are only accepted in human messages")
            contexts.extend(block_to_contexts(block, split))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidInputError(f"ChatDaser supports text and text-plain content blocks, not {kind!r}")
    return "\n".join(p for p in parts if p)


def messages_to_request(
    messages: Sequence[BaseMessage], split: Splitter, documents: Sequence[Any] | None = None
) -> DaserRequest:
    """Chat messages -> (question, contexts).

    The generator's system prompt is fixed because every chunk's KV is computed right after
    it; a per-request system message would make all stored KV unusable. So system messages
    and earlier turns are placed in front of the question instead, where they cost only
    their own tokens.
    """
    if not messages:
        raise InvalidInputError("ChatDaser needs at least one message")
    last = messages[-1]
    if not isinstance(last, HumanMessage):
        raise InvalidInputError(f"the last message must be a human message (the question), got {last.type!r}")
    contexts: list[ChunkRef] = []
    for item in documents or []:
        contexts.extend(item_to_contexts(item, split))
    preamble: list[str] = []
    history: list[str] = []
    for msg in messages[:-1]:
        if isinstance(msg, SystemMessage):
            text = _text_of(msg.content, split, None)
            if text.strip():
                preamble.append(text.strip())
        elif isinstance(msg, HumanMessage):
            text = _text_of(msg.content, split, contexts)
            if text.strip():
                history.append(f"User: {text.strip()}")
        elif isinstance(msg, AIMessage):
            text = _text_of(msg.content, split, None)
            if text.strip():
                history.append(f"Assistant: {text.strip()}")
        else:
            raise InvalidInputError(f"ChatDaser does not support {msg.type!r} messages (no tool calling)")
    question = _text_of(last.content, split, contexts).strip()
    if not question:
        raise InvalidInputError("the last human message has no question text (only documents)")
    if history:
        preamble.append("Conversation so far:\n" + "\n".join(history))
    if preamble:
        question = "\n\n".join(preamble) + "\n\n" + question
    return DaserRequest(question=question, contexts=contexts)
