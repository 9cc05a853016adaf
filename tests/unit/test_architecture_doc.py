"""ARCHITECTURE.md cannot drift from the code: its module map names every module of ``enforcer``
and ``captive_portal`` by its path, and every path or file name it mentions exists.

A new module without its line, or a renamed or removed one still in the doc, fails here, so a
newcomer who reads the map finds every concept by its file name and no file that is gone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "ARCHITECTURE.md"
PACKAGES = ("enforcer", "captive_portal")
#: Where a bare file name in the doc (``test_webhook.py``, ``bench_store.py``) may live.
SEARCHED = (*PACKAGES, "tests")

#: Files a recipe proposes that do not exist yet ("Add a session source (planned)").
PLANNED = {"session_intake.py"}

#: A path into one of the packages: ``enforcer/engine.py``, ``enforcer/dataplane/``, ``captive_portal/``.
PACKAGE_PATH = re.compile(r"(?<![\w./-])(?:enforcer|captive_portal)/[\w./-]*")
#: A Python file named in code style, with or without its folders: ``config/sections.py``.
CODE_FILE = re.compile(r"`([\w./-]+\.py)`")


def modules(root: Path) -> list[str]:
    """Every module of the packages, by its path from ``root``."""
    return sorted(str(path.relative_to(root)) for package in PACKAGES for path in (root / package).rglob("*.py")
                  if "__pycache__" not in path.parts)


def package_paths(text: str) -> set[str]:
    """The package paths ``text`` names (a sentence's closing dot is not part of the path)."""
    return {match.rstrip(".") for match in PACKAGE_PATH.findall(text)}


def unnamed(text: str, root: Path) -> list[str]:
    """Modules ``text`` does not name. A package's ``__init__.py`` may be named by its folder
    (``enforcer/dataplane/``), which says the same for an empty one."""
    named = package_paths(text)
    return [module for module in modules(root)
            if module not in named
            and not (module.endswith("/__init__.py") and module.removesuffix("__init__.py") in named)]


def dangling(text: str, root: Path) -> list[str]:
    """Paths and file names ``text`` mentions that do not exist: a package path must exist as
    written; a file in code style must exist as written or under one of ``SEARCHED``."""
    missing = [path for path in sorted(package_paths(text)) if not (root / path).exists()]
    files = [p for package in SEARCHED for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts]
    for name in sorted(set(CODE_FILE.findall(text)) - package_paths(text) - PLANNED):
        if not (root / name).exists() and not any(str(p.relative_to(root)).endswith("/" + name) for p in files):
            missing.append(name)
    return missing


def test_every_module_has_its_line_in_the_map() -> None:
    missing = unnamed(DOC.read_text(encoding="utf-8"), ROOT)
    assert not missing, f"ARCHITECTURE.md ('One line per module') does not name: {', '.join(missing)}"


def test_every_path_the_doc_names_exists() -> None:
    gone = dangling(DOC.read_text(encoding="utf-8"), ROOT)
    assert not gone, f"ARCHITECTURE.md names files that do not exist: {', '.join(gone)}"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for path in ("enforcer/__init__.py", "enforcer/engine.py", "enforcer/api/__init__.py",
                 "enforcer/api/webhooks.py", "captive_portal/__init__.py", "captive_portal/page.py",
                 "tests/unit/test_engine.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    return tmp_path


def test_the_check_sees_a_module_left_out(tree: Path) -> None:
    doc = ("Packages `enforcer/` and `captive_portal/`.\n- `enforcer/engine.py` — the engine.\n"
           "- `enforcer/api/__init__.py`, `captive_portal/page.py`.\n")
    assert unnamed(doc, tree) == ["enforcer/api/webhooks.py"]
    assert unnamed(doc + "- `enforcer/api/webhooks.py` — billing.\n", tree) == []


def test_a_package_folder_names_its_init_only(tree: Path) -> None:
    doc = "`enforcer/`, `enforcer/api/`, `captive_portal/`, `enforcer/engine.py`, `captive_portal/page.py`."
    assert unnamed(doc, tree) == ["enforcer/api/webhooks.py"]


def test_the_check_sees_a_path_that_is_gone(tree: Path) -> None:
    doc = ("`enforcer/engine.py` and `enforcer/daemon.py`; see `api/webhooks.py`, `api/control.py`,\n"
           "`test_engine.py`, `test_daemon.py` and enforcer/api/webhooks.py. Also enforcer/timers.py.\n")
    assert dangling(doc, tree) == ["enforcer/daemon.py", "enforcer/timers.py", "api/control.py", "test_daemon.py"]
