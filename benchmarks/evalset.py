"""A held-out multi-document QA set from a corpus every Python ships: stdlib docstrings.

The demo, the tests' tuning prompts and the first benchmarks use the Language Reference
(`pydoc_data.topics`); selection was tuned there. This set is built from different text (module,
class and function docstrings of the standard library) so fidelity is judged on text the code
was not tuned on.

Questions are cloze items: a sentence of the answer document with one distinctive word blanked
out. The word occurs in the answer document's chunk and in none of the distractors, so a
substring check on the answer is meaningful. Each question has 3 distractor documents; the
answer document is placed first, in the middle, or last (cycling), so position effects show.
"""

from __future__ import annotations

import importlib
import random
import re
import sys
import warnings
from dataclasses import dataclass

_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "lib2to3",
         "pydoc_data", "pydoc", "test", "unittest", "distutils"}
_STOP = set("""about above after again against all also although always among another any are because been
before being below between both cannot could does doing down during each either else every from further
have having here however into itself just like made make many might more most must never only other
otherwise over same should since some still such than that their them then there these they this those
through under until upon very were what when where whether which while will with within without would your
which returns return value values default argument arguments object objects function functions method methods
string strings number numbers given called class module""".split())
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{4,}")


@dataclass(frozen=True)
class EvalItem:
    question: str
    chunks: tuple[str, ...]  # in prompt order
    answer_index: int  # which chunk holds the answer
    answers: tuple[str, ...]
    doc_ids: tuple[str, ...]

    @property
    def position(self) -> str:
        if self.answer_index == 0:
            return "first"
        return "last" if self.answer_index == len(self.chunks) - 1 else "middle"


def stdlib_documents(min_chars: int = 700) -> dict[str, str]:
    """doc id -> docstring, for stdlib modules (and their public classes/functions) with long docs."""
    docs: dict[str, str] = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            with warnings.catch_warnings():  # deprecated modules warn on import; they are only read
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # platform-specific or missing modules
            continue
        text = getattr(mod, "__doc__", None)
        if isinstance(text, str) and len(text) >= min_chars:
            docs[f"stdlib:{name}"] = text.strip()
        for attr in sorted(getattr(mod, "__all__", None) or []):
            obj = getattr(mod, attr, None)
            d = getattr(obj, "__doc__", None)
            if (isinstance(d, str) and len(d) >= min_chars and getattr(obj, "__module__", None) == name
                    and d.strip() not in docs.values()):
                docs[f"stdlib:{name}.{attr}"] = d.strip()
    return docs


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 8 <= len(s.split()) <= 32]


def build_evalset(split: callable, n: int = 120, seed: int = 0, distractors: int = 3) -> list[EvalItem]:
    """`split(text)` -> chunks (the generator's splitter); each document contributes its first chunk."""
    rng = random.Random(seed)
    docs = stdlib_documents()
    chunks = {d: split(t)[0] for d, t in docs.items() if split(t)}
    ids = sorted(chunks)
    vocab = {d: {w.lower() for w in _WORD.findall(c)} for d, c in chunks.items()}
    items: list[EvalItem] = []
    positions = (0, 1, distractors)  # first, a middle slot, last
    order = ids[:]
    rng.shuffle(order)
    attempts = 0
    while len(items) < n and attempts < 50 * n:
        doc = order[attempts % len(order)]
        attempts += 1
        others = rng.sample([d for d in ids if d != doc], distractors)
        other_vocab = set().union(*(vocab[o] for o in others))
        cands = []
        for s in _sentences(chunks[doc]):
            for w in _WORD.findall(s):
                lw = w.lower()
                if lw in _STOP or lw in other_vocab or s.count(w) != 1:
                    continue
                cands.append((s, w))
        if not cands:
            continue
        sentence, word = rng.choice(cands)
        blanked = sentence.replace(word, "____", 1)
        question = f'Fill in the blank with the missing word, as written in the documents: "{blanked}"'
        slot = positions[len(items) % len(positions)]
        prompt_docs = others[:slot] + [doc] + others[slot:]
        items.append(EvalItem(question, tuple(chunks[d] for d in prompt_docs), slot, (word,), tuple(prompt_docs)))
    return items
