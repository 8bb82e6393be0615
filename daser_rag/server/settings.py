"""Service settings: the limits (each with its default) and the one `serve` argument parser,
shared by `python -m daser_rag.server` and `daser-rag serve`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daser_rag.params import DEFAULT_MAX_NEW_TOKENS
from daser_rag.kv import DEFAULT_PREFETCH_WINDOW
from daser_rag.kv.shared import DEFAULT_REDIS_TTL_S



@dataclass
class Limits:
    """What one client, key or request may take. docs/service.md lists each with what a client
    sees when it is hit."""

    max_body_bytes: int = 8 << 20
    """Request body size (413 before the body is read; 411 without a Content-Length)."""
    body_timeout_s: float = 30.0
    """Time to receive a whole request body (408)."""
    max_new_tokens: int = 512
    """Tokens one completion may generate (400)."""
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """`max_tokens` when a request names none."""
    max_pending: int = 16
    """Completion requests admitted at once, waiting included (429 `overloaded`)."""
    max_pending_documents: int = 8
    """Model-bound document requests (add, update, delete) admitted at once (429 `overloaded`)."""
    fair_share: float = 0.5
    """Share of a limiter's slots one API key (or, without keys, one tenant) may hold (429 `fair_share`)."""
    queue_timeout_s: float = 30.0
    """Longest an admitted request waits for the model (503 `queue_timeout`)."""
    request_timeout_s: float = 300.0
    """Longest a generation may run, queueing included (504 `deadline_exceeded`)."""
    max_request_tokens: int = 32_768
    """Tokens of new text one request may ask the model to compute: ingested documents, inline
    context texts and the prompt (413 `too_many_tokens`, before anything is registered)."""
    key_tokens_per_minute: int = 262_144
    """Tokens of new text per API key (or tenant, without keys) per rolling minute (429 `token_budget`)."""
    max_tenants_per_key: int = 256
    """Distinct tenant names one API key (or the open service) may use in this process (403 `tenant_limit`)."""
    protect_metrics: bool = False
    """Require an API key for /metrics (when keys are configured)."""
    max_preparing: int = 2
    """CPU lanes for request preparation: parsing bodies over 64 KiB, counting tokens, /v1/split.
    One key (or tenant, without keys) holds at most its fair share of them; others wait."""
    prepare_wait_s: float = 10.0
    """Longest a request waits for a preparation lane (503 `busy_preparing`)."""
    max_large_body_bytes: int = 64 << 20
    """Bytes of large request bodies (1 MiB and over) being received and prepared at once; a large
    body that would pass it is refused before it is read (503 `busy_large_bodies`), so a burst of
    big uploads cannot hold more than this in memory."""




def add_serve_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every `serve` option, defined once (both entry points call this)."""
    from daser_rag.kv import DEFAULT_DISK_BYTES, DEFAULT_HOST_BYTES

    d = Limits()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="HF model dir or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="local KV cache + document index mirror")
    p.add_argument("--redis-url", default=os.environ.get("DASER_RAG_REDIS_URL"),
                   help="shared tier, e.g. redis://127.0.0.1:6379/0 (default: $DASER_RAG_REDIS_URL)")
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; default: $DASER_RAG_API_KEYS, comma-separated)")
    p.add_argument("--tenant", default="", help="tenant of requests that name none")
    p.add_argument("--codec", default="fp16", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
    p.add_argument("--recompute-ratio", type=_ratio, default=None,
                   help="share of re-positioned tokens recomputed, in [0, 1], or 'auto' (default: the engine's)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="max tokens per chunk when splitting documents")
    p.add_argument("--host-bytes", type=int, default=DEFAULT_HOST_BYTES, help="host RAM tier cap")
    p.add_argument("--disk-bytes", type=int, default=DEFAULT_DISK_BYTES, help="disk tier cap")
    p.add_argument("--redis-ttl", type=float, default=DEFAULT_REDIS_TTL_S,
                   help="seconds Redis keeps KV no document references (0: no TTL)")
    p.add_argument("--gc-interval", type=float, default=600.0,
                   help="seconds between sweeps of idle unreferenced local KV (0: off)")
    p.add_argument("--gc-idle", type=float, default=3600.0, help="unreferenced local KV idle this long is dropped")
    p.add_argument("--max-pending", type=int, default=d.max_pending, help="completions admitted at once (429)")
    p.add_argument("--max-pending-documents", type=int, default=d.max_pending_documents,
                   help="document writes admitted at once (429)")
    p.add_argument("--fair-share", type=float, default=d.fair_share, help="share of admission slots per key")
    p.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s, help="seconds waiting for the model (503)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds per generation (504)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens)
    p.add_argument("--key-tokens-per-minute", type=int, default=d.key_tokens_per_minute)
    p.add_argument("--max-tenants-per-key", type=int, default=d.max_tenants_per_key)
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs an API key")
    p.add_argument("--max-preparing", type=int, default=d.max_preparing,
                   help="CPU lanes for parsing large bodies, counting tokens and splitting")
    p.add_argument("--prepare-wait", type=float, default=d.prepare_wait_s,
                   help="seconds a request waits for a preparation lane (503)")
    p.add_argument("--max-large-body-bytes", type=int, default=d.max_large_body_bytes,
                   help="bytes of bodies of 1 MiB and over received and prepared at once (503 beyond)")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, help="idle keep-alive connection timeout")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to deliver a complete request head")
    p.add_argument("--limit-concurrency", type=int, default=256,
                   help="open connections + tasks before new connections get 503")
    p.add_argument("--log-level", default="info")
    g = p.add_argument_group("engine", "which engine generates: daser's own (embedded, default) or vLLM instances "
                             "behind this service as control plane (docs/vllm.md)")
    g.add_argument("--engine", choices=("daser", "vllm"), default="daser")
    g.add_argument("--vllm-url", action="append", default=[], metavar="URL",
                   help="a running `vllm serve` with the daser connector on this service's Redis (repeatable)")
    g.add_argument("--vllm-spawn", type=int, default=0, metavar="N",
                   help="start N `vllm serve` processes with the daser connector (in the vLLM venv)")
    g.add_argument("--vllm-python", default=None,
                   help="the vLLM venv's python (default: $DASER_VLLM_VENV/bin/python or ~/.cache/daser-rag/vllm-venv)")
    g.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype spawned instances serve (and that the planner's fingerprint names)")
    g.add_argument("--print-vllm-config", action="store_true",
                   help="print what a `vllm serve` you run yourself needs (its --kv-transfer-config for this "
                        "--redis-url and model, environment, flags) and exit")
    g.add_argument("--router", choices=("documents", "round_robin"), default="documents",
                   help="how a request picks its vLLM instance: by the documents its host tier holds, or in turn")
    g.add_argument("--prefetch-window", type=int, default=DEFAULT_PREFETCH_WINDOW,
                   help="queued requests whose chunk KV daser's engine prefetches into host RAM and protects "
                        "from eviction until they run (PCR look-ahead; 0: off)")
    g.add_argument("--selector", default=None,
                   help="token selector for recompute (default: hybrid on daser's engine, chunk_heads on vLLM)")
    return p


def _ratio(value: str) -> float | str:
    """--recompute-ratio: a share in [0, 1] or "auto" (validated by the engine's own check)."""
    return value if value == "auto" else float(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daser_rag.server", description="Run the daser-rag KV cache service.")
    return add_serve_arguments(p).parse_args(argv)


def serve_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """`serve(**serve_kwargs(args))` for arguments parsed by `add_serve_arguments`."""
    keys = a.api_key or [k.strip() for k in os.environ.get("DASER_RAG_API_KEYS", "").split(",") if k.strip()] or None
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
                selector=a.selector, **({"prefetch_window": a.prefetch_window} if a.engine == "daser" else {}))


__all__ = ["DEFAULT_REDIS_TTL_S", "Limits", "add_serve_arguments", "parse_args",
           "serve_kwargs"]
