"""Request scheduler: FIFO with several requests in flight, look-ahead view and protection."""

from __future__ import annotations

import pytest

from daser_rag.errors import InvalidInputError
from daser_rag.kv.policies import LookAheadLRUPolicy
from daser_rag.scheduler import RequestScheduler
from daser_rag.types import ChunkRef


@pytest.mark.slow  # several seconds: CI's slow step runs it
def test_runs_requests_in_order_and_matches_direct_generation(generator, corpus):
    generator.chunk_tokens = 40
    ctxs = [[ChunkRef(text=generator.split(corpus[i].text)[0])] for i in range(3)]
    direct = generator.generate("What is it about?", ctxs[0], max_new_tokens=3)
    policy = LookAheadLRUPolicy()
    generator.store.host.policy = policy
    with RequestScheduler(generator, concurrency=2) as sched:
        assert policy._next_use is not None  # the policy sees this scheduler's queue
        with generator.lock:
            futs = [sched.submit("What is it about?", c, max_new_tokens=3) for c in ctxs]
            view = sched.next_use()
            for pos, c in enumerate(ctxs):
                for k in generator.plan_keys(c):
                    assert view[k] == pos and generator.store.is_protected(k)
            assert sched.pending() == 3
        results = [f.result(timeout=300) for f in futs]
    assert [r.started for r in results] == sorted(r.started for r in results)  # FIFO
    assert results[0].result.token_ids == direct.token_ids
    assert all(r.ttft_s >= r.result.timings.ttft_s > 0 for r in results)
    assert not generator.store.protected_keys()


def test_errors_reach_the_future_and_release_protection(generator):
    sched = RequestScheduler(generator, concurrency=1)
    try:
        with pytest.raises(InvalidInputError):
            sched.submit("   ")
        fut = sched.submit("hi", ["context"], max_new_tokens=0)  # invalid: fails at run time
        with pytest.raises(InvalidInputError, match="max_new_tokens"):
            fut.result(timeout=120)
        sched.drain(timeout=60)
        assert not generator.store.protected_keys()
    finally:
        sched.close()
