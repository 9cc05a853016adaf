"""Test modules are imported by basename (rootdir-relative ``sys.path`` entries, no packages):
two with one name in tests/unit and tests/kernel stop pytest's collection of both suites with an
"import file mismatch" (it happened twice, each time found only by a CI run)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_name() -> None:
    names = Counter(path.name for path in TESTS.rglob("*.py") if "bench" not in path.parts)
    assert not [name for name, count in names.items() if count > 1 and name != "__init__.py"
                and name != "conftest.py"]
