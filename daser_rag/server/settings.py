"""Service settings: the limits (each with its default) and the one `serve` argument parser,
shared by `python -m daser_rag.server` and `daser-rag serve`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daser_rag import settings as s
from daser_rag.kv.shared import DEFAULT_REDIS_TTL_S
from daser_rag.settings import add_option



@dataclass
class Limits:
    """What one client, key or request may take. Each default (and its meaning) is declared in
    daser_rag/settings.py, section "limits"; docs/service.md lists each with what a client sees
    when it is hit."""

    max_body_bytes: int = s.LIMIT_MAX_BODY_BYTES.default
    body_timeout_s: float = s.LIMIT_BODY_TIMEOUT.default
    max_new_tokens: int = s.LIMIT_MAX_NEW_TOKENS.default
    default_max_tokens: int = s.MAX_NEW_TOKENS.default
    """`max_tokens` when a request names none."""
    max_pending: int = s.LIMIT_MAX_PENDING.default
    max_pending_documents: int = s.LIMIT_MAX_PENDING_DOCUMENTS.default
    fair_share: float = s.LIMIT_FAIR_SHARE.default
    queue_timeout_s: float = s.LIMIT_QUEUE_TIMEOUT.default
    request_timeout_s: float = s.LIMIT_REQUEST_TIMEOUT.default
    max_request_tokens: int = s.LIMIT_MAX_REQUEST_TOKENS.default
    key_tokens_per_minute: int = s.LIMIT_KEY_TOKENS_PER_MINUTE.default
    max_tenants_per_key: int = s.LIMIT_MAX_TENANTS_PER_KEY.default
    protect_metrics: bool = s.LIMIT_PROTECT_METRICS.default
    max_preparing: int = s.LIMIT_MAX_PREPARING.default
    prepare_wait_s: float = s.LIMIT_PREPARE_WAIT.default
    max_large_body_bytes: int = s.LIMIT_MAX_LARGE_BODY_BYTES.default


def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every `serve` option, defined once (both entry points call this); flags, types, defaults,
    environment variables and help texts come from the settings table (daser_rag/settings.py)."""
    setting: s.Setting[Any]
    for setting in (s.HOST, s.PORT, s.MODEL, s.CACHE_DIR, s.REDIS_URL):
        add_option(p, setting)
    add_option(p, s.API_KEYS, action="append", type=str, default=None)  # $DASER_RAG_API_KEYS: serve_kwargs
    add_option(p, s.TENANT)
    add_option(p, s.CODEC)
    add_option(p, s.RECOMPUTE_RATIO, default=None,
               help=f"{s.RECOMPUTE_RATIO.help} (default: the engine's, {s.RECOMPUTE_RATIO.default})")
    for setting in (s.CHUNK_TOKENS, s.HOST_BYTES, s.DISK_BYTES, s.REDIS_TTL, s.GC_INTERVAL, s.GC_IDLE,
                    s.LIMIT_MAX_PENDING, s.LIMIT_MAX_PENDING_DOCUMENTS, s.LIMIT_FAIR_SHARE, s.LIMIT_QUEUE_TIMEOUT,
                    s.LIMIT_REQUEST_TIMEOUT, s.LIMIT_MAX_NEW_TOKENS, s.LIMIT_MAX_BODY_BYTES,
                    s.LIMIT_MAX_REQUEST_TOKENS, s.LIMIT_KEY_TOKENS_PER_MINUTE, s.LIMIT_MAX_TENANTS_PER_KEY,
                    s.LIMIT_PROTECT_METRICS, s.LIMIT_MAX_PREPARING, s.LIMIT_PREPARE_WAIT,
                    s.LIMIT_MAX_LARGE_BODY_BYTES, s.TIMEOUT_KEEP_ALIVE, s.HEADER_TIMEOUT, s.LIMIT_CONCURRENCY,
                    s.LOG_LEVEL):
        add_option(p, setting)
    g = p.add_argument_group("engine", "which engine generates: daser's own (embedded, default) or vLLM instances "
                             "behind this service as control plane (docs/vllm.md)")
    add_option(g, s.ENGINE)
    add_option(g, s.VLLM_URLS, action="append", type=str, metavar="URL")
    add_option(g, s.VLLM_SPAWN, metavar="N")
    add_option(g, s.VLLM_PYTHON)
    add_option(g, s.VLLM_DTYPE)
    add_option(g, s.VLLM_CPU_BIND)
    g.add_argument("--print-vllm-config", action="store_true",
                   help="print what a `vllm serve` you run yourself needs (its --kv-transfer-config for this "
                        "--redis-url and model, environment, flags) and exit")
    add_option(g, s.VLLM_ROUTER)
    add_option(g, s.PREFETCH_WINDOW)
    add_option(g, s.PREFIX_TREE)
    add_option(g, s.PREFIX_TREE_AFTER)
    add_option(g, s.SELECTOR, default=None,
               help=f"{s.SELECTOR.help} (default: {s.SELECTOR.default} on daser's engine, "
                    f"{s.VLLM_SELECTOR.default} on vLLM)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daser_rag.server", description="Run the daser-rag KV cache service.")
    return add_serve_arguments(p).parse_args(argv)


def serve_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """`serve(**serve_kwargs(args))` for arguments parsed by `add_serve_arguments`."""
    keys = a.api_key or s.API_KEYS.value() or None
    limits = Limits(max_body_bytes=a.max_body_bytes, max_new_tokens=a.max_new_tokens, max_pending=a.max_pending,
                    max_pending_documents=a.max_pending_documents, fair_share=a.fair_share,
                    queue_timeout_s=a.queue_timeout, request_timeout_s=a.request_timeout,
                    max_request_tokens=a.max_request_tokens, key_tokens_per_minute=a.key_tokens_per_minute,
                    max_tenants_per_key=a.max_tenants_per_key, protect_metrics=a.protect_metrics,
                    max_preparing=a.max_preparing, prepare_wait_s=a.prepare_wait,
                    max_large_body_bytes=a.max_large_body_bytes)
    return dict(host=a.host, port=a.port, model=a.model, cache_dir=a.cache_dir, redis_url=a.redis_url,
                api_keys=keys, default_tenant=a.tenant, codec=a.codec, recompute_ratio=a.recompute_ratio,
                chunk_tokens=a.chunk_tokens, host_bytes=a.host_bytes, disk_bytes=a.disk_bytes,
                redis_ttl_s=a.redis_ttl or None, gc_interval_s=a.gc_interval, gc_idle_s=a.gc_idle,
                limits=limits, log_level=a.log_level, timeout_keep_alive=a.timeout_keep_alive,
                header_timeout_s=a.header_timeout,
                limit_concurrency=a.limit_concurrency, engine=a.engine, vllm_urls=list(a.vllm_url),
                vllm_spawn=a.vllm_spawn, vllm_python=a.vllm_python, vllm_dtype=a.vllm_dtype, router=a.router,
                selector=a.selector, **({"prefetch_window": a.prefetch_window, "prefix_tree": a.prefix_tree,
                   "prefix_tree_after": a.prefix_tree_after} if a.engine == "daser" else
                   {"prefetch_window": a.prefetch_window, "cpu_bind": a.vllm_cpu_bind}))


__all__ = ["DEFAULT_REDIS_TTL_S", "Limits", "add_serve_arguments", "parse_args",
           "serve_kwargs"]
