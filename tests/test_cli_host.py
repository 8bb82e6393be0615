"""Issue 21 item 8: the CLI's output and errors are what a script (or a person) can rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daser_rag.cli import main
from daser_rag.corpus import demo_topics

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_ask_json_prints_only_json_and_cache_stats_reports_a_real_hit_rate(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    common = ["--text", "The gate code of the old mill is 5521.", "--cache-dir", cache, "--codec", "fp32",
              "--max-new-tokens", "3"]
    rc, out, _ = run(capsys, "ask", "What is the gate code?", *common, "--json")
    assert rc == 0
    first = json.loads(out)  # the whole of stdout is one JSON document
    assert first["cache_hits"] == 0 and first["reused_tokens"] == 0 and first["mode"] == "full"
    rc, out, err = run(capsys, "ask", "What is the gate code?", *common, "--json", "--stream")
    assert rc == 0
    second = json.loads(out)
    assert second["cache_hits"] == 1 and second["mode"] == "blend"
    assert second["text"].strip() in err  # streamed deltas went to stderr
    rc, out, _ = run(capsys, "cache", "stats", "--cache-dir", cache)
    stats = json.loads(out)
    assert rc == 0 and stats["lookups"] >= 2 and stats["hits"] >= 1
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / stats["lookups"]) and stats["hit_rate"] > 0


def test_cache_commands_never_create_a_mistyped_cache_dir(tmp_path, capsys):
    typo = tmp_path / "chache"
    for action in ("stats", "clear", "invalidate"):
        rc, out, err = run(capsys, "cache", action, "--cache-dir", str(typo), "--doc", "x")
        assert rc == 2 and "no KV cache at" in err and not out
        assert not typo.exists()
    (tmp_path / "plain").mkdir()
    rc, _, err = run(capsys, "cache", "stats", "--cache-dir", str(tmp_path / "plain"))
    assert rc == 2 and "not a daser-rag KV cache" in err


@pytest.mark.parametrize("name", ["quality", "scaling"])
def test_bench_help_prints_help_and_starts_nothing(capsys, name, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a benchmark run was started"))
    for flag in ("--help", "-h"):
        rc, out, _ = run(capsys, "bench", name, flag)
        assert rc == 0 and out.startswith(f"usage: daser-rag bench {name}") and "takes no options" in out
    rc, _, err = run(capsys, "bench", name, "--questions", "3")
    assert rc == 2 and "takes no options" in err


def test_ingest_errors_are_clear_and_come_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import daser_rag.cli as cli

    monkeypatch.setattr(cli, "_generator", lambda args: pytest.fail("the model was loaded"))
    rc, _, err = run(capsys, "ingest", "--topics", "nosuchtopic", "--cache-dir", str(tmp_path))
    assert rc == 2 and err.startswith("error: unknown pydoc topic(s): nosuchtopic (") and "'nosuchtopic'" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    rc, _, err = run(capsys, "ingest", str(empty), "--cache-dir", str(tmp_path))
    assert rc == 2 and "is empty" in err
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    rc, _, err = run(capsys, "ingest", str(binary), "--cache-dir", str(tmp_path))
    assert rc == 2 and "not UTF-8" in err


def test_readme_states_the_demo_topic_count():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"The demo ingests {len(demo_topics())} reference topics" in readme
