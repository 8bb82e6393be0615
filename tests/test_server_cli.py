"""One serve command line: `daser-rag serve` and `python -m daser_rag.server` share one parser, so
every option reaches the service from both (no silently dropped --tenant or --chunk-tokens)."""

from __future__ import annotations

import argparse

from daser_rag.cli import build_parser
from daser_rag.server.settings import Limits, add_serve_arguments, parse_args, serve_kwargs


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_both_entry_points_accept_the_same_options_and_mean_the_same():
    serve_sub = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    module = add_serve_arguments(argparse.ArgumentParser())
    assert _options(serve_sub) == _options(module)
    assert {"--tenant", "--chunk-tokens", "--recompute-ratio", "--max-pending", "--queue-timeout",
            "--disk-bytes", "--redis-ttl", "--header-timeout", "--protect-metrics"} <= _options(module)
    argv = ["--tenant", "acme", "--chunk-tokens", "256", "--port", "9", "--api-key", "k1", "--max-pending", "3",
            "--request-timeout", "12", "--disk-bytes", "1000", "--protect-metrics"]
    via_cli = serve_kwargs(build_parser().parse_args(["serve", *argv]))
    via_module = serve_kwargs(parse_args(argv))
    assert via_cli == via_module
    assert via_cli["default_tenant"] == "acme" and via_cli["chunk_tokens"] == 256 and via_cli["api_keys"] == ["k1"]
    assert via_cli["disk_bytes"] == 1000
    lim = via_cli["limits"]
    assert isinstance(lim, Limits) and lim.max_pending == 3 and lim.request_timeout_s == 12 and lim.protect_metrics
