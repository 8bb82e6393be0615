"""The control plane's routing policy (least expected work, host-tier misses priced in) and its
PCR look-ahead (route at `queued`, prefetch there, release what a request that never ran holds).
No vLLM: the pool's HTTP calls are replaced by a recorder."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence

import pytest

from daser_rag.control.lookahead import InstanceLookAhead
from daser_rag.control.pool import InstancePool
from daser_rag.control.routing import DocumentAware, InstanceState, RoundRobin, make_router


def inst(name: str, keys: Sequence[str] = (), *, waiting: int = 0, waiting_tokens: int = 0,
         decoding: int = 0) -> InstanceState:
    s = InstanceState(f"http://{name}", name, inflight=waiting + decoding, prefilling=waiting,
                      prefill_tokens=waiting_tokens)
    s.remember(keys)
    return s


def test_cost_is_queued_tokens_plus_priced_misses():
    r = DocumentAware(miss_tokens=64, decode_tokens=16)
    assert r.miss_tokens == 64
    a, b = inst("a", ["k1", "k2", "k3"]), inst("b", ["k9"])
    assert r.cost(a, ["k1", "k2", "k3"], 100) == 100 and r.cost(b, ["k1", "k2", "k3"], 100) == 100 + 3 * 64
    assert r.choose([a, b], ["k1", "k2", "k3"], 100) is a  # equal load: the holder
    a.inflight = a.prefilling = 2
    a.prefill_tokens = 400  # two prefills of 200 tokens wait there: 400 > 3 misses (192)
    assert r.choose([a, b], ["k1", "k2", "k3"], 100) is b
    a2 = inst("a2", ["k1", "k2", "k3"], decoding=5)  # decoding requests weigh 16 tokens each: 80 < 192
    assert r.choose([a2, b], ["k1", "k2", "k3"], 100) is a2
    cold = [inst("x"), inst("y")]
    # idle and cold: each chunk set goes to its owner (rendezvous hash), so the corpus partitions
    assert {r.choose(cold, [f"new{i}"]).name for i in range(16)} == {"x", "y"}
    assert len({r.choose(cold, ["new3"]).name for _ in range(4)}) == 1
    with pytest.raises(ValueError):
        DocumentAware(miss_tokens=-1)


class HitFirst:
    """The previous policy (hit share - 0.25 per in-flight request), kept here as the baseline."""

    name = "hit_first"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: Sequence[InstanceState], keys: Sequence[str], tokens: int = 0, path=None,
               cached_tokens: int = 0) -> InstanceState:
        turn, n = next(self._next), len(candidates)

        def score(i: int) -> tuple[float, int, int]:
            c = candidates[i]
            return (c.holds(keys) / len(keys) - 0.25 * c.inflight, -c.inflight, -((i - turn) % n))

        return candidates[max(range(n), key=score)]


def simulate(router, *, n: int = 400, gap: float = 180.0, seed: int = 7, host_keys: int = 6, tokens: int = 250,
             miss: int = 32) -> tuple[float, float]:
    """Two FIFO instances that compute one token per time unit; a request's service is its own
    tokens plus MISS per chunk not in that instance's host tier (a read from Redis). Arrivals
    every `gap`, 80% of them over 3 popular document sets; a host tier holds `host_keys` chunks
    (two of the popular sets). Returns (mean TTFT, hit rate)."""
    rng = random.Random(seed)
    popular = [[f"p{i}-{j}" for j in range(3)] for i in range(3)]
    insts = [InstanceState("http://a", "a", max_keys=host_keys), InstanceState("http://b", "b", max_keys=host_keys)]
    free_at = [0.0, 0.0]
    queue: list[list[tuple[float, int]]] = [[], []]  # per instance: (first-token time, tokens)
    ttfts, held, total = [], 0, 0
    for k in range(n):
        now = k * gap
        for i, s in enumerate(insts):  # requests whose first token came by now leave the queue
            for t, tok in [q for q in queue[i] if q[0] <= now]:
                queue[i].remove((t, tok))
                s.inflight -= 1
                s.prefilling -= 1
                s.prefill_tokens -= tok
        keys = rng.choice(popular) if rng.random() < 0.8 else [f"c{k}-{j}" for j in range(3)]
        s = router.choose(insts, keys, tokens)
        i = insts.index(s)
        h = s.holds(keys)
        held, total = held + h, total + len(keys)
        start = max(now, free_at[i])
        free_at[i] = start + tokens + miss * (len(keys) - h)
        ttfts.append(free_at[i] - now)
        s.inflight += 1
        s.prefilling += 1
        s.prefill_tokens += tokens
        queue[i].append((free_at[i], tokens))
        s.remember(keys)
    return sum(ttfts) / len(ttfts), held / total


def test_least_work_lowers_mean_ttft_where_hit_first_piles_up():
    """The benchmark's failure in miniature (docs/vllm.md: hit rate 0.71 vs 0.55 but mean TTFT
    4.9 s vs 3.8 s): with misses cheap next to queueing (a Redis read instead of host RAM), the
    hit-first score piles popular sets on one instance. Least work is never worse than round
    robin on mean TTFT and better than hit-first; when the deployment is idle it keeps affinity
    (hit rate well above round robin) at hit-first's TTFT (within 1%)."""
    for seed in (1, 7):
        new, old, rr = (simulate(r, gap=180, seed=seed, miss=16) for r in (DocumentAware(16), HitFirst(), RoundRobin()))
        assert new[0] <= rr[0] < old[0], (new, rr, old)
        new, old, rr = (simulate(r, gap=400, seed=seed, miss=16) for r in (DocumentAware(16), HitFirst(), RoundRobin()))
        assert new[0] < rr[0] and new[0] <= 1.01 * old[0] and new[1] > rr[1] + 0.2, (new, rr, old)


def test_pool_counts_queued_work_until_the_first_token():
    pool = InstancePool(["http://127.0.0.1:9", "http://127.0.0.1:10"], make_router("documents"))
    try:
        a = pool.acquire(["k1"], tokens=300)
        assert (a.inflight, a.prefilling, a.prefill_tokens) == (1, 1, 300)
        b = pool.acquire(["k1"], tokens=300)  # the other one: 300 queued tokens outweigh one miss
        assert b is not a
        pool.first_token(a, 300)
        assert (a.inflight, a.prefilling, a.prefill_tokens, a.decoding) == (1, 0, 0, 1)
        pool.release(a, ["k1"], tokens=300, prefilling=False)
        pool.release(b, tokens=300)  # failed before its first token: its work is given back here
        assert [(i.inflight, i.prefilling, i.prefill_tokens) for i in pool.instances] == [(0, 0, 0)] * 2
        assert pool.snapshot()[0]["prefill_tokens"] == 0
    finally:
        pool.close()


def test_lookahead_routes_at_queue_time_prefetches_and_releases():
    pool = InstancePool(["http://127.0.0.1:9", "http://127.0.0.1:10"], make_router("documents"))
    sent: list[tuple[str, dict]] = []
    la = InstanceLookAhead(pool, lambda i, params: sent.append((i.url, params)), window=1, ttl_s=30, delay_s=0)
    la._messages.shutdown(wait=True)  # run messages inline, in order, for the test

    class Inline:
        def submit(self, fn):
            fn()

    la._messages = Inline()  # type: ignore[assignment]
    try:
        res = la.queued("r1", ["k1", "k2"], 200)
        assert res is not None and res.prefetched and res.inst.prefill_tokens == 200
        assert sent == [(res.inst.url, {"daser": {"prefetch": {"id": "r1", "keys": ["k1", "k2"], "ttl_s": 30.0}}})]
        # the window (1 outstanding prefetch per instance) holds for the same instance
        res.inst.remember(["k1", "k2"])
        other = pool.instances[1] if res.inst is pool.instances[0] else pool.instances[0]
        other.disabled = "test"  # only r1's instance is usable
        r2 = la.queued("r2", ["k1", "k2"], 10)
        assert r2 is not None and r2.inst is res.inst and not r2.prefetched and len(sent) == 1
        other.disabled = None
        # r1 runs in this thread: take() gives the reservation (same instance, prefetch id)
        la.started("r1")
        rid, taken = la.take()
        assert rid == "r1" and taken is res and la.take() is None  # taken once
        la.served("r1")
        la.finished("r1")
        assert len(sent) == 1  # served there: the connector released the pin itself
        # r2 and r3 are cancelled before they run: their queued work and r3's pin are given back
        la.finished("r2")
        r3 = la.queued("r3", ["k7"], 50)
        assert r3 is not None and r3.prefetched
        la.finished("r3")
        assert sent[-1] == (r3.inst.url, {"daser": {"release": "r3"}})
        assert sum(i.prefill_tokens for i in pool.instances) == 200  # r1's (the engine releases it after its run)
        assert sum(i.inflight for i in pool.instances) == 1
        assert la.stats()["reserved_now"] == 0
    finally:
        pool.close()


def test_a_request_that_starts_at_once_gets_no_prefetch_message():
    """The message matters only for a request that waits at the control plane; one that starts
    at once reaches vLLM and prefetches its own chunks on arrival (no extra request)."""
    pool = InstancePool(["http://127.0.0.1:9"], make_router("documents"))
    sent: list[dict] = []
    la = InstanceLookAhead(pool, lambda i, params: sent.append(params), window=4, ttl_s=30, delay_s=0.2)
    try:
        la.queued("fast", ["k1"], 10)
        la.started("fast")
        rid, res = la.take()
        assert rid == "fast" and not res.prefetched
        la.queued("slow", ["k2"], 10)  # still waiting when its delay is over: the message goes out
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sent == [{"daser": {"prefetch": {"id": "slow", "keys": ["k2"], "ttl_s": 30.0}}}]
        assert la.stats()["started_first"] == 1 and la.stats()["prefetch_sent"] == 1
        la.finished("slow")  # never ran: its pin is released
        deadline = time.monotonic() + 5
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sent[-1] == {"daser": {"release": "slow"}}
    finally:
        la.close()
        pool.close()


def test_a_repeated_ordered_path_goes_where_vllms_prefix_cache_holds_it():
    """The same documents in the same order (another question) reuse vLLM's prefix-cache blocks
    on the instance that ran them (keyed by the plan's salt): there the request computes only its
    question and loads nothing. Least work prices that in, and the pool charges the smaller
    number to that instance's queue."""
    from daser_rag.control.routing import path_id

    r = DocumentAware()
    keys = ["k1", "k2", "k3"]
    path = path_id(keys)
    assert path == path_id(list(keys)) != path_id(["k2", "k1", "k3"]) and path_id([]) is None
    a, b = inst("a", keys), inst("b", keys)
    a.remember_path(path)
    assert r.cost(a, keys, 210, path=path, cached_tokens=180) == 30
    assert r.cost(b, keys, 210, path=path, cached_tokens=180) == 210
    b2 = inst("b2", keys, waiting=1, waiting_tokens=100)
    a.prefill_tokens, a.inflight, a.prefilling = 150, 1, 1  # 150 queued + 30 < 100 + 210
    assert r.choose([a, b2], keys, 210, path, 180) is a
    a.prefill_tokens = 300  # a long queue there outweighs the saving
    assert r.choose([a, b2], keys, 210, path, 180) is b2
    for i in range(40):  # bounded: the oldest paths are forgotten (vLLM evicts them too)
        a.remember_path(f"p{i}")
    assert len(a.paths) == a.max_paths and not a.holds_path(path)
    a.remember_path(path)
    a.forget_all()  # a restarted instance: empty prefix cache
    assert not a.holds_path(path) and not a.holds(keys)

    pool = InstancePool(["http://127.0.0.1:9", "http://127.0.0.1:10"], make_router("documents"))
    try:
        first, charged = pool.acquire_work(keys, tokens=210, path=path, cached_tokens=180)
        assert charged == 210 and first.prefill_tokens == 210
        pool.release(first, keys, tokens=charged, path=path)
        assert first.holds_path(path)
        again, charged = pool.acquire_work(keys, tokens=210, path=path, cached_tokens=180)
        assert again is first and charged == 30 and first.prefill_tokens == 30
        pool.release(again, keys, tokens=charged, path=path)
        assert [(i.inflight, i.prefill_tokens) for i in pool.instances] == [(0, 0)] * 2
    finally:
        pool.close()


def simulate_paths(router, *, n: int = 400, gap: float = 120.0, seed: int = 3, tokens: int = 210,
                   cached: int = 180, repeat: float = 1 / 3) -> float:
    """Two FIFO instances (one token per time unit); a third of the requests repeat an earlier
    request's documents in the same order, which costs only `tokens - cached` on an instance
    whose prefix cache (16 paths) still holds that path. Returns the mean TTFT."""
    from daser_rag.control.routing import path_id

    rng = random.Random(seed)
    insts = [InstanceState("http://a", "a"), InstanceState("http://b", "b")]
    free_at = [0.0, 0.0]
    queue: list[list[tuple[float, int]]] = [[], []]
    seen: list[list[str]] = []
    ttfts = []
    for k in range(n):
        now = k * gap
        for i, s in enumerate(insts):
            for t, tok in [q for q in queue[i] if q[0] <= now]:
                queue[i].remove((t, tok))
                s.inflight -= 1
                s.prefilling -= 1
                s.prefill_tokens -= tok
        keys = list(rng.choice(seen[-10:])) if seen and rng.random() < repeat else rng.sample([f"d{j}" for j in range(16)], 3)
        seen.append(keys)
        path = path_id(keys)
        s = router.choose(insts, keys, tokens, path, cached)
        i = insts.index(s)
        work = tokens - cached if s.holds_path(path) else tokens
        start = max(now, free_at[i])
        free_at[i] = start + work
        ttfts.append(free_at[i] - now)
        s.inflight += 1
        s.prefilling += 1
        s.prefill_tokens += work
        queue[i].append((free_at[i], work))
        s.remember(keys)
        s.remember_path(path)
    return sum(ttfts) / len(ttfts)


def test_path_affinity_lowers_mean_ttft_below_round_robin_on_a_trace_with_repeats():
    """Saturated (a request every 90 units, 210 each, two instances): round robin sends half the
    repeats away from their cached path and its queues grow; least work is >= 15% lower. Lightly
    loaded: no worse. In between (a request every 100-110 units) they are within a few per cent
    either way: a busy instance's queued work counts whole until its first token, so a repeat
    sometimes goes to the idle instance instead of its cached path."""
    for seed in (3, 11):
        for gap in (90.0,):
            new, rr = simulate_paths(DocumentAware(), gap=gap, seed=seed), simulate_paths(RoundRobin(), gap=gap, seed=seed)
            assert new < 0.85 * rr, (gap, seed, new, rr)
        new, rr = simulate_paths(DocumentAware(), gap=200, seed=seed), simulate_paths(RoundRobin(), gap=200, seed=seed)
        assert new <= rr, (seed, new, rr)
