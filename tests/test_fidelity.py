"""Blending must measurably beat full reuse on real text, and r=1 must match full prefill.

20 multi-chunk prompts from the Python Language Reference; each mode is teacher-forced along
full prefill's greedy continuation and compared token by token (see daser_rag/evaluation.py).
"""

import pytest


@pytest.fixture(scope="module")
def fidelity(lm, tmp_path_factory):
    from daser_rag.evaluation import fidelity_prompts, measure_fidelity
    from daser_rag.generate import CacheAwareGenerator
    from daser_rag.kv.store import KVStore

    gen = CacheAwareGenerator(lm, store=KVStore(tmp_path_factory.mktemp("fid"), codec="fp32"), chunk_tokens=128)
    prompts = fidelity_prompts(gen, n=20, chunks_per_prompt=4)
    assert len(prompts) == 20 and all(len(c) >= 3 for _, c in prompts)
    return measure_fidelity(gen, prompts, [0.0, 0.15, 1.0], steps=6)


def test_blending_beats_full_reuse(fidelity, record_property):
    reuse, blend, exact = fidelity[0.0], fidelity[0.15], fidelity[1.0]
    summary = (f"top-1 agreement with full prefill: r=0 {reuse.top1:.3f}, r=0.15 {blend.top1:.3f}, r=1 {exact.top1:.3f}; "
               f"mean KL: r=0 {reuse.mean_kl:.4f}, r=0.15 {blend.mean_kl:.4f}, r=1 {exact.mean_kl:.2e} "
               f"({blend.total} steps over {blend.prompts} prompts)")
    print("\n" + summary)
    record_property("fidelity", summary)
    assert blend.total >= 100
    assert exact.top1 == 1.0 and exact.mean_kl < 1e-4
    assert blend.top1 > reuse.top1
    assert blend.mean_kl < 0.85 * reuse.mean_kl
