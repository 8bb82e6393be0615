"""Blend hyper-parameters as one value object.

Everything that decides how a request's stored KV is repaired lives here, so a request can
carry its own choice (`BlendConfig.with_request(...)`) and a result can say exactly what was
done. r = 0 is full reuse, r = 1 is full prefill; "auto" picks a share per request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from daser_rag import settings as s
from daser_rag.blend.registry import AdaptiveBudget, Selector, Signal, get_adaptive_budget, get_selector
from daser_rag.params import (
    DEFAULT_RECOMPUTE_RATIO,
    DEFAULT_SELECTOR,
    RecomputeRatio,
    check_recompute_ratio,
    check_selector,
)

DEVIATION_METRICS = s.DEVIATION.choices
BUDGETS = s.BUDGET.choices

Ratio = RecomputeRatio
"""A share in [0, 1] or an adaptive budget's name ("auto"); one alias with GenerationParams'."""


@dataclass(frozen=True)
class BlendConfig:
    """How to choose and recompute context tokens.

    selector: a name in the selector registry (daser_rag/blend/registry.py); the built-ins:
      "deviation"  CacheBlend: tokens whose K/V at `check_layer` deviate most from the stored KV.
      "query"      the question's fresh queries, run over the re-positioned stored KV (a cheap
                   look-ahead pass), rank context tokens by the attention they receive in
                   `query_layers`; selected tokens are recomputed from layer 0 (no check pass).
      "hybrid"     query relevance times deviation.
      "chunk_heads" the first tokens of every non-exact chunk, the budget spread evenly (EPIC).
      "random"     a seeded random share (a baseline for measurements).
    chunk_heads: the first k tokens of every non-exact chunk are always recomputed (EPIC).
    recompute_ratio: a share in [0, 1] or an adaptive budget's name (registry.py); "auto": the smallest share whose tokens hold `auto_coverage` of the
    question's attention mass over the candidates, clipped to [auto_floor, auto_cap].
    budget "per_chunk": every non-exact chunk gets the same share of its own tokens (ranked
    within the chunk), instead of the top share over all candidates together.
    funnel f > 1 (deviation and hybrid): CacheBlend's gradual filtering, f x the budget kept at
    the check layer, narrowed to the budget by the deviation one layer later.
    """

    recompute_ratio: Ratio = DEFAULT_RECOMPUTE_RATIO
    selector: str = DEFAULT_SELECTOR
    # every default (and its meaning) is declared in daser_rag/settings.py, section "blend"
    check_layer: int = s.CHECK_LAYER.default
    deviation: str = s.DEVIATION.default
    chunk_heads: int = s.CHUNK_HEADS.default
    query_layers: tuple[int, ...] | None = s.QUERY_LAYERS.default  # None: every layer
    query_tokens: int = s.QUERY_TOKENS.default  # 0: every question token; k: the last k only
    query_norm: str = s.QUERY_NORM.default
    query_heads: str = s.QUERY_HEADS.default
    auto_coverage: float = s.AUTO_COVERAGE.default
    auto_floor: float = s.AUTO_FLOOR.default
    auto_cap: float = s.AUTO_CAP.default
    budget: str = s.BUDGET.default
    funnel: float = s.FUNNEL.default
    seed: int = s.BLEND_SEED.default

    def __post_init__(self) -> None:
        # the validators GenerationParams uses; they raise InvalidInputError, a ValueError
        object.__setattr__(self, "recompute_ratio", check_recompute_ratio(self.recompute_ratio))
        check_selector(self.selector)
        if self.deviation not in DEVIATION_METRICS:
            raise ValueError(f"deviation must be one of {DEVIATION_METRICS}, got {self.deviation!r}")
        if self.check_layer < 0:
            raise ValueError(f"check_layer must be >= 0, got {self.check_layer}")
        if self.query_norm not in s.QUERY_NORM.choices or self.query_heads not in s.QUERY_HEADS.choices:
            raise ValueError(f"query_norm must be 'row' or 'raw' and query_heads 'mean' or 'max', got "
                             f"{self.query_norm!r}, {self.query_heads!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if isinstance(self.funnel, bool) or not isinstance(self.funnel, (int, float)) or self.funnel < 1.0:
            raise ValueError(f"funnel must be a number >= 1, got {self.funnel!r}")
        if self.chunk_heads < 0 or self.query_tokens < 0:
            raise ValueError("chunk_heads and query_tokens must be >= 0")
        if not 0.0 <= self.auto_floor <= self.auto_cap <= 1.0 or not 0.0 < self.auto_coverage <= 1.0:
            raise ValueError("need 0 <= auto_floor <= auto_cap <= 1 and 0 < auto_coverage <= 1")

    @property
    def selector_entry(self) -> Selector:
        """The registry entry of `selector`: its signals and its score."""
        return get_selector(self.selector)

    @property
    def adaptive_budget(self) -> AdaptiveBudget | None:
        """The adaptive budget `recompute_ratio` names ("auto"), None for a fixed share."""
        r = self.recompute_ratio
        return get_adaptive_budget(r) if isinstance(r, str) else None

    @property
    def is_auto(self) -> bool:
        """The share is chosen per request (an adaptive budget), not fixed."""
        return isinstance(self.recompute_ratio, str)

    @property
    def signals(self) -> frozenset[Signal]:
        """Every signal fusion must gather for this config: the selector's and the budget's."""
        budget = self.adaptive_budget
        return self.selector_entry.signals | (budget.signals if budget is not None else frozenset())

    @property
    def needs_query_signal(self) -> bool:
        """A look-ahead pass of the question is needed (its attention is the relevance signal)."""
        return Signal.RELEVANCE in self.signals

    @property
    def needs_deviation(self) -> bool:
        """Selection happens at the check layer, from the K/V deviation there (CacheBlend)."""
        return self.selector_entry.needs(Signal.DEVIATION)

    def with_request(self, recompute_ratio: Ratio | None = None, selector: str | None = None) -> BlendConfig:
        """This config with a request's own choices (None keeps the default)."""
        if recompute_ratio is None and selector is None:
            return self
        return replace(self, recompute_ratio=self.recompute_ratio if recompute_ratio is None else recompute_ratio,
                       selector=self.selector if selector is None else selector)
