"""A real corpus every Python has: the Language Reference topics in `pydoc_data.topics`.

Used by the demo, the benchmarks and the tests, so nothing is downloaded. Topic texts vary a
little across Python versions; the QA set below asks about facts stable across 3.10-3.13.
"""

from __future__ import annotations

from dataclasses import dataclass

from daser_rag.errors import InvalidInputError
from daser_rag.types import Document


class UnknownTopicError(InvalidInputError, KeyError):
    """A pydoc topic name that this Python does not have (a KeyError for old callers; its
    message prints without the quotes KeyError adds)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


DEMO_TOPICS = (
    "pass", "break", "continue", "del", "return", "global", "nonlocal", "assert",
    "if", "while", "lambda", "yield", "else", "truth", "bltin-null-object", "bltin-ellipsis-object",
)


def python_reference_corpus(topics: tuple[str, ...] | list[str] | None = None) -> list[Document]:
    import pydoc_data.topics as t

    names = sorted(t.topics) if topics is None else list(topics)
    missing = [n for n in names if n not in t.topics]
    if missing:
        sample = ", ".join(sorted(t.topics)[:8])
        raise UnknownTopicError(f"unknown pydoc topic(s): {', '.join(missing)} (this Python has {len(t.topics)}, "
                                f"e.g. {sample}; or pass 'all')")
    return [Document(doc_id=f"pyref:{n}", text=t.topics[n].strip(), metadata={"topic": n, "source": "pydoc_data"})
            for n in names]


@dataclass(frozen=True)
class QAItem:
    question: str
    doc_ids: tuple[str, ...]
    answers: tuple[str, ...]  # any of these (case-insensitive substrings) counts as correct


QA_SET: tuple[QAItem, ...] = (
    QAItem("What happens when a pass statement is executed?",
           ("pyref:break", "pyref:continue", "pyref:pass"), ("nothing",)),
    QAItem("Which loop does a break statement terminate?",
           ("pyref:continue", "pyref:while", "pyref:break"), ("nearest enclosing", "enclosing loop", "innermost")),
    QAItem("What does deleting a name with del do?",
           ("pyref:global", "pyref:pass", "pyref:del"), ("binding", "unbind", "removes")),
    QAItem("What exception does a failing assert statement raise?",
           ("pyref:if", "pyref:del", "pyref:assert"), ("AssertionError",)),
    QAItem("What value does return give when no expression list is present?",
           ("pyref:yield", "pyref:lambda", "pyref:return"), ("None",)),
    QAItem("Which statement makes listed identifiers refer to variables in the nearest enclosing function scope?",
           ("pyref:global", "pyref:del", "pyref:nonlocal"), ("nonlocal",)),
    QAItem("What is the single object of type NoneType called?",
           ("pyref:bltin-ellipsis-object", "pyref:truth", "pyref:bltin-null-object"), ("None",)),
    QAItem("How is the Ellipsis object written as a literal?",
           ("pyref:bltin-null-object", "pyref:pass", "pyref:bltin-ellipsis-object"), ("...", "Ellipsis")),
)

# More multi-document questions for the benchmark's QA accuracy table (benchmarks/quality.py).
# Each answer string occurs verbatim in the answer document's pydoc text (tests check this).
QA_EXTRA: tuple[QAItem, ...] = (
    QAItem("What kind of functions do lambda expressions create?",
           ("pyref:yield", "pyref:lambda", "pyref:return"), ("anonymous",)),
    QAItem("What does using yield in a function definition turn that function into?",
           ("pyref:lambda", "pyref:yield", "pyref:return"), ("generator",)),
    QAItem("Where does a continue statement continue?",
           ("pyref:continue", "pyref:break", "pyref:while"), ("next cycle", "next iteration")),
    QAItem("Which exception is raised when raise is used without an expression and no exception is active?",
           ("pyref:raise", "pyref:assert", "pyref:exceptions"), ("RuntimeError",)),
    QAItem("Which keyword adds further conditions to an if statement?",
           ("pyref:while", "pyref:if", "pyref:truth"), ("elif",)),
    QAItem("Which context manager method is invoked when a with statement starts?",
           ("pyref:exceptions", "pyref:pass", "pyref:with"), ("__enter__",)),
    QAItem("What kind of object must the expression list of a for statement yield?",
           ("pyref:for", "pyref:while", "pyref:continue"), ("iterable",)),
    QAItem("Which clause of a try statement runs cleanup code whether or not an exception occurred?",
           ("pyref:raise", "pyref:exceptions", "pyref:return"), ("finally",)),
)
QA_BENCH: tuple[QAItem, ...] = QA_SET + QA_EXTRA


def demo_topics() -> list[str]:
    """The topics `daser-rag demo` ingests: every document its questions use, plus DEMO_TOPICS
    (the README states this count; a test keeps them equal)."""
    return sorted({d.split(":", 1)[1] for qa in QA_BENCH for d in qa.doc_ids} | set(DEMO_TOPICS))
