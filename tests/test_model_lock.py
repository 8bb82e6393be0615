"""The model lock (engine/model_lock.py): it knows when a request wants the model, and it measures
how long requests waited because background work held the model (what background work costs)."""

from __future__ import annotations

import threading
import time

from daser_rag.engine.model_lock import ModelLock


def _acquire_in_thread(lock: ModelLock) -> tuple[threading.Thread, threading.Event]:
    got = threading.Event()

    def take() -> None:
        with lock:
            got.set()

    t = threading.Thread(target=take)
    t.start()
    return t, got


def test_a_request_blocked_by_background_work_is_measured() -> None:
    lock = ModelLock()
    assert lock.acquire_quietly() and not lock.wanted()  # background work is not demand
    t, got = _acquire_in_thread(lock)
    deadline = time.monotonic() + 5
    while not lock.wanted() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.wanted() and not got.is_set()
    time.sleep(0.1)
    lock.release_quietly()
    t.join(5)
    assert got.is_set()
    w = lock.background_waits
    assert w.count == 1 and 0.09 <= w.max_s < 2.0 and w.total_s == w.max_s


def test_waiting_for_another_request_is_not_charged_to_background_work() -> None:
    lock = ModelLock()
    lock.acquire()  # a request holds the model
    t, got = _acquire_in_thread(lock)
    time.sleep(0.05)
    lock.release()
    t.join(5)
    assert got.is_set() and lock.background_waits.count == 0
    assert lock.acquire_quietly()
    lock.release_quietly()
    with lock:  # free: nothing waited
        pass
    assert lock.background_waits.count == 0


def test_a_request_holding_the_model_counts_as_wanting_it() -> None:
    """A caller that uses the engine directly (no service queue) holds the lock while it computes:
    the model is not idle then, and background work must not treat it as idle (it did: `wanted()`
    only saw waiting threads and queued requests, so background work grabbed the model the moment
    such a request let go, without the idle rule's pause)."""
    lock = ModelLock()
    assert not lock.wanted()
    with lock:
        assert lock.wanted()
        with lock:  # reentrant
            assert lock.wanted()
        assert lock.wanted()
    assert not lock.wanted()
    assert lock.acquire_quietly()
    assert not lock.wanted()  # background work is not demand
    lock.release_quietly()
    assert not lock.wanted()
