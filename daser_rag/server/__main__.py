"""`python -m daser_rag.server --host 127.0.0.1 --port 8000 [--redis-url URL] [--cache-dir DIR] ...`
(the same options as `daser-rag serve`; see daser_rag/server/settings.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from daser_rag.server.settings import parse_args, serve_kwargs


def run(args: argparse.Namespace) -> None:
    if getattr(args, "print_vllm_config", False):
        import json

        from daser_rag.control.factory import control_plane_dir, instance_config

        if not args.redis_url:
            raise SystemExit("--print-vllm-config needs --redis-url (the Redis the instances will share)")
        cfg = instance_config(args.model, redis_url=args.redis_url, dtype=args.vllm_dtype,
                              store_dir=args.cache_dir or "/var/cache/daser-rag/vllm",
                              calibration_dir=control_plane_dir(args.cache_dir))
        print(json.dumps(cfg, indent=2))
        return
    from daser_rag.server.app import serve

    serve(**serve_kwargs(args))


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
