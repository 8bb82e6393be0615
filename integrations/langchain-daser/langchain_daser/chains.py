"""The LCEL recipe: `retriever | documents -> message | ChatDaser`, documents kept separate.

The usual recipe formats retrieved documents into one prompt string; that string is new on
every request, so nothing could be reused. Here each document becomes its own `text-plain`
content block with its exact text and id, and ChatDaser fuses their stored KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import (
    Runnable,
    RunnableLambda,
    RunnableParallel,
    RunnablePassthrough,
)

from daser_rag.errors import InvalidInputError
from langchain_daser._convert import documents_to_blocks


def documents_to_messages(inputs: dict[str, Any]) -> list[BaseMessage]:
    """`{"documents": [...], "question": str}` -> one human message: document blocks, then the question.

    `context` is accepted in place of `documents`, so this step drops into the usual recipe
    `{"context": retriever, "question": RunnablePassthrough()} | format_docs/prompt | llm`
    in place of the formatting and prompt steps.
    """
    if not isinstance(inputs, dict) or "question" not in inputs or not ({"documents", "context"} & set(inputs)):
        raise InvalidInputError("documents_to_messages expects a dict with 'documents' (or 'context') and 'question'")
    question = inputs["question"]
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError("the question must be a non-empty string")
    docs: Sequence[Document] = (inputs["documents"] if "documents" in inputs else inputs["context"]) or []
    if isinstance(docs, str):
        raise InvalidInputError("documents must be a list of langchain Documents, not one formatted string "
                                "(a string cannot be matched to cached chunk KV)")
    return [HumanMessage(content=[*documents_to_blocks(docs), {"type": "text", "text": question}])]


#: The formatting step of the recipe as a Runnable (use it between a retriever and ChatDaser).
DocumentsToMessages: Runnable[dict[str, Any], list[BaseMessage]] = RunnableLambda(
    documents_to_messages, name="DocumentsToMessages")


def create_daser_rag_chain(
    retriever: Runnable[str, list[Document]], llm: BaseChatModel, *, return_documents: bool = False
) -> Runnable[str, Any]:
    """question -> AIMessage (or `{"question", "documents", "answer"}` with `return_documents`).

    Equivalent to:
        {"documents": retriever, "question": RunnablePassthrough()} | DocumentsToMessages | llm
    """
    gather = RunnableParallel(documents=retriever, question=RunnablePassthrough())
    if return_documents:
        return (gather | RunnablePassthrough.assign(answer=DocumentsToMessages | llm)).with_config(
            run_name="daser_rag_chain")
    return (gather | DocumentsToMessages | llm).with_config(run_name="daser_rag_chain")
