"""The integration distributions' tests share the core test fixtures (tests/conftest.py).

Loaded by path, so it works however pytest was started (from the repository root, or on one
integration's tests directory). Only fixtures are taken over: hooks there stay tests/-local.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_daser_core_test_fixtures", Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)


def _is_fixture(obj: object) -> bool:
    try:
        from _pytest.fixtures import FixtureFunctionDefinition
    except ImportError:  # pytest < 8.4
        return hasattr(obj, "_pytestfixturefunction")
    return isinstance(obj, FixtureFunctionDefinition)


globals().update({name: obj for name, obj in vars(_core).items() if _is_fixture(obj)})
