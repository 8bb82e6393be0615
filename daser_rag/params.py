"""Per-request generation options, validated once.

Every entry point (the generator, the CLI, the HTTP schemas, the remote client, the
LlamaIndex and LangChain adapters) builds a `GenerationParams` from whatever its users pass,
so an option means the same thing and is checked the same way everywhere. Values are
checked strictly (no coercion of ``"3"`` or ``True`` into numbers): a wrong type is a
mistake in the caller, and silently fixing it hides the mistake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from daser_rag.blend.registry import ADAPTIVE_BUDGETS, SELECTOR_REGISTRY, NameView, adaptive_budget_names, get_selector
from daser_rag.errors import InvalidInputError
from daser_rag import settings

DEFAULT_MAX_NEW_TOKENS = settings.MAX_NEW_TOKENS.default
"""One default for every entry point (generator, CLI, service, adapters); declared in daser_rag/settings.py."""

DEFAULT_RECOMPUTE_RATIO = settings.RECOMPUTE_RATIO.default
"""The share of non-exact context tokens recomputed when a request does not say (BlendConfig's
default; `check_recompute_ratio` is the one validator of any ratio)."""

DEFAULT_SELECTOR = settings.SELECTOR.default
"""The token selector used when a request does not say (BlendConfig's default)."""

SELECTORS: Sequence[str] = NameView(SELECTOR_REGISTRY)
"""Token selectors for selective recompute: a live view of daser_rag/blend/registry.py, so a
selector registered there (or by a plugin or test) is accepted everywhere."""

RecomputeRatio = float | str
"""A share in [0, 1] or an adaptive budget's name ("auto", daser_rag/blend/registry.py)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


def check_recompute_ratio(value: Any, name: str = "recompute_ratio") -> RecomputeRatio:
    """A share in [0, 1] (returned as a float), or the name of an adaptive budget ("auto": a
    share chosen per request). The one validator of a ratio: GenerationParams, BlendConfig
    and the adapters all call it, so a ratio is accepted or refused the same way everywhere."""
    if isinstance(value, str):
        if value in ADAPTIVE_BUDGETS:
            return value
    elif _is_number(value) and 0.0 <= float(value) <= 1.0:
        return float(value)
    names = " or ".join(repr(n) for n in adaptive_budget_names())
    raise InvalidInputError(f"{name} must be a number in [0, 1] or {names}, got {value!r}")


def check_selector(value: Any) -> str:
    """A registered selector's name (daser_rag/blend/registry.py)."""
    return get_selector(value).name


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for. `None` for recompute_ratio / selector: the generator's default."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = settings.TEMPERATURE.default
    """Any finite number >= 0; 0 and values below daser_rag.sampling.MIN_TEMPERATURE (1e-5) are
    greedy decoding (their limit; dividing logits by them would overflow). The service caps it at 2."""
    top_p: float = settings.TOP_P.default
    top_k: int = settings.TOP_K.default
    seed: int | None = settings.SEED.default
    stop: tuple[str, ...] = settings.STOP.default
    recompute_ratio: RecomputeRatio | None = None
    selector: str | None = None
    use_cache: bool = settings.USE_CACHE.default
    tenant: str = settings.TENANT.default
    calibration: bool | None = settings.USE_CALIBRATION.default
    """None: use the engine's calibration when it has one; False: never; True: required."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidInputError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < float(self.top_p) <= 1:
            raise InvalidInputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidInputError(f"seed must be an integer or null, got {self.seed!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidInputError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if self.recompute_ratio is not None:
            object.__setattr__(self, "recompute_ratio", check_recompute_ratio(self.recompute_ratio))
        if self.selector is not None:
            check_selector(self.selector)
        if not isinstance(self.use_cache, bool):
            raise InvalidInputError(f"use_cache must be true or false, got {self.use_cache!r}")
        if self.calibration is not None and not isinstance(self.calibration, bool):
            raise InvalidInputError(f"calibration must be true, false or null, got {self.calibration!r}")
        if not isinstance(self.tenant, str):
            raise InvalidInputError(f"tenant must be a string, got {self.tenant!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, base: GenerationParams | None = None, /, **kwargs: Any) -> GenerationParams:
        """Build from keyword options, rejecting unknown ones by name.

        ``max_tokens`` (the OpenAI / LangChain spelling) is accepted as ``max_new_tokens``.
        """
        if "max_tokens" in kwargs:
            mt = kwargs.pop("max_tokens")
            if mt is not None:
                kwargs.setdefault("max_new_tokens", mt)
        unknown = sorted(set(kwargs) - set(cls.keys()))
        if unknown:
            raise InvalidInputError(f"unknown generation option(s) {unknown}; known: {list(cls.keys())}")
        if isinstance(kwargs.get("stop"), (list, tuple)):
            kwargs["stop"] = tuple(kwargs["stop"])
        if kwargs.get("stop") is None:
            kwargs.pop("stop", None)
        return replace(base, **kwargs) if base is not None else cls(**kwargs)
