"""Compatibility import path: the generator lives in `daser_rag.engine.generator`."""

from daser_rag.engine.decode import TokenStream
from daser_rag.engine.generator import CacheAwareGenerator

__all__ = ["CacheAwareGenerator", "TokenStream"]
