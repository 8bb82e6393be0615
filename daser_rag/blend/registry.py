"""The selector registry: one object per way of choosing the tokens to recompute.

A `Selector` declares the signals it needs and how it turns them into one ranking score
per candidate token. Everything else reads the declaration instead of switching on the
name: `GenerationParams` and `BlendConfig` validate against the registry, daser's fusion
gathers exactly the declared signals (a look-ahead pass for `RELEVANCE`, a check-layer pass
for `DEVIATION`), and the vLLM connector runs in-engine every selector whose signals its
worker can gather (`selectors_using_only`). Adding a selector is one `register_selector`
call, in this file for a built-in one (the `POLICIES` dict in daser_rag/kv/policies.py is the
pattern).

An adaptive budget (`recompute_ratio="auto"`) is the same idea for *how many* tokens: an
`AdaptiveBudget` declares its signals and computes a share per request.

This module imports no torch at import time: `daser_rag.params` (and through it the CLI and
the HTTP client) validates names against the registry and must stay light. The scoring
functions import torch when they run, by which time fusion has loaded it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

from daser_rag.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from daser_rag.blend.config import BlendConfig

__all__ = [
    "ADAPTIVE_BUDGETS", "SELECTOR_REGISTRY", "AdaptiveBudget", "NameView", "Selector", "Signal", "Signals",
    "adaptive_budget_names", "auto_share", "get_adaptive_budget", "get_selector", "register_adaptive_budget",
    "register_selector", "selector_names", "selectors_using_only", "unregister_selector",
]


class Signal(str, enum.Enum):
    """A per-candidate measurement fusion can gather before choosing tokens.

    Each has a cost, which is why a selector declares what it needs and fusion gathers only that.
    """

    RELEVANCE = "relevance"
    """The question's attention over the re-positioned stored KV (one look-ahead pass of the
    question, about the cost of the question itself). `Signals.relevance`, sums to 1."""
    DEVIATION = "deviation"
    """K/V deviation of each candidate at the check layer: every candidate is recomputed up to
    it and the choice is made there (CacheBlend). `Signals.deviation`."""
    CHUNK_STARTS = "chunk_starts"
    """Where each non-exact chunk starts among the candidates (free). `Signals.chunk_starts`."""


@dataclass
class Signals:
    """What fusion gathered for one request; a field is None when no one asked for it."""

    num_candidates: int
    relevance: torch.Tensor | None = None  # [n] question attention, normalized to sum 1
    deviation: torch.Tensor | None = None  # [n] K/V deviation at the check layer
    chunk_starts: list[int] = field(default_factory=list)  # candidate index of each non-exact chunk's start


ScoreFn = Callable[["Signals", "BlendConfig"], "torch.Tensor"]
"""(signals, config) -> [num_candidates] float scores; the highest are recomputed."""
ShareFn = Callable[["Signals", "BlendConfig"], float]
"""(signals, config) -> the share of candidates to recompute for this request, in [0, 1]."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


@dataclass(frozen=True)
class Selector:
    """One way to rank candidate tokens for recompute.

    `signals` is a promise both ways: fusion gathers these (and may skip the rest), and `score`
    reads only these fields of `Signals` (plus `config`, e.g. its seed).
    """

    name: str
    signals: frozenset[Signal]
    score: ScoreFn
    doc: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"selector name must match {_NAME.pattern!r}, got {self.name!r}")
        object.__setattr__(self, "signals", frozenset(Signal(s) for s in self.signals))
        if not callable(self.score):
            raise TypeError(f"selector {self.name!r}: score must be callable")

    def needs(self, signal: Signal) -> bool:
        return signal in self.signals


@dataclass(frozen=True)
class AdaptiveBudget:
    """A named `recompute_ratio` that picks the share per request from the signals."""

    name: str
    signals: frozenset[Signal]
    share: ShareFn
    may_be_zero: Callable[[BlendConfig], bool]
    """Whether `share` can come out as 0 under this config: fusion then keeps the look-ahead's
    logits (the r = 0 answer) instead of stopping the look-ahead early."""
    doc: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"budget name must match {_NAME.pattern!r}, got {self.name!r}")
        object.__setattr__(self, "signals", frozenset(Signal(s) for s in self.signals))


class NameView(Sequence[str]):
    """A live, read-only tuple-like view of a registry's names (optionally filtered).

    `params.SELECTORS` is one: a selector registered later is in it, so every `x in SELECTORS`
    check accepts it, while `list(SELECTORS)` (argparse choices, pytest parametrize) takes a
    snapshot of the names registered at that moment.
    """

    def __init__(self, registry: Mapping[str, object], keep: Callable[[str], bool] | None = None) -> None:
        self._registry = registry
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n in self._registry if self._keep is None or self._keep(n))

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, NameView)) else other)

    __hash__ = None  # type: ignore[assignment]  # equal to a tuple, but its contents change

    def __repr__(self) -> str:
        return repr(self._names())


SELECTOR_REGISTRY: dict[str, Selector] = {}
"""name -> Selector, in registration order (the order names are listed in)."""
ADAPTIVE_BUDGETS: dict[str, AdaptiveBudget] = {}
"""name -> AdaptiveBudget: the strings `recompute_ratio` accepts besides a number in [0, 1]."""


def register_selector(selector: Selector, *, replace: bool = False) -> Selector:
    """Add `selector` (by its name); a second registration of a name needs `replace=True`."""
    if not isinstance(selector, Selector):
        raise TypeError(f"expected a Selector, got {type(selector).__name__}")
    if selector.name in SELECTOR_REGISTRY and not replace:
        raise ValueError(f"selector {selector.name!r} is already registered")
    if selector.name in ADAPTIVE_BUDGETS:
        raise ValueError(f"{selector.name!r} already names an adaptive budget")
    SELECTOR_REGISTRY[selector.name] = selector
    return selector


def unregister_selector(name: str) -> None:
    """Remove a selector (tests that register their own clean up with this)."""
    SELECTOR_REGISTRY.pop(name, None)


def register_adaptive_budget(budget: AdaptiveBudget, *, replace: bool = False) -> AdaptiveBudget:
    if Signal.DEVIATION in budget.signals:
        raise ValueError("an adaptive budget cannot need DEVIATION: the share must be known before "
                         "the check-layer pass that measures it")
    if budget.name in ADAPTIVE_BUDGETS and not replace:
        raise ValueError(f"adaptive budget {budget.name!r} is already registered")
    ADAPTIVE_BUDGETS[budget.name] = budget
    return budget


def selector_names() -> tuple[str, ...]:
    return tuple(SELECTOR_REGISTRY)


def adaptive_budget_names() -> tuple[str, ...]:
    return tuple(ADAPTIVE_BUDGETS)


def get_selector(name: object) -> Selector:
    """The registered selector called `name`; InvalidInputError (a ValueError) naming the choices."""
    sel = SELECTOR_REGISTRY.get(name) if isinstance(name, str) else None
    if sel is None:
        raise InvalidInputError(f"selector must be one of {selector_names()}, got {name!r}")
    return sel


def get_adaptive_budget(name: str) -> AdaptiveBudget:
    budget = ADAPTIVE_BUDGETS.get(name)
    if budget is None:
        raise InvalidInputError(f"unknown adaptive budget {name!r}; choose one of {adaptive_budget_names()}")
    return budget


def selectors_using_only(available: Iterable[Signal]) -> NameView:
    """A live view of the selectors whose every signal is in `available`: what an engine that
    can gather only those (the vLLM connector's worker) can run."""
    have = frozenset(Signal(s) for s in available)
    return NameView(SELECTOR_REGISTRY, lambda n: SELECTOR_REGISTRY[n].signals <= have)


# --------------------------------------------------------------------------- built-in selectors
def _normalized(x: torch.Tensor) -> torch.Tensor:
    import torch

    x = x.float().clamp_min(0)
    s = float(x.sum())
    return x / s if s > 0 else torch.full_like(x, 1.0 / max(1, x.shape[0]))


def _score_deviation(signals: Signals, config: BlendConfig) -> torch.Tensor:
    assert signals.deviation is not None
    return signals.deviation.float()


def _score_query(signals: Signals, config: BlendConfig) -> torch.Tensor:
    assert signals.relevance is not None
    return signals.relevance.float()


def _score_hybrid(signals: Signals, config: BlendConfig) -> torch.Tensor:
    assert signals.relevance is not None and signals.deviation is not None
    # both normalized to distributions; the product favours tokens the question reads
    # AND whose stored KV is wrong (the square root keeps the product's scale comparable)
    return (_normalized(signals.relevance) * _normalized(signals.deviation)).sqrt()


def _score_chunk_heads(signals: Signals, config: BlendConfig) -> torch.Tensor:
    import torch

    # rank by position within the chunk: every chunk's k-th token before any chunk's (k+1)-th
    pos = torch.arange(signals.num_candidates, dtype=torch.float32)
    starts = torch.zeros(signals.num_candidates, dtype=torch.float32)
    for start in signals.chunk_starts:
        starts[start:] = float(start)
    return -(pos - starts)


def _score_random(signals: Signals, config: BlendConfig) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(config.seed + signals.num_candidates)
    return torch.rand(signals.num_candidates, generator=g)


register_selector(Selector(
    "deviation", frozenset({Signal.DEVIATION}), _score_deviation,
    "CacheBlend: tokens whose K/V at `check_layer` deviate most from the stored KV."))
register_selector(Selector(
    "query", frozenset({Signal.RELEVANCE}), _score_query,
    "The question's attention over the re-positioned stored KV (look-ahead over `query_layers`); "
    "the chosen tokens are recomputed from layer 0, no check pass."))
register_selector(Selector(
    "hybrid", frozenset({Signal.RELEVANCE, Signal.DEVIATION}), _score_hybrid,
    "Question relevance times check-layer deviation (each normalized; geometric mean)."))
register_selector(Selector(
    "chunk_heads", frozenset({Signal.CHUNK_STARTS}), _score_chunk_heads,
    "The first tokens of every non-exact chunk, the budget spread evenly (EPIC)."))
register_selector(Selector(
    "random", frozenset(), _score_random,
    "A seeded random share (a baseline for measurements)."))


# --------------------------------------------------------------------------- adaptive budgets
def auto_share(relevance: torch.Tensor, coverage: float, floor: float, cap: float) -> float:
    """Smallest share of candidates whose relevance covers `coverage` of the mass, in [floor, cap].

    Focused questions (attention on a few tokens) get a small budget; diffuse ones a larger one.
    """
    import torch

    n = int(relevance.shape[0])
    if n == 0:
        return 0.0
    mass = torch.sort(relevance.float(), descending=True).values.cumsum(0)
    total = float(mass[-1])
    if total <= 0:
        return floor
    k = int(torch.searchsorted(mass, torch.tensor(coverage * total, dtype=mass.dtype)).item()) + 1
    return min(cap, max(floor, k / n))


def _auto(signals: Signals, config: BlendConfig) -> float:
    assert signals.relevance is not None
    return auto_share(signals.relevance, config.auto_coverage, config.auto_floor, config.auto_cap)


register_adaptive_budget(AdaptiveBudget(
    "auto", frozenset({Signal.RELEVANCE}), _auto, lambda config: config.auto_floor == 0.0,
    "The smallest share whose tokens hold `auto_coverage` of the question's attention mass over the "
    "candidates, clipped to [auto_floor, auto_cap]."))
