"""Every command the README shows runs: `--help` of each CLI command and benchmark must exit 0.

The commands are read from README.md itself, so a command added there is checked here too.
`daser-rag bench suite --quick` (the README's quick variant, ~3 min) is a slow-marked test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CLI = [sys.executable, "-m", "daser_rag.cli"]


def _readme_commands() -> list[list[str]]:
    subcommands = sorted(set(re.findall(r"daser-rag (demo|ingest|ask|cache|bench|serve)\b", README)))
    bench: set[str] = set()
    for group in re.findall(r"daser-rag bench \[([^\]]+)\]", README):
        bench.update(n.strip() for n in group.split("|") if n.strip())
    bench.update(re.findall(r"daser-rag bench ([a-z_]+)", README))
    modules = sorted(set(re.findall(r"python -m (benchmarks\.[a-z_]+)", README)))
    cmds = [[*CLI, "--help"]] + [[*CLI, s, "--help"] for s in subcommands]
    cmds += [[*CLI, "bench", name, "--help"] for name in sorted(bench)]
    cmds += [[sys.executable, "-m", m, "--help"] for m in modules]
    return cmds


COMMANDS = _readme_commands()


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_readme_lists_every_cli_command():
    shown = {c[3] for c in COMMANDS if c[:3] == CLI and len(c) > 4} | {c[3] for c in COMMANDS if len(c) == 5}
    assert {"demo", "ingest", "ask", "cache", "bench", "serve"} <= shown, shown
    assert any(c[3:5] == ["bench", "workload"] for c in COMMANDS if len(c) > 4)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c[2:] if c[:3] == CLI else c[1:]) for c in COMMANDS])
def test_readme_command_help_runs(cmd):
    proc = _run(cmd, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "usage" in out.lower(), out[-3000:]


def test_bench_finds_the_checkout_and_fails_clearly_outside_one(monkeypatch, capsys):
    from daser_rag import cli

    assert cli.find_benchmarks(ROOT / "docs" / "img") == ROOT
    assert {"ttft", "suite", "workload", "codecs"} <= set(cli.runnable_benchmarks(ROOT))
    monkeypatch.setattr(cli, "find_benchmarks", lambda start=None: None)
    assert cli.main(["bench", "ttft"]) == 2
    assert "inside a clone of the repository" in capsys.readouterr().err
    unknown = _run([*CLI, "bench", "no_such_benchmark"], timeout=120)
    assert unknown.returncode == 2 and "unknown benchmark" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.slow
def test_bench_suite_quick_runs(tmp_path):
    if "daser-rag bench suite" not in README or "--quick" not in README:
        pytest.skip("the README shows no quick suite run")
    proc = _run([*CLI, "bench", "suite", "--quick", "--out", str(tmp_path / "suite")], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Traceback" not in proc.stderr
