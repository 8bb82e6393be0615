"""The one settings table (daser_rag/settings.py) is where every default lives: the CLI and serve
parsers, GenerationParams, BlendConfig, Limits, the generator's and the vLLM engine's
constructors all agree with it, help texts come from it, the environment variables still work,
no default is restated elsewhere, and docs/settings.md is current."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daser_rag import settings as s
from daser_rag.blend.config import BlendConfig
from daser_rag.cli import build_parser
from daser_rag.params import GenerationParams
from daser_rag.server.settings import Limits, add_serve_arguments, parse_args, serve_kwargs

ROOT = Path(__file__).resolve().parents[1]

INPUTS = {"--doc", "--text", "--full", "--stream", "--json", "--topics", "--print-vllm-config",
          # `daser-rag calibrate`'s run options and `ingest --calibrate` (daser_rag/calibration/command.py)
          "--out", "--steps", "--link-tokens", "--scales", "--no-scales", "--biases", "--no-biases", "--token-map", "--no-token-map", "--token-map-ridge", "--primer-tokens", "--primers", "--train-prompts", "--held-out-prompts",
          "--min-gain", "--seed", "--threads", "--calibrate", "--fit-share", "--fit-selector", "--answer-tokens"}
"""Per-invocation inputs and switches of single commands: not settings, so not in the table."""
DEFERRED = {"blend.recompute_ratio", "blend.selector", "service.api_keys"}
"""Options whose parser default is None: the engine's default (the table's) or, for API keys,
$DASER_RAG_API_KEYS read by serve_kwargs."""


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return dict(sub.choices)  # type: ignore[union-attr]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    out = {n: p for n, p in _subparsers().items() if n != "bench"}
    out["python -m daser_rag.server"] = add_serve_arguments(argparse.ArgumentParser())
    return out


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_is_a_table_setting_with_its_default_and_help(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DASER_RAG_REDIS_URL", "DASER_RAG_CACHE_DIR", "DASER_RAG_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    parser = _parsers()[name]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        setting = getattr(action, "setting", None)
        if setting is None:
            assert set(action.option_strings) <= INPUTS, f"{name} {action.option_strings} is not from the table"
            continue
        assert s.TABLE[setting.key] is setting
        if setting.key in DEFERRED:
            assert action.default is None
        else:
            assert action.default == setting.default, (name, setting.key)
        assert action.help is not None and action.help.startswith(setting.help), (name, setting.key)
        if setting.choices and setting.key != "blend.selector":  # the CLI lists the live registry
            assert list(action.choices or ()) == list(setting.choices)


def test_help_output_comes_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for setting in (s.CHUNK_TOKENS, s.CODEC, s.MAX_NEW_TOKENS, s.TEMPERATURE):
        assert " ".join(setting.help.split()) in out
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for setting in (s.LIMIT_MAX_PENDING, s.LIMIT_QUEUE_TIMEOUT, s.REDIS_URL, s.VLLM_ROUTER):
        assert " ".join(setting.help.split()) in out


def _field_defaults(cls: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_value_objects_take_their_defaults_from_the_table() -> None:
    for field, default in _field_defaults(GenerationParams).items():
        if field in ("recompute_ratio", "selector"):
            assert default is None  # None: the generator's default, i.e. blend.* below
        else:
            assert default == s.TABLE[f"generation.{field}"].default, field
    for field, default in _field_defaults(BlendConfig).items():
        assert default == s.TABLE[f"blend.{field}"].default, field
    for field, default in _field_defaults(Limits).items():
        key = "generation.max_new_tokens" if field == "default_max_tokens" else f"limits.{field}"
        assert default == s.TABLE[key].default, field
    assert GenerationParams().max_new_tokens == 256 and BlendConfig().recompute_ratio == 0.15
    assert Limits().max_new_tokens == 512


def _signature_defaults(fn: Any) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_engine_constructors_take_their_defaults_from_the_table() -> None:
    from daser_rag.control.factory import open_vllm_engine
    from daser_rag.control.spawn import vllm_command
    from daser_rag.control.vllm_engine import VllmEngine
    from daser_rag.engine.factory import default_store
    from daser_rag.engine.generator import CacheAwareGenerator
    from daser_rag.kv.store import KVStore
    from daser_rag.server.app import serve

    gen = _signature_defaults(CacheAwareGenerator.__init__)
    want = {"recompute_ratio": s.RECOMPUTE_RATIO, "selector": s.SELECTOR, "check_layer": s.CHECK_LAYER,
            "chunk_tokens": s.CHUNK_TOKENS, "codec": s.CODEC, "device_bytes": s.DEVICE_BYTES,
            "prefetch_window": s.PREFETCH_WINDOW}
    assert {k: gen[k] for k in want} == {k: v.default for k, v in want.items()}
    vllm = _signature_defaults(VllmEngine.__init__)
    want = {"recompute_ratio": s.RECOMPUTE_RATIO, "selector": s.VLLM_SELECTOR, "check_layer": s.CHECK_LAYER,
            "chunk_tokens": s.CHUNK_TOKENS, "router": s.VLLM_ROUTER, "prefill_workers": s.VLLM_PREFILL_WORKERS,
            "served_name": s.VLLM_SERVED_NAME}
    assert {k: vllm[k] for k in want} == {k: v.default for k, v in want.items()}
    factory = _signature_defaults(open_vllm_engine)
    assert (factory["dtype"], factory["max_model_len"], factory["max_num_seqs"], factory["start_timeout_s"]) == (
        s.VLLM_DTYPE.default, s.VLLM_MAX_MODEL_LEN.default, s.VLLM_MAX_NUM_SEQS.default, s.VLLM_START_TIMEOUT.default)
    cmd = _signature_defaults(vllm_command)
    assert (cmd["dtype"], cmd["max_model_len"], cmd["max_num_seqs"]) == (
        s.VLLM_DTYPE.default, s.VLLM_MAX_MODEL_LEN.default, s.VLLM_MAX_NUM_SEQS.default)
    assert _signature_defaults(default_store)["codec"] == s.CODEC.default
    store = _signature_defaults(KVStore.__init__)
    assert (store["codec"], store["host_bytes"], store["disk_bytes"]) == (
        s.CODEC.default, s.HOST_BYTES.default, s.DISK_BYTES.default)
    from daser_rag.server.client import DaserClient

    client = _signature_defaults(DaserClient.__init__)
    assert client["base_url"] == f"http://{s.HOST.default}:{s.PORT.default}" and client["tenant"] == s.TENANT.default
    # serve(...) called from Python means what `serve` with no options means
    from_python = _signature_defaults(serve)
    from_cli = serve_kwargs(parse_args([]))
    for k in ("host", "port", "codec", "chunk_tokens", "gc_interval_s", "gc_idle_s", "log_level",
              "timeout_keep_alive", "limit_concurrency", "header_timeout_s", "engine", "vllm_spawn", "vllm_dtype",
              "router", "default_tenant", "redis_ttl_s"):
        assert from_python[k] == from_cli[k], k


def test_environment_variables_still_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from daser_rag.control.spawn import default_vllm_python
    from daser_rag.kv.store import default_cache_dir

    monkeypatch.setenv("DASER_RAG_REDIS_URL", "redis://example:6379/3")
    monkeypatch.setenv("DASER_RAG_API_KEYS", " k1, ,k2 ")
    monkeypatch.setenv("DASER_RAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DASER_VLLM_VENV", str(tmp_path / "venv"))
    kw = serve_kwargs(parse_args([]))
    assert kw["redis_url"] == "redis://example:6379/3" and kw["api_keys"] == ["k1", "k2"]
    assert kw["cache_dir"] == str(tmp_path / "cache")
    assert serve_kwargs(parse_args(["--api-key", "x"]))["api_keys"] == ["x"]  # the flag wins
    assert build_parser().parse_args(["ingest"]).cache_dir == str(tmp_path / "cache")
    assert default_cache_dir() == tmp_path / "cache"
    assert default_vllm_python() == tmp_path / "venv" / "bin" / "python"
    for var in ("DASER_RAG_REDIS_URL", "DASER_RAG_API_KEYS", "DASER_RAG_CACHE_DIR", "DASER_VLLM_VENV"):
        monkeypatch.delenv(var)
    kw = serve_kwargs(parse_args([]))
    assert kw["redis_url"] is None and kw["api_keys"] is None and kw["cache_dir"] is None
    assert default_cache_dir() == Path.home() / ".cache" / "daser-rag"
    assert default_vllm_python() == Path.home() / ".cache" / "daser-rag" / "vllm-venv" / "bin" / "python"
    assert {st.env for st in s.TABLE.values() if st.env} == {
        "DASER_RAG_REDIS_URL", "DASER_RAG_API_KEYS", "DASER_RAG_CACHE_DIR", "DASER_VLLM_VENV"}


def _literal(v: Any) -> str | None:
    """The source spelling of a distinctive default (None: too common to search for)."""
    if isinstance(v, bool) or v is None or v in (0, 1, 0.0, 1.0, "", ()):
        return None
    if isinstance(v, str):
        return re.escape(f'"{v}"')
    if isinstance(v, int):  # 512, 32_768, 8 << 20
        alts = {str(v), f"{v:_}"} | {f"{v >> b} << {b}" for b in (10, 20, 30) if v % (1 << b) == 0}
        return "(?:" + "|".join(map(re.escape, sorted(alts))) + ")"
    return re.escape(repr(v)) if not isinstance(v, list) else None


def test_no_default_is_restated_outside_the_table() -> None:
    """A parameter or field `name: type = <the table's literal>` (or an assignment `name = <literal>`)
    for a setting's name anywhere in daser_rag/ but the table, or an `add_argument` of a setting's
    flag, would be a second home for that default. (Keyword arguments in calls, `name=<literal>`,
    are values passed, not defaults.)"""
    sources = {p: p.read_text(encoding="utf-8") for p in (ROOT / "daser_rag").rglob("*.py")
               if p.name != "settings.py" or p.parent.name != "daser_rag"}
    found = []
    for setting in s.TABLE.values():
        lit = _literal(setting.default)
        if lit is None:
            continue
        names = {setting.name, setting.name.removesuffix("_s")}
        pattern = re.compile(rf"\b(?:{'|'.join(map(re.escape, names))})(?:\s*:[^=\n]*=|\s+=)\s*{lit}(?![\w.])")
        flag = re.compile(rf"add_argument\(\s*\"{re.escape(setting.flag)}\"") if setting.flag else None
        for path, text in sources.items():
            for m in pattern.finditer(text):
                found.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
            if flag is not None and flag.search(text):
                found.append(f"{path.relative_to(ROOT)}: add_argument({setting.flag}) outside the table")
    assert not found, "\n".join(found)


def test_docs_settings_md_is_current() -> None:
    doc = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert doc == s.markdown(), "regenerate: python -m daser_rag.settings > docs/settings.md"
    for setting in s.TABLE.values():
        assert f"| `{setting.name}` |" in doc


def test_the_table_is_torch_free_and_keys_are_unique() -> None:
    code = ("import sys, daser_rag, daser_rag.settings, daser_rag.server.settings, daser_rag.params, "
            "daser_rag.blend.config; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ValueError, match="declared twice"):
        s.declare("engine.codec", "fp32", "str", "again")
    assert all(k.count(".") == 1 for k in s.TABLE)


def test_ratio_from_the_command_line_is_checked_the_same_everywhere() -> None:
    assert build_parser().parse_args(["ask", "q", "--ratio", "auto"]).ratio == "auto"
    assert build_parser().parse_args(["ask", "q", "--recompute-ratio", "0.3"]).ratio == 0.3
    assert parse_args(["--recompute-ratio", "auto"]).recompute_ratio == "auto"
    for argv in (["--recompute-ratio", "1.5"], ["--recompute-ratio", "x"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
