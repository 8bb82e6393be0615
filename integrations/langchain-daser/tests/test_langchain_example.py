"""The LangChain example runs end to end (slow: a fresh process loads both models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

ROOT = Path(__file__).resolve().parents[3]  # the repository: examples/ live there


@pytest.mark.slow
def test_langchain_example_runs_end_to_end(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "langchain_chain.py"), "--cache-dir", str(tmp_path / "kv"),
         "--max-tokens", "16"],
        check=False, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("r=1.0 answer identical to full prefill: True") == 2
    assert "old style-guide KV still stored: False" in out
    assert "120 characters" in out.split("(after edit)")[1]
    assert "style-guide KV still stored: False" in out.split("cleanup='full'")[-1]
