"""Every result file the docs cite is in the repository, or listed as not kept with the reason.

A `.gitignore` rule (`results/`, which matches at any depth) once kept every new file under
docs/results/ out of the commits, and the docs went on citing them. This pins both halves: cited
files exist and are not ignored, and the not-kept list names only files that really are missing.
"""

import glob
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"docs/results/[A-Za-z0-9_./*-]*[A-Za-z0-9_/*]")
NOT_KEPT = ROOT / "docs" / "results" / "not_kept.txt"


def _cited() -> dict[str, str]:
    """Cited path -> the first file citing it (docs, README, benchmarks and probes)."""
    out: dict[str, str] = {}
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    for f in files:
        for m in CITED.finditer(f.read_text()):
            out.setdefault(m.group(0), str(f.relative_to(ROOT)))
    return out


def _not_kept() -> set[str]:
    lines = NOT_KEPT.read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def _matches(pattern: str) -> list[str]:
    return glob.glob(str(ROOT / pattern)) if "*" in pattern else ([str(ROOT / pattern)] if (ROOT / pattern).exists() else [])


def test_cited_results_exist_or_are_listed_as_not_kept() -> None:
    missing = {p: f for p, f in _cited().items() if not _matches(p) and p not in _not_kept()}
    assert not missing, f"cited but neither in the repository nor in docs/results/not_kept.txt: {missing}"


def test_not_kept_list_names_only_missing_files() -> None:
    present = sorted(p for p in _not_kept() if _matches(p) and not p.endswith("/"))
    assert not present, f"in the repository now: take them off docs/results/not_kept.txt: {present}"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_results_under_docs_are_not_ignored() -> None:
    probe = ["docs/results/x.json", "docs/results/probes/x.json", "docs/img/x.png"]
    r = subprocess.run(["git", "check-ignore", *probe], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "", f"git ignores files the docs would cite: {r.stdout}"
