"""Self-distillation of the calibration, and the held-out check that decides whether to use it.

The teacher is full prefill on the user's own documents; the student is the reuse path with
the calibration (`student.py`). Adam on the adapter's parameters only (the model's are
frozen for the run and restored after). Documents are split before any prompt is built: the
held-out prompts use only documents no training prompt used, and the calibration is accepted
only if it lowers the mean KL there (by `min_gain`, relative); otherwise the report says so and
nothing should be enabled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from daser_rag.calibration.adapter import Calibration
from daser_rag.calibration.config import CalibrationConfig as CalibrationConfig
from daser_rag.calibration.examples import ReuseExample, make_prompts, prepare, split_documents, with_selection
from daser_rag.calibration.student import example_kl
from daser_rag.calibration.token_map import TokenMapStats
from daser_rag.types import Document


@dataclass
class CalibrationReport:
    calibration: Calibration
    accepted: bool
    reason: str
    held_out_before: list[float]  # per held-out prompt, mean KL vs full prefill, no calibration
    held_out_after: list[float]
    held_out_map_only: list[float] = field(default_factory=list)  # the token map alone (empty: no map)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, batch loss, seconds)
    train_documents: list[str] = field(default_factory=list)
    held_out_documents: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kl_before(self) -> float:
        return sum(self.held_out_before) / max(1, len(self.held_out_before))

    @property
    def kl_after(self) -> float:
        return sum(self.held_out_after) / max(1, len(self.held_out_after))

    @property
    def improved_share(self) -> float:
        pairs = list(zip(self.held_out_before, self.held_out_after))
        return sum(a < b for b, a in pairs) / max(1, len(pairs))

    def summary(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "held_out_prompts": len(self.held_out_after),
                "held_out_kl_before": self.kl_before, "held_out_kl_after": self.kl_after,
                "held_out_improved_share": self.improved_share, "seconds": self.seconds,
                "train_documents": len(self.train_documents), "held_out_documents": len(self.held_out_documents),
                **({"held_out_kl_token_map_only": sum(self.held_out_map_only) / len(self.held_out_map_only)}
                   if self.held_out_map_only else {})}


class _Frozen:
    """Model parameters without gradients for the run (nothing of the model is trained)."""

    def __init__(self, model: Any) -> None:
        self.params = list(model.parameters())
        self.flags = [p.requires_grad for p in self.params]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


def mean_kls(gen: Any, examples: Sequence[ReuseExample], cal: Calibration) -> list[float]:
    with torch.no_grad():
        return [float(example_kl(gen.runner, e, cal.key_log_scale, cal.value_log_scale, cal.link, cal.key_bias,
                                 cal.value_bias, cal.kv_map)) for e in examples]


def chunks_by_document(gen: Any, documents: Sequence[Document], per_document: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in documents:
        chunks = gen.split(d.text)[:per_document]
        if chunks:
            out[d.doc_id] = chunks
    return out


@dataclass
class Prepared:
    """Training and held-out prompts, prepared once (several configs can be fitted on them)."""

    train: list[ReuseExample]
    held_out: list[ReuseExample]
    train_documents: list[str]
    held_out_documents: list[str]
    seconds: float
    token_map: TokenMapStats | None = None
    """The token map's normal equations over the training prompts (None: not accumulated)."""
    primer: tuple[tuple[int, ...], ...] = ()
    """The primers the prompts' reused chunks were computed after, averaged over (empty: none)."""

    def for_config(self, gen: Any, config: CalibrationConfig) -> Prepared:
        """The same prompts for a student fitted at `config`'s share (adds or drops the selection)."""
        t0 = time.perf_counter()
        blend = config.blend()
        train = [with_selection(gen, e, blend) for e in self.train]
        held = [with_selection(gen, e, blend) for e in self.held_out]
        return Prepared(train, held, self.train_documents, self.held_out_documents,
                        self.seconds + time.perf_counter() - t0, self.token_map, self.primer)


def choose_primer(gen: Any, specs: Sequence[Any], tokens: int, count: int = 1) -> tuple[tuple[int, ...], ...]:
    """`count` primers: the first `tokens` tokens of each of the first `count` training prompts'
    chunks, one after another (cut to one length, so a chunk sits at the same positions after
    each): text from the user's own documents (a generic paragraph measured far worse), and from
    training documents only, so the held-out check stays honest."""
    if tokens <= 0 or not specs:
        return ()
    rows = [[int(t) for c in sp.chunks for t in gen.prompt.chunk_ids(c)][:tokens] for sp in specs[:count]]
    n = min(len(r) for r in rows)
    return tuple(tuple(r[:n]) for r in rows)


def prepare_split(gen: Any, documents: Sequence[Document], config: CalibrationConfig,
                  log: Callable[[str], None] | None = None, token_map: bool | None = None) -> Prepared:
    """Split documents (train / held-out), build prompts from each side, run the teacher; with
    a token map (`token_map`, default `config.token_map`), accumulate its regression over the
    training prompts' reused tokens while the teacher's K/V are at hand."""
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    by_doc = chunks_by_document(gen, documents, config.chunks_per_document)
    if len(by_doc) < 2:
        raise ValueError("calibration needs at least 2 documents (some are held out to check it)")
    train_ids, held_ids = split_documents(list(by_doc), config.held_out_share, config.seed)
    train_specs = make_prompts({d: by_doc[d] for d in train_ids}, config.train_prompts, config.chunks_per_prompt,
                               config.seed)
    held_specs = make_prompts({d: by_doc[d] for d in held_ids}, config.held_out_prompts, config.chunks_per_prompt,
                              config.seed + 1)
    say(f"{len(train_ids)} training / {len(held_ids)} held-out documents; preparing "
        f"{len(train_specs)} + {len(held_specs)} prompts (teacher: full prefill)")
    blend = config.blend()
    spec = gen.runner.spec
    stats = (TokenMapStats.empty(spec.num_layers, spec.num_kv_heads, spec.head_dim)
             if (config.token_map if token_map is None else token_map) else None)
    primer = choose_primer(gen, train_specs, config.primer_tokens, config.primers)
    if primer:
        say(f"reused chunks computed after {len(primer)} x {len(primer[0])}-token primer(s) from the training "
            "documents" + (" (K/V averaged)" if len(primer) > 1 else ""))
    train = [prepare(gen, s, answer_tokens=config.answer_tokens, loss_question_tokens=config.loss_question_tokens,
                     blend=blend, token_map_stats=stats, primer=primer) for s in train_specs]
    held = [prepare(gen, s, answer_tokens=config.answer_tokens, loss_question_tokens=config.loss_question_tokens,
                    blend=blend, primer=primer, baseline=True) for s in held_specs]
    say(f"prepared in {time.perf_counter() - t0:.0f} s")
    return Prepared(train, held, train_ids, held_ids, time.perf_counter() - t0, stats, primer)


def fit(gen: Any, data: Prepared, config: CalibrationConfig,
        log: Callable[[str], None] | None = None) -> CalibrationReport:
    """Adam on the calibration's parameters over `data.train`; judged on `data.held_out`."""
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    runner = gen.runner
    spec = runner.spec
    train, held = data.train, data.held_out
    newline = gen.prompt.encode("\n\n")[:1] or [0]
    with torch.no_grad():
        init = runner.embed(torch.tensor(newline)).detach()[0]
    cal = Calibration.identity(gen.fingerprint, spec.num_layers, spec.num_kv_heads, spec.hidden_size,
                               config.link_tokens, init, head_dim=runner.head_dim if config.biases else 0)
    cal.fit_share = config.fit_share
    map_only: list[float] = []
    before = mean_kls(gen, [e.baseline or e for e in held], cal.without_link())  # what the store serves uncalibrated
    primer = None
    if data.primer:  # one primer is stored [P] (the format older files have), an ensemble [K, P]
        primer = torch.tensor(data.primer if len(data.primer) > 1 else data.primer[0], dtype=torch.int64)
    cal.primer = primer
    if primer is not None and not config.token_map:
        map_only = mean_kls(gen, held, cal.map_only())
        say(f"{len(data.primer)} x {len(data.primer[0])}-token primer: held-out mean KL {sum(before) / len(before):.4f} -> "
            f"{sum(map_only) / len(map_only):.4f} (primer alone)")
    kv_map = None
    if config.token_map:
        if data.token_map is None:
            raise ValueError("a token map needs the prompts prepared with its regression (prepare_split(token_map=True))")
        kv_map = data.token_map.solve(config.token_map_ridge)
        cal.kv_map = kv_map
        map_only = mean_kls(gen, held, cal.map_only())
        say(f"token map fitted on {data.token_map.rows} reused tokens: held-out mean KL "
            f"{sum(before) / len(before):.4f} -> {sum(map_only) / len(map_only):.4f} (map alone)")
    ks = cal.key_log_scale.clone().requires_grad_(bool(config.scales))
    vs = cal.value_log_scale.clone().requires_grad_(bool(config.scales))
    link = cal.link.clone().requires_grad_(bool(config.link_tokens))
    kb = None if cal.key_bias is None else cal.key_bias.clone().requires_grad_(True)
    vb = None if cal.value_bias is None else cal.value_bias.clone().requires_grad_(True)
    groups: list[dict[str, Any]] = []
    if config.scales:
        groups.append({"params": [ks, vs], "lr": config.lr_scale})
    if kb is not None and vb is not None:
        groups.append({"params": [kb, vb], "lr": config.lr_bias})
    if config.link_tokens:
        groups.append({"params": [link], "lr": config.lr_link})
    rng = random.Random(config.seed)
    curve: list[tuple[int, float, float]] = []
    opt = torch.optim.Adam(groups) if groups else None
    with _Frozen(gen.lm.hf_model), torch.enable_grad():
        for step in range(config.steps if opt is not None else 0):
            assert opt is not None
            batch = rng.sample(train, min(config.batch, len(train)))
            opt.zero_grad()
            total = 0.0
            for e in batch:  # one graph at a time: an r > 0 student holds ~1 GB of activations
                loss = example_kl(runner, e, ks, vs, link, kb, vb, kv_map) / len(batch)
                loss.backward()  # type: ignore[no-untyped-call]
                total += float(loss.detach())
            opt.step()
            curve.append((step, total, time.perf_counter() - t0))
            if step % 10 == 9 or step == config.steps - 1:
                say(f"step {step + 1}/{config.steps}: batch KL {curve[-1][1]:.4f} ({curve[-1][2]:.0f} s)")
    trained = Calibration(gen.fingerprint, ks.detach().clone(), vs.detach().clone(), link.detach().clone(),
                          fit_share=config.fit_share, key_bias=None if kb is None else kb.detach().clone(),
                          value_bias=None if vb is None else vb.detach().clone(), kv_map=kv_map, primer=primer)
    after = mean_kls(gen, held, trained) if groups else map_only
    kept = ""
    if groups and map_only and not config.link_tokens and sum(map_only) <= sum(after):
        # the KL stage on top of the map overfits the training prompts (measured, config.py): keep the map alone
        kept = (f"; scales/biases fitted on top of the token map did not beat the map alone there "
                f"({sum(after) / len(after):.4f}): the map alone is kept")
        trained, after = trained.map_only(), map_only
    kl_b, kl_a = sum(before) / len(before), sum(after) / len(after)
    accepted = kl_a < kl_b * (1.0 - config.min_gain)
    reason = (f"held-out mean KL {kl_b:.4f} -> {kl_a:.4f} on {len(held)} prompts from {len(data.held_out_documents)} documents "
              f"it never trained on") + kept
    reason += "" if accepted else f": not {config.min_gain:.0%} better, refused"
    report = CalibrationReport(trained, accepted, reason, before, after, map_only, curve, data.train_documents,
                               data.held_out_documents, time.perf_counter() - t0 + data.seconds)
    trained.meta = {"config": config.__dict__, **report.summary()}
    say(reason)
    return report


def calibrate(gen: Any, documents: Sequence[Document], config: CalibrationConfig = CalibrationConfig(),
              log: Callable[[str], None] | None = None) -> CalibrationReport:
    """Train a calibration for `gen`'s model on `documents`; check it on held-out documents."""
    return fit(gen, prepare_split(gen, documents, config, log), config, log)
