"""Prefix-tree materialization off the request path (engine/materialize.py): no request computes
a tree node, background work yields the model to a request within a layer, stale paths are dropped,
and the nodes it stores make the path exactly full prefill."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from daser_rag.blend.prefix_tree import PrefixTree
from daser_rag.engine.materialize import BackgroundMaterializer
from daser_rag.engine.model_lock import ModelLock
from daser_rag.errors import InvalidInputError
from daser_rag.types import ChunkRef

Q = "What does pass do?"


@pytest.fixture
def ctx(generator: Any, corpus: Any) -> list[ChunkRef]:
    by_id = {d.doc_id: d for d in corpus}
    docs = [by_id[i] for i in ("pyref:pass", "pyref:while", "pyref:del")]
    return [ChunkRef(text=generator.split(d.text)[0][:400], doc_id=d.doc_id) for d in docs]


@pytest.fixture
def background(generator: Any) -> Iterator[BackgroundMaterializer]:
    asm = generator.assembler
    saved = asm.prefix_tree, asm.materializer
    asm.prefix_tree = PrefixTree(materialize_after=2)
    asm.materializer = BackgroundMaterializer(asm, generator.lock, idle_s=0.02)
    try:
        yield asm.materializer
    finally:
        asm.materializer.close()
        asm.prefix_tree, asm.materializer = saved


def _nodes_stored(generator: Any, ctx: list[ChunkRef]) -> list[bool]:
    return [generator.store.contains(k) for k in generator.plan_keys(ctx) if k.startswith("s")]


def test_no_request_materializes_and_the_background_nodes_are_exact(generator: Any, ctx: list[ChunkRef],
                                                                     background: BackgroundMaterializer) -> None:
    full, _ = generator.prefill(Q, ctx, use_cache=False)
    for _ in range(2):  # the second request crosses the threshold
        _, info = generator.prefill(Q, ctx, recompute_ratio=0.0)
        assert "materialized" not in info and info["exact_chunks"] == 1  # it blended; nobody computed nodes
    assert background.wait_idle(120)
    assert background.stats.materialized == 1 and background.stats.submitted == 1
    fused, info = generator.prefill(Q, ctx, recompute_ratio=0.0)
    assert info["exact_chunks"] == 3 and fused.exact_tokens == fused.context_tokens
    assert (fused.logits - full.logits).abs().max().item() < 1e-3  # exact: equals full prefill


def test_a_waiting_request_preempts_background_work_within_a_layer(generator: Any, ctx: list[ChunkRef],
                                                                  background: BackgroundMaterializer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        generator.prefill("Why del?", ctx, recompute_ratio=0.0)
    # the job was submitted; hold the model "wanted" by a queued request: nothing may start
    lock: ModelLock = generator.lock
    lock.note_queued("r1")
    time.sleep(0.3)
    assert background.stats.materialized == 0 and background.stats.preempted == 0
    assert not any(_nodes_stored(generator, ctx))
    # now a request arrives while the job is at layer 3: the job must stop at the next layer
    real_forward = generator.runner.forward
    layers_run: list[int] = []
    arrived = threading.Event()

    def forward(*args: Any, before_layer: Any = None, **kw: Any) -> Any:
        def hook(layer: int) -> None:
            layers_run.append(layer)
            if layer == 3 and not arrived.is_set():
                arrived.set()
                lock.note_queued("r2")
            if before_layer is not None:
                before_layer(layer)
        return real_forward(*args, before_layer=hook if before_layer is not None else None, **kw)

    monkeypatch.setattr(generator.runner, "forward", forward)
    lock.note_done("r1")
    assert arrived.wait(60)
    deadline = time.monotonic() + 30
    while background.stats.preempted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert background.stats.preempted == 1
    assert max(layers_run) == 3  # gave the model back before computing layer 3
    assert not any(_nodes_stored(generator, ctx))  # all or nothing: no partial path stored
    t0 = time.monotonic()
    with lock:  # the "request" gets the model at once
        waited = time.monotonic() - t0
    assert waited < 1.0
    lock.note_done("r2")
    assert background.wait_idle(120)
    assert background.stats.materialized == 1 and all(_nodes_stored(generator, ctx))


def test_invalidated_paths_are_dropped_not_materialized(generator: Any, ctx: list[ChunkRef],
                                                       background: BackgroundMaterializer) -> None:
    lock: ModelLock = generator.lock
    lock.note_queued("busy")
    try:
        for _ in range(2):
            generator.prefill("What is pass for?", ctx, recompute_ratio=0.0)
        generator.invalidate("pyref:while")  # the document changes before the background turn
    finally:
        lock.note_done("busy")
    assert background.wait_idle(60)
    assert background.stats.dropped_stale == 1 and background.stats.materialized == 0


def test_queue_is_bounded(generator: Any, background: BackgroundMaterializer) -> None:
    small = BackgroundMaterializer(generator.assembler, ModelLock(), queue_max=2)
    small.lock.note_queued("hold")  # never idle: jobs only queue
    try:
        chunks = generator.resolve([ChunkRef(text=f"Passage number {i}.") for i in range(5)], "")
        for i in range(4):
            assert small.submit([chunks[i], chunks[i + 1]], "")
        assert not small.submit([chunks[3], chunks[4]], "")  # already waiting
        # the worker may hold one path (waiting for an idle model), taken at any moment: the rest
        # is bounded, and every submitted path is waiting, held or counted as dropped
        with small._cv:
            pending, held, dropped = small.stats.pending, int(small._busy), small.stats.dropped_full
        assert pending <= 2 and dropped >= 1 and pending + held + dropped == 4
        assert small.stats.submitted == 4 and small.stats.materialized == 0
    finally:
        small.close()


def test_prefix_tree_option(lm: Any, store: Any) -> None:
    from daser_rag.engine.generator import CacheAwareGenerator

    g = CacheAwareGenerator(lm, store, prefix_tree="background")
    assert g.assembler.prefix_tree is not None and g.assembler.materializer is not None
    g.close()
    g = CacheAwareGenerator(lm, store, prefix_tree="inline", prefix_tree_after=3)
    assert g.assembler.materializer is None and g.assembler.prefix_tree is not None
    assert g.assembler.prefix_tree.materialize_after == 3
    default = CacheAwareGenerator(lm, store)  # the default: background
    assert default.assembler.prefix_tree is not None and default.assembler.materializer is not None
    default.close()
    assert CacheAwareGenerator(lm, store, prefix_tree="off").assembler.prefix_tree is None
    with pytest.raises(InvalidInputError, match="prefix_tree must be one of"):
        CacheAwareGenerator(lm, store, prefix_tree="sometimes")
    with pytest.raises(InvalidInputError, match="prefix_tree_after"):
        CacheAwareGenerator(lm, store, prefix_tree="inline", prefix_tree_after=0)


def test_a_submitted_path_is_materialized_even_if_the_tree_is_swapped_out(generator: Any, ctx: list[ChunkRef],
                                                                         background: BackgroundMaterializer) -> None:
    """The job was decided when the path crossed the threshold; a caller that sets the assembler's
    tree to None meanwhile (the prefix-tree benchmark toggles it between modes) must not make the
    job vanish uncounted (it did: materialized 0, nothing dropped)."""
    lock: ModelLock = generator.lock
    lock.note_queued("busy")
    try:
        for _ in range(2):
            generator.prefill("Which statement does nothing?", ctx, recompute_ratio=0.0)
        assert background.stats.submitted == 1
        generator.assembler.prefix_tree = None
    finally:
        lock.note_done("busy")
    assert background.wait_idle(120)
    generator.assembler.prefix_tree = PrefixTree(materialize_after=2)  # to look the nodes up
    stored = _nodes_stored(generator, ctx)
    assert background.stats.materialized == 1 and len(stored) == 2 and all(stored)
    background.submit(generator.resolve(ctx, ""), "")  # a path already stored is counted as such
    assert background.wait_idle(60)
    assert background.stats.already_stored == 1 and background.stats.materialized == 1


def test_health_reports_background_work_and_its_cost(generator: Any, ctx: list[ChunkRef],
                                                    background: BackgroundMaterializer) -> None:
    for _ in range(2):
        generator.prefill("What is while for?", ctx, recompute_ratio=0.0)
    assert background.wait_idle(120)
    detail = generator.health().detail["prefix_tree"]
    assert detail["submitted"] == 1 and detail["materialized"] == 1
    assert set(detail["request_waits"]) == {"count", "total_s", "max_s"}


def test_a_path_is_stored_node_by_node_and_resumes_after_preemption(generator: Any, ctx: list[ChunkRef],
                                                                     background: BackgroundMaterializer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waits for at most one layer of one chunk, and a preempted path keeps the nodes it
    stored (it used to compute the whole path in one go and lose it all when preempted)."""
    from daser_rag.blend.prefix_tree import node_key

    lock: ModelLock = generator.lock
    lock.note_queued("hold")
    for _ in range(2):
        generator.prefill("What is del for?", ctx, recompute_ratio=0.0)
    chunks = generator.resolve(ctx, "")
    pk = generator.computer.prefix_key("")
    second = node_key(pk, [c.key for c in chunks[:2]])
    third = node_key(pk, [c.key for c in chunks])
    real = generator.computer.compute_after
    calls: list[int] = []

    def compute_after(runs: Any, ids: Any, keys: Any, *, before_layer: Any = None) -> Any:
        calls.append(len(ids))

        def hook(layer: int) -> None:
            if len(calls) == 2 and layer == 2:
                lock.note_queued("r")  # a request arrives during the second node
            if before_layer is not None:
                before_layer(layer)
        return real(runs, ids, keys, before_layer=hook)

    monkeypatch.setattr(generator.computer, "compute_after", compute_after)
    lock.note_done("hold")
    deadline = time.monotonic() + 60
    while background.stats.preempted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert background.stats.preempted == 1 and calls[:2] == [1, 1]  # one chunk per step
    assert generator.store.contains(second) and not generator.store.contains(third)  # the first node is kept
    lock.note_done("r")
    assert background.wait_idle(120)
    assert calls == [1, 1, 1]  # resumed at the third chunk, did not redo the second
    assert generator.store.contains(third)
    assert background.stats.materialized == 1 and background.stats.nodes == 2


def test_background_reads_never_run_the_model(generator: Any, ctx: list[ChunkRef],
                                              background: BackgroundMaterializer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the runs a node extends happens outside the model lock, so it must not compute: a
    first chunk evicted meanwhile becomes part of the work done under the lock (it used to be
    computed right there, racing a request for the model)."""
    from daser_rag.types import Timings

    chunks = generator.resolve(ctx, "")
    generator.prefill("What is pass?", ctx, recompute_ratio=0.0, prefix_tree=False)  # chunks stored
    asm = generator.assembler
    from daser_rag.blend.prefix_tree import node_key

    second = node_key(generator.computer.prefix_key(""), [c.key for c in chunks[:2]])
    assert generator.store.contains(chunks[0].key) and not generator.store.contains(second)
    generator.store.delete(chunks[0].key)

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the model ran outside the lock")

    monkeypatch.setattr(generator.computer, "compute", no_model)
    work = asm.path_work(chunks, "", Timings(), max_nodes=1)
    assert work is not None and work.depth == 0 and work.end == 1 and len(work.runs) == 1
