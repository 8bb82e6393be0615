"""The connector worker's prefetch pins (vllm_daser/prefetch.py) and the control messages that
drive them (plan.parse_control), without vLLM: a host tier smaller than the working set, entries
on disk. Runs in the main venv too:
    PYTHONPATH=integrations/vllm-daser python -m pytest integrations/vllm-daser/tests/test_prefetch_pins.py
"""

from __future__ import annotations

import time

import pytest
import torch

from daser_rag.control.wire import plan_params, prefetch_params, release_params
from daser_rag.kv.chunk_kv import ChunkKV
from daser_rag.kv.store import KVStore

plan = pytest.importorskip("vllm_daser.plan")
prefetch = pytest.importorskip("vllm_daser.prefetch")

TOKENS = 64


def entry(key: str) -> ChunkKV:
    g = torch.Generator().manual_seed(hash(key) % 1000)
    return ChunkKV(key=key, token_ids=torch.arange(TOKENS), start_pos=0,
                   keys=torch.randn(2, 2, TOKENS, 8, generator=g), values=torch.randn(2, 2, TOKENS, 8, generator=g))


@pytest.fixture
def store(tmp_path):
    one = KVStore(None, codec="fp32").put(entry("probe")).nbytes  # bytes of one entry
    s = KVStore(tmp_path, codec="fp32", host_bytes=int(2.5 * one))  # host RAM holds 2 of the 6 entries
    for i in range(6):
        s.put(entry(f"k{i}"))
    assert not s.in_host("k0") and not s.in_host("k1") and s.in_host("k5")  # evicted to disk
    return s


def wait_in_host(store: KVStore, keys: list[str], timeout: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(store.in_host(k) for k in keys):
            return True
        time.sleep(0.01)
    return False


def test_prefetch_loads_into_host_and_pins_against_eviction(store):
    hp = prefetch.HostPrefetch(store, max_requests=4, max_bytes=1 << 30, ttl_s=60)
    try:
        assert hp.add("r1", ["k0", "k1"])
        assert wait_in_host(store, ["k0", "k1"])
        snap = hp.snapshot()
        assert snap.pins == {"r1": {"keys": 2, "in_host": 2}} and snap.pinned_requests == 1
        assert snap.max_bytes == store.host.capacity_bytes  # never more than the tier
        # other traffic does not evict the pinned entries (the tier refuses instead)
        for k in ("k2", "k3", "k4"):
            store.get(k)
        assert store.in_host("k0") and store.in_host("k1")
        hits = store.counters["hit_host"]
        store.get("k0")
        store.get("k1")
        assert store.counters["hit_host"] == hits + 2  # the request's own load comes from RAM
        assert hp.claim("r1") and hp.release("r1", used=True)
        assert store.protected_keys() == [] and hp.snapshot().counters["claimed"] == 1
    finally:
        hp.close()


def test_cancelled_prefetch_releases_its_pins(store):
    hp = prefetch.HostPrefetch(store, max_requests=4, max_bytes=1 << 30, ttl_s=60)
    try:
        assert hp.add("gone", ["k0", "k1"]) and wait_in_host(store, ["k0", "k1"])
        assert sorted(store.protected_keys()) == ["k0", "k1"]
        assert hp.release("gone")
        assert store.protected_keys() == [] and hp.snapshot().pinned_requests == 0
        assert hp.snapshot().counters == {"requested": 1, "refused": 0, "claimed": 0, "released": 1, "expired": 0,
                                          "late": 0}
        for k in ("k2", "k3", "k4"):  # now evictable again
            store.get(k)
        assert not store.in_host("k0") and not store.in_host("k1")
        assert not hp.release("gone")  # idempotent
    finally:
        hp.close()


def test_a_message_after_its_request_pins_nothing(store):
    """The prefetch message and its request travel separately; when the request has already
    loaded (or a release came first), the late message is refused instead of pinning for the ttl."""
    hp = prefetch.HostPrefetch(store, max_requests=4, max_bytes=1 << 30, ttl_s=60)
    try:
        assert not hp.claim("r1") and not hp.release("r1", used=True)  # the request loaded by itself
        assert not hp.add("r1", ["k0"])
        assert not hp.release("r2")  # the control plane's release came first
        assert not hp.add("r2", ["k1"])
        snap = hp.snapshot()
        assert snap.counters["late"] == 2 and snap.pinned_requests == 0 and store.protected_keys() == []
    finally:
        hp.close()


def test_pins_are_bounded_in_count_bytes_and_time(store):
    now = [0.0]
    hp = prefetch.HostPrefetch(store, max_requests=2, max_bytes=1 << 30, ttl_s=5, clock=lambda: now[0])
    try:
        assert hp.add("a", ["k0"]) and hp.add("b", ["k1"])
        assert not hp.add("c", ["k2"])  # a third pin: refused at the count bound
        assert hp.snapshot().counters["refused"] == 1
        now[0] = 6.0  # past the ttl: both pins end
        assert hp.expire() == 2 and store.protected_keys() == []
        assert hp.snapshot().counters["expired"] == 2
    finally:
        hp.close()
    one = store.get_encoded("k5").nbytes
    hp = prefetch.HostPrefetch(store, max_requests=8, max_bytes=int(1.5 * one), ttl_s=60)
    try:
        assert hp.add("a", ["k0"]) and wait_in_host(store, ["k0"])
        hp.release("a")  # the entry size is known from here on
        assert hp.add("b", ["k0"]) and wait_in_host(store, ["k0"])
        assert not hp.add("c", ["k1"])  # one more entry would pass max_bytes
        assert hp.snapshot().counters["refused"] == 1
    finally:
        hp.close()
    with pytest.raises(ValueError):
        prefetch.HostPrefetch(store, max_requests=-1)


def test_control_messages_parse_and_are_not_plans():
    msg = plan.parse_control(prefetch_params("cmpl-1", ["k0", "k1"], 30))
    assert msg == plan.Control("cmpl-1", ("k0", "k1"), 30.0, None, False)
    assert plan.parse_control(release_params("cmpl-1")) == plan.Control(release="cmpl-1")
    assert plan.parse_control({"daser": {"stats": True}}).stats
    assert plan.parse_control(plan_params([("k0", 4)])) is None
    p = plan.parse_plan(prefetch_params("cmpl-1", ["k0"]), 1)
    assert p is not None and p.segments == () and not p.save  # loads and saves nothing
    assert plan.parse_plan(plan_params([("k0", 4)], prefetch_id="cmpl-1"), 8).prefetch_id == "cmpl-1"
    for bad in ({"daser": {"prefetch": {"keys": ["k"]}}}, {"daser": {"prefetch": {"id": "x", "keys": "k"}}},
                {"daser": {"prefetch": {"id": "x", "keys": ["../k"]}}},
                {"daser": {"prefetch": {"id": "x", "keys": ["k"], "ttl_s": -1}}}, {"daser": {"release": 3}}):
        with pytest.raises(plan.PlanError):
            plan.parse_control(bad)
    with pytest.raises(plan.PlanError):
        plan.parse_plan({"daser": {"segments": [["k0", 4]], "prefetch_id": 7}}, 8)
