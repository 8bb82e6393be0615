"""CI must run the README's test command, so the documented set-up is what gets tested."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must show the demo command and the test command"
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_ci_also_runs_the_slow_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'pytest -q -m "slow and not vllm and not gpu"', ci)
