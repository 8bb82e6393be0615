"""Fusion of cached chunks: exact prefix reuse, RoPE re-positioning, selective recompute.

The names below are loaded on first use: `daser_rag.params` imports the selector registry
(`daser_rag.blend.registry`, no torch) and must not pull in fusion and torch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daser_rag.blend.config import BlendConfig
    from daser_rag.blend.fusion import FusionResult, fuse
    from daser_rag.params import SELECTORS

__all__ = ["SELECTORS", "BlendConfig", "FusionResult", "fuse"]

_HOME = {"SELECTORS": "daser_rag.params", "BlendConfig": "daser_rag.blend.config",
         "FusionResult": "daser_rag.blend.fusion", "fuse": "daser_rag.blend.fusion"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
