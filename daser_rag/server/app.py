"""The HTTP service: OpenAI-compatible completions with document refs, a document API,
/health and /metrics.

Layout: `settings` (limits, the serve CLI), `schemas` (request bodies, strict validation),
`service` (state and request logic), `routes` (HTTP endpoints), `openai` (response shaping),
`admission` (limiters, the model gate), `middleware` (body limits, counting), `errors`.

One model, one lock: model work runs in the model gate's own threads, admitted per kind of
work with a per-key fair share, so the event loop and its thread pool stay free for /health,
/metrics and reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from daser_rag import settings as s
from daser_rag.context import SHARED_TENANT
from daser_rag.engine.protocol import Engine
from daser_rag.server.errors import install_handlers
from daser_rag.server.middleware import Guard
from daser_rag.server.chunk_routes import router as chunk_router
from daser_rag.server.routes import router
from daser_rag.server.service import Service
from daser_rag.server.settings import DEFAULT_REDIS_TTL_S, Limits

if TYPE_CHECKING:
    from daser_rag.kv.store import KVStore

log = logging.getLogger("daser_rag.server")

__all__ = ["Limits", "build_generator", "create_app", "serve"]


def create_app(
    engine: Engine,
    *,
    api_keys: Sequence[str] | None = None,
    limits: Limits | None = None,
    model_name: str | None = None,
    default_tenant: str = SHARED_TENANT,
) -> FastAPI:
    """An ASGI app around one engine (daser's own `CacheAwareGenerator`, or the vLLM control plane)."""
    svc = Service(engine, api_keys=api_keys, limits=limits, model_name=model_name, default_tenant=default_tenant)
    _ = svc.lanes  # built now, not racily on a first request
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("daser-rag")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        ver = "0"
    app = FastAPI(title="daser-rag", version=ver, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, limit=svc.limits.max_body_bytes, body_timeout_s=svc.limits.body_timeout_s,
                       requests=svc.metrics.requests, large_bytes=svc.limits.max_large_body_bytes)
    install_handlers(app)
    app.include_router(router)
    app.include_router(chunk_router)
    app.state.service = svc
    app.state.engine = engine
    app.state.metrics = svc.metrics
    return app


def build_generator(
    model: str | None = None,
    cache_dir: str | None = None,
    redis_url: str | None = None,
    *,
    codec: str = s.CODEC.default,
    namespace: str | None = None,
    host_bytes: int | None = None,
    disk_bytes: int | None = None,
    redis_ttl_s: float | None = DEFAULT_REDIS_TTL_S,
    **generator_kw: Any,
) -> Any:
    """A CacheAwareGenerator whose store adds the shared Redis tier and document index."""
    from daser_rag.engine.factory import build_generator as compose
    from daser_rag.kv.shared import default_namespace, open_store
    from daser_rag.kv.store import default_cache_dir
    from daser_rag.model.loader import load_model

    lm = load_model(model)
    store = open_store(Path(cache_dir) if cache_dir else default_cache_dir(), redis_url=redis_url,
                       namespace=namespace or default_namespace(lm.fingerprint), redis_ttl_s=redis_ttl_s,
                       codec=codec, host_bytes=host_bytes or s.HOST_BYTES.default,
                       disk_bytes=disk_bytes or s.DISK_BYTES.default)
    return compose(lm, store=store, **generator_kw)


def http_protocol(header_timeout_s: float) -> Any:
    """uvicorn's h11 protocol with a request-head deadline (or "auto" if uvicorn changed)."""
    try:
        from daser_rag.server.protocol import timed_h11

        return timed_h11(header_timeout_s)
    except Exception as exc:  # pragma: no cover - depends on uvicorn's internals
        log.warning("request-head timeout unavailable with this uvicorn: %s", exc)
        return "auto"


def _collect_garbage(store: KVStore, interval_s: float, idle_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            n = len(store.collect_garbage(idle_s))
            if n:
                log.info("garbage collection dropped %d idle unreferenced KV entries", n)
        except Exception as exc:  # never kills the service
            log.warning("garbage collection failed: %s", exc)


def serve(
    host: str = s.HOST.default,
    port: int = s.PORT.default,
    *,
    model: str | None = s.MODEL.default,
    cache_dir: str | None = s.CACHE_DIR.default,
    redis_url: str | None = s.REDIS_URL.default,
    api_keys: list[str] | None = s.API_KEYS.default,
    default_tenant: str = s.TENANT.default,
    codec: str = s.CODEC.default,
    recompute_ratio: float | str | None = None,
    selector: str | None = None,
    chunk_tokens: int = s.CHUNK_TOKENS.default,
    host_bytes: int | None = None,
    disk_bytes: int | None = None,
    redis_ttl_s: float | None = DEFAULT_REDIS_TTL_S,
    gc_interval_s: float = s.GC_INTERVAL.default,
    gc_idle_s: float = s.GC_IDLE.default,
    limits: Limits | None = None,
    log_level: str = s.LOG_LEVEL.default,
    timeout_keep_alive: float = s.TIMEOUT_KEEP_ALIVE.default,
    limit_concurrency: int | None = s.LIMIT_CONCURRENCY.default,
    header_timeout_s: float = s.HEADER_TIMEOUT.default,
    engine: str = s.ENGINE.default,
    vllm_urls: Sequence[str] = (),
    vllm_spawn: int = s.VLLM_SPAWN.default,
    vllm_python: str | None = s.VLLM_PYTHON.default,
    vllm_dtype: str = s.VLLM_DTYPE.default,
    router: str = s.VLLM_ROUTER.default,
    **kw: Any,
) -> None:
    """Run the service until interrupted (`daser-rag serve` / `python -m daser_rag.server`).

    `engine="daser"`: daser's own engine in this process. `engine="vllm"`: this process is the
    control plane in front of `vllm_urls` and `vllm_spawn` new `vllm serve` processes (it loads
    no weights; Redis is required)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    blend: dict[str, Any] = {}
    if recompute_ratio is not None:
        blend["recompute_ratio"] = recompute_ratio
    if selector is not None:
        blend["selector"] = selector
    eng: Engine
    if engine == "vllm":
        from daser_rag.control.factory import open_vllm_engine

        eng = open_vllm_engine(model=model, cache_dir=cache_dir, redis_url=redis_url, urls=vllm_urls,
                               spawn=vllm_spawn, vllm_python=vllm_python, dtype=vllm_dtype, router=router,
                               chunk_tokens=chunk_tokens, instance_host_bytes=host_bytes, **blend, **kw)
    elif engine == "daser":
        if vllm_urls or vllm_spawn:
            raise ValueError("--vllm-url / --vllm-spawn need --engine vllm")
        eng = build_generator(model, cache_dir, redis_url, codec=codec, host_bytes=host_bytes,
                              disk_bytes=disk_bytes, redis_ttl_s=redis_ttl_s, chunk_tokens=chunk_tokens, **blend, **kw)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose 'daser' or 'vllm'")
    try:  # finish document updates a crash interrupted (text registered, refs not yet switched)
        for tenant, doc_id in eng.store.repair_documents(lambda text, tenant: eng.chunk_keys(text, tenant)[0]):
            log.warning("repaired the references of document %r (tenant %r) left half-updated by a crash",
                        doc_id, tenant)
    except Exception as exc:  # Redis away at start: the next start repairs
        log.warning("document repair skipped: %s", exc)
    app = create_app(eng, api_keys=api_keys, limits=limits, default_tenant=default_tenant)
    stop = threading.Event()
    if gc_interval_s > 0:
        threading.Thread(target=_collect_garbage, args=(eng.store, gc_interval_s, gc_idle_s, stop),
                         name="daser-gc", daemon=True).start()
    log.info("daser-rag service on http://%s:%d (engine: %s, redis: %s, cache: %s)", host, port, eng.kind,
             redis_url or "off", eng.store.root)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                    timeout_keep_alive=int(timeout_keep_alive), limit_concurrency=limit_concurrency,
                    h11_max_incomplete_event_size=64 * 1024, http=http_protocol(header_timeout_s))
    finally:
        stop.set()
        eng.close()
