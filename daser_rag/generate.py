"""Compatibility import path: the generator lives in `daser_rag.engine.generator`."""

from daser_rag.engine.generator import CacheAwareGenerator, TokenStream

__all__ = ["CacheAwareGenerator", "TokenStream"]
