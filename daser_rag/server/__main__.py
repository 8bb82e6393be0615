"""`python -m daser_rag.server --host 127.0.0.1 --port 8000 [--redis-url URL] [--cache-dir DIR]`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daser_rag.server", description="Run the daser-rag KV cache service.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="HF model dir or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=None, help="local KV cache + document index mirror")
    p.add_argument("--redis-url", default=os.environ.get("DASER_RAG_REDIS_URL"),
                   help="shared tier, e.g. redis://127.0.0.1:6379/0 (default: $DASER_RAG_REDIS_URL)")
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; default: $DASER_RAG_API_KEYS, comma-separated)")
    p.add_argument("--codec", default="fp16", choices=["fp32", "fp16", "bf16", "int8", "fp8"])
    p.add_argument("--recompute-ratio", type=float, default=0.15)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--max-pending", type=int, default=16, help="requests admitted at once (beyond: 429)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-body-bytes", type=int, default=8 << 20)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from daser_rag.server.app import Limits, serve

    a = parse_args(argv)
    keys = a.api_key or [k for k in os.environ.get("DASER_RAG_API_KEYS", "").split(",") if k.strip()] or None
    serve(a.host, a.port, model=a.model, cache_dir=a.cache_dir, redis_url=a.redis_url, api_keys=keys,
          codec=a.codec, recompute_ratio=a.recompute_ratio, chunk_tokens=a.chunk_tokens,
          limits=Limits(max_body_bytes=a.max_body_bytes, max_new_tokens=a.max_new_tokens, max_pending=a.max_pending),
          log_level=a.log_level)


if __name__ == "__main__":
    main()
