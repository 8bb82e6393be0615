"""The tenant rule (daser_rag/context.py): below the public boundary a forgotten tenant is a
TypeError, never a silent fall into the shared tenant; the public boundary defaults to the one
named constant SHARED_TENANT."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from daser_rag.context import SHARED_TENANT, RequestContext
from daser_rag.control.planner import Planner
from daser_rag.engine import resolve as resolve_mod
from daser_rag.engine.assemble import SegmentAssembler
from daser_rag.engine.chunk_index import ChunkIndex
from daser_rag.engine.chunks import ChunkComputer
from daser_rag.engine.ingest import Ingestor
from daser_rag.kv.doc_index import DocIndex
from daser_rag.kv.redis_index import RedisDocIndex
from daser_rag.kv.store import KVStore
from daser_rag.params import GenerationParams

ROOT = Path(__file__).resolve().parents[1]
BELOW_BOUNDARY = [KVStore, DocIndex, RedisDocIndex, Ingestor, ChunkComputer, ChunkIndex, SegmentAssembler, Planner]


def _tenant_params():
    for cls in BELOW_BOUNDARY:
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            p = inspect.signature(fn).parameters.get("tenant")
            if p is not None:
                yield f"{cls.__name__}.{name}", p
    yield "resolve", inspect.signature(resolve_mod.resolve).parameters["tenant"]


def test_no_layer_below_the_boundary_defaults_the_tenant():
    found = dict(_tenant_params())
    assert len(found) >= 40  # store, both indexes, ingest, chunk keys, assembly, planner, resolve
    defaulted = sorted(name for name, p in found.items() if p.default is not inspect.Parameter.empty)
    assert defaulted == []


@pytest.mark.parametrize("call", [
    lambda s: s.document_info("d"),
    lambda s: s.document_chunk_keys("d"),
    lambda s: s.document_chunk_texts("d"),
    lambda s: s.documents(),
    lambda s: s.invalidate("d"),
    lambda s: s.register_document("d", ["t"], "digest"),
    lambda s: s.replace_document_refs("d", ["k"]),
    lambda s: s.add_refs("d", ["k"]),
    lambda s: s.add_derived(["d"], "k"),
    lambda s: s.written_version("d"),
    lambda s: s.index.set_document("d", ["t"], "digest"),
    lambda s: s.index.info("d"),
    lambda s: s.index.chunk_keys("d"),
    lambda s: s.index.remove_document("d"),
    lambda s: s.index.replace_refs("d", ["k"]),
    lambda s: s.index.num_documents(),
])
def test_a_forgotten_tenant_raises_instead_of_reading_the_shared_tenant(tmp_path, call):
    store = KVStore(tmp_path, codec="fp32")
    # something is there in the shared tenant: a silent default would find it
    store.register_document("d", ["t"], "digest", SHARED_TENANT)
    store.replace_document_refs("d", ["k"], SHARED_TENANT)
    with pytest.raises(TypeError, match="tenant"):
        call(store)
    assert store.document_chunk_keys("d", SHARED_TENANT) == ["k"]  # nothing was written by the failed call


def test_tenants_stay_apart_in_the_store(tmp_path):
    store = KVStore(tmp_path, codec="fp32")
    store.register_document("d", ["t"], "digest", "acme")
    store.replace_document_refs("d", ["k_acme"], "acme")
    assert store.documents("acme") == ["d"] and store.documents(SHARED_TENANT) == []
    assert store.invalidate("d", SHARED_TENANT) == [] and store.document_chunk_keys("d", "acme") == ["k_acme"]


def test_request_context_needs_a_tenant_and_carries_one():
    with pytest.raises(TypeError):
        RequestContext()  # type: ignore[call-arg]
    rc = RequestContext(tenant="acme", params=GenerationParams(max_new_tokens=3))
    assert rc.params.tenant == "acme" and rc.params.max_new_tokens == 3  # the request's one tenant
    with pytest.raises(ValueError, match="conflicting tenants"):
        RequestContext(tenant="acme", params=GenerationParams(tenant="globex"))
    with pytest.raises(Exception):
        rc.tenant = "globex"  # type: ignore[misc]  # frozen


def test_the_shared_tenant_is_declared_once():
    # the public boundary defaults to the named constant; the literal "" default is gone from the core
    src = {p: p.read_text(encoding="utf-8") for p in (ROOT / "daser_rag").rglob("*.py")}
    literal = [str(p.relative_to(ROOT)) for p, s in src.items() if re.search(r"tenant: str = \"\"", s)]
    assert literal == []
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.engine.protocol import Engine

    for fn in (CacheAwareGenerator.add_documents, CacheAwareGenerator.invalidate, CacheAwareGenerator.chunk_keys,
               CacheAwareGenerator.prefill, Engine.invalidate, Engine.chunk_keys):
        assert inspect.signature(fn).parameters["tenant"].default is SHARED_TENANT
