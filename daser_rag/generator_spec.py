"""Naming and re-creating the generator behind an adapter, for both hosts (LlamaIndex's
`to_dict`/`from_dict`, LangChain's `dumpd`/`loads`): one place, so both adapters name the model
and rebuild a generator the same way."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from daser_rag.errors import InvalidInputError


def model_name_of(generator: Any) -> str:
    """A name for the model behind `generator`: its `model_name` (every daser engine and the
    service client have one), else its model file or folder name, else "daser-rag". Offline."""
    named = getattr(generator, "model_name", None)
    if isinstance(named, str) and named:
        return named
    source = getattr(getattr(generator, "lm", None), "source", None)
    if isinstance(source, str) and source:
        name = PurePath(source.rstrip("/\\")).name or source
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return "daser-rag"


def generator_spec(generator: Any) -> dict[str, Any] | None:
    """How to rebuild `generator` in another process, or None: the service URL of a remote client
    (never its API key, which travels as a secret), or the model source and cache folder of an
    in-process generator."""
    base_url = getattr(generator, "base_url", None)
    if isinstance(base_url, str) and base_url:
        return {"kind": "remote", "base_url": base_url}
    source = getattr(getattr(generator, "lm", None), "source", None)
    root = getattr(getattr(generator, "store", None), "root", None)
    if isinstance(source, str):
        return {"kind": "local", "model": source, "cache_dir": str(root) if root is not None else None}
    return None


def build_from_spec(spec: dict[str, Any], api_key: str | None = None) -> Any:
    """The generator `generator_spec` describes (connects to the service, or loads the model)."""
    kind = spec.get("kind")
    if kind == "remote":
        from daser_rag.server.client import DaserClient

        return DaserClient(spec["base_url"], api_key=api_key)
    if kind == "local":
        from daser_rag.engine.factory import build_generator

        return build_generator(spec.get("model"), cache_dir=spec.get("cache_dir"))
    raise InvalidInputError(f"unknown generator_spec kind {kind!r}; expected 'local' or 'remote'")


__all__ = ["build_from_spec", "generator_spec", "model_name_of"]
