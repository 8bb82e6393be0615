"""Answer quality against full prefill: ROUGE-L, exact match, QA accuracy.

Full prefill is the reference for every cached mode: a cache is good when it changes
nothing. Two views:

- teacher-forced next-token agreement and KL (daser_rag.evaluation's Fidelity), which is
  sensitive and needs no judgement;
- the 32-token greedy answers themselves: ROUGE-L F1 and exact match against full
  prefill's answer, and, for questions with a known answer, whether the answer is there.

`daser-rag bench quality` runs the suite's QA trace without the scaling sweeps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from daser_rag.corpus import QAItem

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercase word tokens. Two empty texts agree (1.0)."""
    c, r = words(candidate), words(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(candidate: str, reference: str) -> bool:
    """Same answer text up to whitespace."""
    return normalize(candidate) == normalize(reference)


def answer_correct(answer: str, item: QAItem) -> bool:
    """Any of the known answers occurs in the answer (case-insensitive), as in the demo."""
    low = answer.lower()
    return any(a.lower() in low for a in item.answers)


def format_qa_table(questions: Sequence[str], correct: dict[str, list[bool]], width: int = 60) -> str:
    """Question x mode grid of hits, with per-mode accuracy underneath."""
    modes = list(correct)
    head = f"{'question':<{width}}" + "".join(f"{m:>{max(len(m), 5) + 2}}" for m in modes)
    lines = [head]
    for i, q in enumerate(questions):
        qs = q if len(q) <= width - 1 else q[: width - 4] + "..."
        lines.append(f"{qs:<{width}}" + "".join(
            f"{('yes' if correct[m][i] else '-'):>{max(len(m), 5) + 2}}" for m in modes))
    lines.append(f"{'accuracy':<{width}}" + "".join(
        f"{sum(correct[m]) / max(len(correct[m]), 1):>{max(len(m), 5) + 2}.0%}" for m in modes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks import suite

    suite.main(["--no-scaling", *(argv or [])])


if __name__ == "__main__":
    main()
