"""Training and held-out prompts from the user's own documents, with full prefill as teacher.

A prompt is a few chunks in a random order and a question that needs no labels: a cloze
sentence from one of its chunks (a word blanked out) or a generic one. Documents are split
into a training part and a held-out part by document, so the held-out check measures
documents the calibration never saw. For each prompt we keep what the reuse path needs and
what it is held to:

* the r = 0 context buffer (system prefix and first chunk exact, the other chunks computed
  after the prefix alone and re-rotated to their places: exactly what serving's `fuse` builds),
  and which positions are reused;
* when fitted for r > 0, the context positions `fuse` recomputes at that share (its selection
  over the uncalibrated buffer), which the student recomputes again, differentiably, so the
  calibration learns what the stale tokens should look like *next to* repaired ones;
* the tail fed after it: question tokens plus full prefill's greedy answer (teacher-forced);
* full prefill's log-probabilities at the last question tokens and along the answer.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from daser_rag.blend.config import BlendConfig
from daser_rag.blend.fusion import _LayerFiller, fuse
from daser_rag.calibration.token_map import TokenMapStats
from daser_rag.engine.decode import decode_n_tokens
from daser_rag.evaluation import GENERIC_QUESTIONS
from daser_rag.kv.chunk_kv import ChunkKV

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{5,}")


@dataclass(frozen=True)
class PromptSpec:
    question: str
    chunks: tuple[str, ...]


@dataclass
class ReuseExample:
    """One prompt prepared for distillation (tensors are ordinary, autograd-usable ones)."""

    keys: list[torch.Tensor]  # per layer [kvH, C, D]: the r=0 buffer's context keys
    values: list[torch.Tensor]
    reused: torch.Tensor  # [C] bool: reused (stale) positions, the ones calibration may scale
    tail_ids: torch.Tensor  # [T] question ids + teacher answer ids (all but the last)
    teacher_logp: torch.Tensor  # [n, vocab] full prefill's log-probs at the last n tail positions
    answer_ids: list[int]  # teacher's greedy answer
    context_ids: torch.Tensor | None = None  # [C] the context's token ids (needed when `selected` is not empty)
    selected: torch.Tensor | None = None  # sorted context positions recomputed at the fitted share
    spec: PromptSpec | None = None  # the prompt it was prepared from
    primer: tuple[tuple[int, ...], ...] = ()  # the primers its reused chunks were computed after (empty: none)
    baseline: ReuseExample | None = None
    """With a primer: the same prompt with chunks as the store holds them uncalibrated (computed
    after the system prefix alone), what the held-out check's "before" is measured on."""

    @property
    def recomputed(self) -> int:
        return 0 if self.selected is None else int(self.selected.shape[0])

    @property
    def context_tokens(self) -> int:
        return int(self.reused.shape[0])


def split_documents(doc_ids: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) document ids; at least one of each when there are two or more."""
    ids = sorted(doc_ids)
    random.Random(seed).shuffle(ids)
    n_hold = max(1, round(held_out * len(ids))) if len(ids) > 1 else 0
    return ids[n_hold:], ids[:n_hold]


def _cloze(rng: random.Random, chunk: str) -> str | None:
    flat = re.sub(r"\s+", " ", chunk)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", flat) if 8 <= len(s.split()) <= 32]
    rng.shuffle(sentences)
    for s in sentences:
        words = [w for w in _WORD.findall(s) if s.count(w) == 1]
        if words:
            w = rng.choice(words)
            return f'Fill in the blank with the missing word, as written in the documents: "{s.replace(w, "____", 1)}"'
    return None


def make_prompts(chunks_by_doc: dict[str, list[str]], n: int, chunks_per_prompt: int, seed: int) -> list[PromptSpec]:
    """n prompts, each `chunks_per_prompt` chunks of distinct documents in a random order; the
    question is a cloze of one of them (generic when no sentence fits), often about the last."""
    rng = random.Random(seed)
    docs = sorted(d for d, cs in chunks_by_doc.items() if cs)
    if not docs:
        return []
    k = max(1, min(chunks_per_prompt, len(docs)))
    out: list[PromptSpec] = []
    for i in range(n):
        picked = rng.sample(docs, k)
        chunks = tuple(rng.choice(chunks_by_doc[d]) for d in picked)
        target = chunks[-1] if i % 2 == 0 else rng.choice(chunks)
        q = _cloze(rng, target) if i % 4 != 3 else None
        out.append(PromptSpec(q or rng.choice(GENERIC_QUESTIONS), chunks))
    return out


@torch.inference_mode()
def _teacher(gen: Any, ctx_ids: list[int], q_ids: list[int], answer_tokens: int,
             loss_question_tokens: int) -> tuple[list[int], torch.Tensor, Any]:
    """Full prefill's greedy answer, its log-probabilities along the loss positions, and its
    cache (the context's K/V are what the token map is fitted to)."""
    runner = gen.runner
    cache = runner.new_cache(len(ctx_ids) + len(q_ids) + answer_tokens)
    runner.forward(torch.tensor(ctx_ids), 0, cache)
    q_logits = runner.forward(torch.tensor(q_ids), len(ctx_ids), cache, all_logits=True)
    pairs = list(decode_n_tokens(runner, cache, q_logits[-1], answer_tokens))
    answer = [t for t, _ in pairs]
    rows = [q_logits[-min(loss_question_tokens, len(q_ids)):-1]] if loss_question_tokens > 1 else []
    rows.append(torch.stack([lg.reshape(-1) for _, lg in pairs]))
    logits = torch.cat(rows)
    return answer, torch.log_softmax(logits.float(), -1).to(torch.float16), cache


@torch.inference_mode()
def add_token_map_rows(gen: Any, stats: TokenMapStats, teacher: Any, keys: list[torch.Tensor],
                       values: list[torch.Tensor], reused: torch.Tensor) -> None:
    """One prompt's reused tokens into the token map's normal equations: its r = 0 buffer
    (stale K/V) against full prefill's K/V at the same positions."""
    runner = gen.runner
    rows = reused.nonzero().squeeze(1).to(runner.device)
    if rows.numel() == 0:
        return
    cos, sin = runner.rope(rows)
    cos, sin = cos.float(), sin.float()
    for i in range(runner.spec.num_layers):
        stats.add(i, keys[i][:, rows], values[i][:, rows], teacher.keys[i][:, rows], teacher.values[i][:, rows],
                  cos, sin)


def exact_length(segments: list[ChunkKV]) -> int:
    """What serving treats as exact (engine/assemble.py): the system prefix and the first chunk,
    which was computed right after it, at its place. Neither is scaled nor a recompute candidate,
    so neither is in training."""
    return segments[0].num_tokens + (segments[1].num_tokens if len(segments) > 1 else 0)


def _segments(gen: Any, chunk_ids: list[list[int]], primer: Sequence[Sequence[int]] = ()) -> list[ChunkKV]:
    """The system prefix and each chunk computed after it alone: what the store would hold; with
    primers, the chunks after the first (the exact one) computed after [prefix, primer] (averaged
    over the primers), as a calibration with them reads them (`premap.py`)."""
    prefix: ChunkKV = gen.computer.prefix()
    out = [prefix]
    for i, ids in enumerate(chunk_ids):
        if primer and i > 0:
            out.append(gen.computer.compute_primed(ids, f"calibration:{i}", primer))
        else:
            out.append(gen.computer.compute(ids, f"calibration:{i}"))
    return out


@torch.inference_mode()
def _reuse_buffer(gen: Any, segs: list[ChunkKV]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    runner = gen.runner
    filler = _LayerFiller(runner, segs)
    cache = runner.new_cache(filler.length)
    filler.cache = cache
    filler.fill_all()
    n = filler.length
    keys = [cache.keys[i][:, :n].clone() for i in range(runner.spec.num_layers)]
    values = [cache.values[i][:, :n].clone() for i in range(runner.spec.num_layers)]
    reused = torch.zeros(n, dtype=torch.bool)
    reused[exact_length(segs):] = True
    return keys, values, reused


@torch.inference_mode()
def _selection(gen: Any, segs: list[ChunkKV], q_ids: list[int], blend: BlendConfig) -> torch.Tensor:
    """The context positions `fuse` recomputes for this prompt at `blend`, uncalibrated."""
    res = fuse(gen.runner, segs, torch.tensor(q_ids), exact_len=exact_length(segs), config=blend)
    pos = res.recomputed_positions
    return torch.zeros(0, dtype=torch.long) if pos is None else pos.to(torch.long)


def prepare(gen: Any, spec: PromptSpec, *, answer_tokens: int = 8, loss_question_tokens: int = 4,
            blend: BlendConfig | None = None, token_map_stats: TokenMapStats | None = None,
            primer: Sequence[Sequence[int]] = (), baseline: bool = False) -> ReuseExample:
    """The teacher's targets and the r = 0 buffer for one prompt; with `blend` (r > 0), also
    the positions that selection recomputes, for a student that repairs them as serving does;
    with `token_map_stats`, its reused tokens are added to the token map's regression; with a
    `primer`, the reused chunks are computed after it (and with `baseline`, the unprimed prompt
    is kept too, for the held-out check's "before")."""
    chunk_ids = [list(gen.prompt.chunk_ids(c)) for c in spec.chunks]
    q_ids = list(gen.prompt.query_ids(spec.question))
    ctx_ids = list(gen.prompt.prefix_ids) + [i for ids in chunk_ids for i in ids]
    answer, logp, teacher = _teacher(gen, ctx_ids, q_ids, answer_tokens, loss_question_tokens)
    tail = torch.tensor(q_ids + answer[:-1], dtype=torch.long)

    def example(p: Sequence[Sequence[int]], stats: TokenMapStats | None) -> ReuseExample:
        segs = _segments(gen, chunk_ids, p)  # computed once: the buffer and the selection read the same KV
        keys, values, reused = _reuse_buffer(gen, segs)
        if stats is not None:
            add_token_map_rows(gen, stats, teacher, keys, values, reused)
        selected = _selection(gen, segs, q_ids, blend) if blend is not None else None
        # inference tensors cannot be saved for backward: plain copies
        return ReuseExample([k.clone() for k in keys], [v.clone() for v in values], reused.clone(), tail,
                            logp.clone(), answer, torch.tensor(ctx_ids, dtype=torch.long),
                            None if selected is None else selected.clone(), spec,
                            tuple(tuple(int(i) for i in r) for r in p))

    ex = example(primer, token_map_stats)
    if primer and baseline:
        ex.baseline = example((), None)
    return ex


def with_selection(gen: Any, ex: ReuseExample, blend: BlendConfig | None) -> ReuseExample:
    """`ex` for a student fitted at `blend` (None: r = 0); the teacher and buffer are reused."""
    base = None if ex.baseline is None else with_selection(gen, ex.baseline, blend)
    if blend is None or ex.spec is None:
        return dataclasses.replace(ex, selected=None, baseline=base) if blend is None else ex
    chunk_ids = [list(gen.prompt.chunk_ids(c)) for c in ex.spec.chunks]
    q_ids = list(gen.prompt.query_ids(ex.spec.question))
    return dataclasses.replace(ex, selected=_selection(gen, _segments(gen, chunk_ids, ex.primer), q_ids,
                                                       blend).clone(), baseline=base)
