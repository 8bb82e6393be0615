"""Fusion of cached chunks: exact prefix reuse, RoPE re-positioning, selective recompute."""

from daser_rag.blend.config import SELECTORS, BlendConfig
from daser_rag.blend.fusion import FusionResult, fuse

__all__ = ["SELECTORS", "BlendConfig", "FusionResult", "fuse"]
