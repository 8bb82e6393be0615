"""Calibrations the vLLM plans name by digest reach every instance through the shared Redis, not
only through a shared disk: the control plane publishes the file in its store directory and in
Redis; a connector verifies it (made for the model, checksum, digest) before any plan claims
re-positioned KV, fetching it from Redis when its own directory lacks it or holds a damaged copy.
A damaged Redis copy is never written or used. Real redis-server, no model weights needed beyond
the tokenizer-sized fixtures."""

from __future__ import annotations

import logging

import pytest

from daser_rag.server.testing import RedisServer, free_port, redis_server_path
from tests.test_calibration import _random_calibration

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as srv:
        yield srv


def _damage(path):
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_published_calibration_reaches_another_host_through_redis(generator, redis_server, tmp_path, caplog):
    from daser_rag.calibration import storage
    from daser_rag.calibration.storage import CalibrationFileError, published_path, read_published
    from daser_rag.kv.tiers.redis import RedisLink

    link = RedisLink(redis_server.url, namespace="pub")
    cal = _random_calibration(generator, link_tokens=0)
    digest, fp = cal.digest(), generator.fingerprint
    storage.publish(cal, tmp_path / "plane", link)
    assert published_path(tmp_path / "plane", digest).is_file()
    # another host: nothing on its disk, fetched from Redis, verified, written for its workers
    host = tmp_path / "host"
    assert read_published(host, digest, fingerprint=fp, link=link).digest() == digest
    assert published_path(host, digest).is_file()
    assert not list(published_path(host, digest).parent.glob("*.tmp"))
    # a damaged local copy is replaced from Redis; without Redis it is refused, never used
    _damage(published_path(host, digest))
    with pytest.raises(CalibrationFileError, match="checksum|corrupt"):
        read_published(host, digest, fingerprint=fp)
    assert read_published(host, digest, fingerprint=fp, link=link).digest() == digest
    assert storage.load_published(host, digest, fingerprint=fp, layers=generator.runner.spec.num_layers,
                                  kv_heads=generator.runner.spec.num_kv_heads,
                                  head_dim=generator.runner.spec.head_dim).digest() == digest
    # another model, or a digest published nowhere: refused with the reason
    with pytest.raises(CalibrationFileError, match="made for model"):
        read_published(host, digest, fingerprint="f" * 32, link=link)
    with pytest.raises(CalibrationFileError, match="nor is it published in Redis"):
        read_published(host, "0" * 32, fingerprint=fp, link=link)
    # a damaged Redis copy: refused, and nothing written
    other = tmp_path / "other"
    blob = bytearray(link.run(lambda c: c.get(link.key("calibration", digest))))
    blob[-9] ^= 0xFF
    link.run(lambda c: c.set(link.key("calibration", digest), bytes(blob)))
    with pytest.raises(CalibrationFileError, match="Redis copy is unusable"):
        read_published(other, digest, fingerprint=fp, link=link)
    assert not published_path(other, digest).exists()
    assert not list(published_path(other, digest).parent.glob("*.tmp"))
    # publishing again repairs Redis (and a damaged local file)
    _damage(published_path(tmp_path / "plane", digest))
    storage.publish(cal, tmp_path / "plane", link)
    assert read_published(other, digest, fingerprint=fp, link=link).digest() == digest
    assert read_published(tmp_path / "plane", digest, fingerprint=fp).digest() == digest
    # Redis away: publishing still writes the file (and says Redis missed it); reading says why
    dead = RedisLink(f"redis://127.0.0.1:{free_port()}/0", namespace="pub")
    fresh = _random_calibration(generator, link_tokens=0, seed=3)
    with caplog.at_level(logging.WARNING):
        path = storage.publish(fresh, tmp_path / "plane", dead)
    assert path.is_file() and "not published to Redis" in caplog.text
    with pytest.raises(CalibrationFileError, match="Redis could not be asked"):
        read_published(tmp_path / "nowhere", fresh.digest(), fingerprint=fp, link=dead)


def test_planner_publishes_token_maps_to_the_shared_redis(generator, redis_server, tmp_path):
    from daser_rag.context import SHARED_TENANT
    from daser_rag.control.planner import Planner
    from daser_rag.kv.shared import open_store

    store = open_store(tmp_path / "plane", redis_url=redis_server.url, namespace="planner")
    gen = generator
    planner = Planner(gen.tokenizer, gen.fingerprint, store, context_window=gen.context_window,
                      chunk_tokens=gen.ingestor.chunk_tokens, prompt=gen.prompt)
    cal = _random_calibration(gen, link_tokens=0)
    plan = planner.reuse("Q?", ["Alpha text about bees.", "Beta text about wasps."], tenant=SHARED_TENANT,
                         calibration=cal)
    assert plan.kv_transfer_params["daser"]["token_map"] == cal.digest()
    link = store.remote.link
    assert link.run(lambda c: c.exists(link.key("calibration", cal.digest()))) == 1
