"""Fidelity of cached generation against full prefill, measured, not assumed.

For each prompt, full prefill greedily produces a short continuation; every mode under test
is then teacher-forced along the *same* tokens, and at each step we compare its next-token
distribution with full prefill's: top-1 agreement and KL(full || mode).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from daser_rag.corpus import QA_SET, python_reference_corpus
from daser_rag.engine.decode import decode_n_tokens
from daser_rag.types import Document


CLOSE_MARGIN = 0.1
"""A step is *close* when full prefill's two most likely tokens are within this much probability:
there a small change of the distribution flips top-1 while KL barely moves, which is why top-1
agreement lags KL (counted by `Fidelity.close`)."""


def is_close(ref_logits: torch.Tensor, margin: float = CLOSE_MARGIN) -> bool:
    """Whether full prefill's top two next tokens are within `margin` probability."""
    top = torch.softmax(ref_logits.float().reshape(-1), -1).topk(2).values
    return float(top[0] - top[1]) < margin


@dataclass
class Fidelity:
    agree: int = 0
    total: int = 0
    kl_sum: float = 0.0
    first_token_agree: int = 0
    prompts: int = 0
    per_prompt_kl: list[float] = field(default_factory=list)
    close: int = 0
    """Steps where full prefill's top two tokens were within `CLOSE_MARGIN` (`is_close`)."""
    close_agree: int = 0
    """Of those, the steps whose top-1 agreed."""

    @property
    def top1(self) -> float:
        return self.agree / self.total if self.total else 0.0

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"top1_agreement": self.top1, "mean_kl": self.mean_kl, "steps": self.total,
                "first_token_agreement": self.first_token_agree / self.prompts if self.prompts else 0.0}


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.float().reshape(-1), -1)
    q = torch.log_softmax(q_logits.float().reshape(-1), -1)
    return float((p.exp() * (p - q)).sum().clamp_min(0.0))


def _continuation_logits(gen: Any, fused: Any, tokens: Sequence[int] | None, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy (tokens=None) or teacher-forced continuation: the tokens and each step's logits."""
    pairs = list(decode_n_tokens(gen.runner, fused.cache, fused.logits[-1], steps, forced=tokens))
    return [t for t, _ in pairs], [lg for _, lg in pairs]


def measure_fidelity(
    gen: Any,
    prompts: Sequence[tuple[str, Sequence[Any]]],
    ratios: Sequence[float],
    *,
    steps: int = 8,
    selector: str | None = None,
) -> dict[float, Fidelity]:
    """Teacher-forced agreement with full prefill at each recompute share (`selector`: None is
    the generator's default)."""
    results = {r: Fidelity() for r in ratios}
    for question, contexts in prompts:
        full, _ = gen.prefill(question, contexts, use_cache=False, extra_capacity=steps)
        ref_tokens, ref_logits = _continuation_logits(gen, full, None, steps)
        for r in ratios:
            # blending itself: the same prompt at every ratio would otherwise become exact tree nodes
            fused, _ = gen.prefill(question, contexts, recompute_ratio=r, selector=selector, extra_capacity=steps,
                                   prefix_tree=False)
            _, logits = _continuation_logits(gen, fused, ref_tokens, steps)
            f = results[r]
            f.prompts += 1
            f.first_token_agree += int(int(torch.argmax(logits[0])) == ref_tokens[0])
            kls = []
            for ref_l, got, tok in zip(ref_logits, logits, ref_tokens):
                f.total += 1
                f.agree += int(int(torch.argmax(got)) == tok)
                kls.append(kl_divergence(ref_l, got))
            f.kl_sum += sum(kls)
            f.per_prompt_kl.append(sum(kls) / len(kls))
    return results


GENERIC_QUESTIONS = (
    "Summarize what these documents say in one sentence.",
    "Which statement is described first, and what does it do?",
    "What do these statements have in common?",
    "Explain the last document briefly.",
    "Which keyword is mentioned most often?",
)


def fidelity_prompts(
    gen: Any, n: int = 20, chunks_per_prompt: int = 4, seed: int = 0, docs: Sequence[Document] | None = None
) -> list[tuple[str, list[str]]]:
    """Multi-chunk prompts from the real corpus: QA-set prompts first, then random mixes."""
    rng = random.Random(seed)
    docs = list(docs) if docs is not None else python_reference_corpus()
    by_id = {d.doc_id: d for d in docs}
    chunk_pool = [c for d in docs for c in gen.split(d.text)]
    prompts: list[tuple[str, list[str]]] = []
    for qa in QA_SET:
        if len(prompts) >= n:
            break
        if all(i in by_id for i in qa.doc_ids):
            prompts.append((qa.question, [gen.split(by_id[i].text)[0] for i in qa.doc_ids]))
    while len(prompts) < n:
        prompts.append((rng.choice(GENERIC_QUESTIONS), rng.sample(chunk_pool, chunks_per_prompt)))
    return prompts
