"""Prefix tree over chunk sequences: keys, counts, longest stored path, and exact reuse end to end."""

from __future__ import annotations

import pytest

from daser_rag.blend.prefix_tree import PrefixTree, node_key
from daser_rag.types import ChunkRef


def test_node_keys_depend_on_whole_path():
    assert node_key("p", ["c1"]) == "c1"  # depth 1 is the plain chunk entry
    a = node_key("p", ["c1", "c2"])
    assert a.startswith("s") and a != node_key("p", ["c2", "c1"])  # order matters
    assert a != node_key("q", ["c1", "c2"])  # another system prefix / tenant
    with pytest.raises(ValueError):
        node_key("p", [])


def test_record_counts_and_longest_stored():
    t = PrefixTree(materialize_after=2)
    assert t.record("p", ["a", "b", "c"]) == 1
    assert t.record("p", ["a", "b", "c"]) == 2
    assert t.record("p", ["a", "b"]) == 3  # the shorter path was walked by both earlier requests too
    assert t.count("p", ["a", "b", "c"]) == 2 and t.count("p", ["a", "x"]) == 0
    stored = {node_key("p", ["a", "b"])}
    m = t.longest_stored("p", ["a", "b", "c"], stored.__contains__)
    assert m.depth == 2 and m.node_keys[0] == "a" and m.node_keys[1] in stored
    assert t.longest_stored("p", ["a"], stored.__contains__).depth == 1
    assert t.longest_stored("p", [], stored.__contains__).depth == 0
    assert t.should_materialize(2, 2, 3) and not t.should_materialize(1, 1, 3) and not t.should_materialize(5, 3, 3)


@pytest.fixture
def ctx(generator, corpus):
    generator.chunk_tokens = 48
    by_id = {d.doc_id: d for d in corpus}
    docs = [by_id[i] for i in ("pyref:pass", "pyref:break", "pyref:del")]
    return [ChunkRef(text=generator.split(d.text)[0], doc_id=d.doc_id) for d in docs]


def _inline(generator, after):
    """The tree in inline mode: the request crossing the threshold stores the path itself."""
    generator.assembler.prefix_tree = PrefixTree(materialize_after=after)
    generator.assembler.materializer = None


def test_repeated_sequence_reuses_exact_kv(generator, ctx):
    q = "What does pass do?"
    full, _ = generator.prefill(q, ctx, use_cache=False)
    blended, info = generator.prefill(q, ctx, recompute_ratio=0.0)
    assert info["exact_chunks"] == 1
    _inline(generator, 2)
    first, info1 = generator.prefill(q, ctx, recompute_ratio=0.0)
    assert info1["exact_chunks"] == 1 and "materialized" not in info1  # seen once: blend
    second, info2 = generator.prefill(q, ctx, recompute_ratio=0.0)
    assert info2.get("materialized") and info2["exact_chunks"] == 3
    third, info3 = generator.prefill(q, ctx, recompute_ratio=0.0)
    assert "materialized" not in info3 and info3["exact_chunks"] == 3
    assert third.exact_tokens == third.context_tokens and third.recomputed_tokens == 0
    d_exact = (third.logits - full.logits).abs().max().item()
    d_blend = (blended.logits - full.logits).abs().max().item()
    assert d_exact < 1e-3 < d_blend  # fp32 codec: the exact run matches full prefill, blending does not
    # a longer request sharing the prefix uses the stored run and blends only the new tail
    longer, info4 = generator.prefill(q, ctx + [ChunkRef(text="An extra retrieved passage about loops.")],
                                      recompute_ratio=0.0)
    assert info4["exact_chunks"] == 3 and longer.exact_tokens == third.context_tokens


def test_invalidating_any_document_on_the_path_drops_its_nodes(generator, ctx):
    _inline(generator, 1)
    generator.prefill("What does pass do?", ctx)
    keys = generator.plan_keys(ctx)
    nodes = [k for k in keys if k.startswith("s")]
    assert len(nodes) == 2 and all(generator.store.contains(k) for k in nodes)
    dropped = generator.invalidate("pyref:break")  # the middle document
    assert set(nodes) <= set(dropped) and not any(generator.store.contains(k) for k in nodes)
    _, info = generator.prefill("What does pass do?", ctx, recompute_ratio=0.0)
    assert info.get("materialized") and info["exact_chunks"] == 3  # rebuilt exactly on next use


def test_changed_text_never_hits_old_nodes(generator, ctx):
    _inline(generator, 1)
    generator.prefill("What does pass do?", ctx)
    edited = [ctx[0], ChunkRef(text=ctx[1].text + " Edited.", doc_id=ctx[1].doc_id), ctx[2]]
    assert generator.plan_keys(edited)[1:] == [c.key for c in generator.resolve(edited[1:], "")]
    _, info = generator.prefill("What does pass do?", edited, recompute_ratio=0.0)
    assert info.get("materialized")  # new path: computed, never served from the old nodes


def test_a_full_tree_keeps_learning():
    """Counts are bounded (max_nodes); a full tree used to stop counting new paths for good, so a
    long-running service would never materialize a path again. Now it forgets one-off paths."""
    tree = PrefixTree(materialize_after=2, max_nodes=20)
    hot = ["h1", "h2", "h3"]
    assert tree.record("p", hot) == 1 and tree.record("p", hot) == 2
    for i in range(40):  # many one-off orders fill the tree
        tree.record("p", [f"a{i}", f"b{i}"])
        assert len(tree) <= 20
    assert tree.pruned >= 1
    assert tree.count("p", hot) >= 2  # a path requested twice survives the pruning of one-offs
    fresh = ["x1", "x2"]
    assert tree.record("p", fresh) == 1 and tree.record("p", fresh) == 2  # and new paths are still learned


def test_a_request_can_skip_the_tree(generator, ctx):
    """`prefill(prefix_tree=False)` neither counts towards storing a path nor reads its nodes
    (what measures blending itself on repeated prompts)."""
    q = "What does break do?"
    _inline(generator, 1)
    _, info = generator.prefill(q, ctx, recompute_ratio=0.0, prefix_tree=False)
    assert "materialized" not in info and info["exact_chunks"] == 1
    assert generator.assembler.prefix_tree.count(generator.computer.prefix_key(""),
                                                 [c.key for c in generator.resolve(ctx, "")]) == 0
    _, info = generator.prefill(q, ctx, recompute_ratio=0.0)
    assert info.get("materialized") and info["exact_chunks"] == 3
    _, info = generator.prefill(q, ctx, recompute_ratio=0.0, prefix_tree=False)
    assert info["exact_chunks"] == 1  # the nodes exist; this request blends anyway


def test_fidelity_measures_blending_even_with_the_tree_on(generator, ctx):
    """measure_fidelity runs the same prompt again and again; with the tree on by default those
    repeats would be served exactly and report KL 0 for blending."""
    from daser_rag.evaluation import measure_fidelity

    assert generator.assembler.materializer is not None  # the default: background
    kls = []
    for _ in range(3):
        res = measure_fidelity(generator, [("What does del do?", ctx)], [0.0], steps=4)
        kls.append(res[0.0].mean_kl)
        assert generator.assembler.materializer.wait_idle(120)
    assert kls[0] > 1e-3 and max(kls) - min(kls) < 1e-6
