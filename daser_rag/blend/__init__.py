"""Fusion of cached chunks: exact prefix reuse, RoPE re-positioning, selective recompute."""

from daser_rag.blend.fusion import BlendConfig, FusionResult, fuse

__all__ = ["BlendConfig", "FusionResult", "fuse"]
