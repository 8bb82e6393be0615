"""Where reuse is exact, it must equal full prefill; r=1 must equal full prefill."""

import torch

from daser_rag.corpus import python_reference_corpus


def _chunks(gen, n=3, topics=("pass", "break", "continue", "del", "return")):
    docs = python_reference_corpus(topics[:n])
    return [gen.split(d.text)[0] for d in docs]


def test_runner_matches_transformers_forward(lm):
    from daser_rag.model.runner import LayerRunner

    runner = LayerRunner(lm)
    ids = torch.tensor(lm.tokenizer("Deletion of a name removes the binding of that name.")["input_ids"])
    with torch.inference_mode():
        ref = lm.hf_model(ids[None]).logits[0].float()
    cache = runner.new_cache(len(ids))
    out = runner.forward(ids, 0, cache, all_logits=True)
    assert (out - ref).abs().max().item() < 1e-4


def test_r1_equals_full_prefill(generator):
    chunks = _chunks(generator, 3)
    q = "What does the pass statement do?"
    full, _ = generator.prefill(q, chunks, use_cache=False)
    generator.prefill(q, chunks)  # populate the cache
    fused, info = generator.prefill(q, chunks, recompute_ratio=1.0)
    assert info["hits"] == 3 and info["misses"] == 0
    assert fused.recomputed_tokens == fused.context_tokens - fused.exact_tokens
    diff = (fused.logits - full.logits).abs().max().item()
    assert diff < 1e-3, diff
    # and the whole KV buffer matches, layer by layer
    for i in range(generator.runner.spec.num_layers):
        k1, v1 = fused.cache.view(i, fused.cache.length)
        k2, v2 = full.cache.view(i, full.cache.length)
        assert (k1 - k2).abs().max().item() < 1e-3
        assert (v1 - v2).abs().max().item() < 1e-3


def test_exact_prefix_reuse_gives_identical_logits(generator):
    # one chunk right after the system prefix: its stored KV is exactly full prefill's
    chunks = _chunks(generator, 1)
    q = "What is pass?"
    full, _ = generator.prefill(q, chunks, use_cache=False)
    generator.prefill(q, chunks)
    reused, info = generator.prefill(q, chunks, recompute_ratio=0.0)
    assert info["hits"] == 1
    assert reused.exact_tokens == reused.context_tokens
    assert (reused.logits - full.logits).abs().max().item() < 1e-4
    assert int(reused.logits.argmax()) == int(full.logits.argmax())


def test_r1_greedy_text_equals_full_prefill(generator):
    chunks = _chunks(generator, 3)
    q = "Which statement does nothing?"
    full = generator.generate(q, chunks, max_new_tokens=12, use_cache=False)
    generator.generate(q, chunks, max_new_tokens=1)
    blended = generator.generate(q, chunks, max_new_tokens=12, recompute_ratio=1.0)
    assert blended.cache_hits == 3
    assert blended.token_ids == full.token_ids


def test_missing_chunk_is_computed_and_reuse_continues(generator):
    chunks = _chunks(generator, 3)
    q = "What does break do?"
    # cache only chunks 0 and 2; chunk 1 is missing
    generator.prefill(q, [chunks[0]])
    generator.prefill(q, [chunks[2]])
    fused, info = generator.prefill(q, chunks, recompute_ratio=0.0)
    assert info["hits"] == 2 and info["misses"] == 1
    assert fused.reused_tokens > 0
    again, info2 = generator.prefill(q, chunks, recompute_ratio=0.0)
    assert info2["hits"] == 3 and info2["misses"] == 0
    assert torch.allclose(again.logits, fused.logits, atol=1e-4)


def test_chunk_key_depends_on_content_and_tenant(generator):
    a = generator.chunk_key_for("alpha beta")
    assert a == generator.chunk_key_for("alpha beta")
    assert a != generator.chunk_key_for("alpha beta.")
    assert a != generator.chunk_key_for("alpha beta", tenant="t2")


def test_a_miss_is_looked_up_once(generator):
    generator.prefill("What is pass?", ["The pass statement does nothing."])
    assert generator.store.counters["miss"] == 1 and generator.store.counters["put"] == 1
