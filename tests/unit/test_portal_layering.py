"""The portal's imports: no cycle between its modules, nothing of the daemon's side of ``enforcer``,
and a control protocol that stays a leaf (both sides import it)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PORTAL = ROOT / "captive_portal"
#: The daemon's side of ``enforcer``: the portal runs unprivileged and must not load any of it.
DAEMON_SIDE = {"api", "daemon", "engine", "service", "store", "reconciler", "dataplane", "webhook_worker",
               "conntrack", "ctnetlink", "supervisor", "outbox", "metrics"}


def imports_of(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth (a lazy import in a function counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            if node.level > 1:
                base = base.rsplit(".", node.level - 1)[0]
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            # ``from . import page`` names a module, ``from .page import x`` names an attribute.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def portal_graph() -> dict[str, set[str]]:
    modules = {f"captive_portal.{p.stem}": p for p in PORTAL.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports_of(path, "captive_portal") if m in modules} - {name}
            for name, path in modules.items()}


def test_the_portal_modules_import_each_other_without_a_cycle() -> None:
    graph = portal_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path[path.index(name):], name])}"
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_cycle_check_sees_a_lazy_import(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    assert "pkg.b" in imports_of(tmp_path / "a.py", "pkg")


def test_the_portal_imports_no_daemon_module() -> None:
    for path in sorted(PORTAL.glob("*.py")):
        for module in imports_of(path, "captive_portal"):
            parts = module.split(".")
            assert not (parts[0] == "enforcer" and len(parts) > 1 and parts[1] in DAEMON_SIDE), \
                f"{path.relative_to(ROOT)} imports {module}: the portal may use enforcer's shared modules only"


def test_the_control_protocol_is_a_leaf() -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for module in imports_of(ROOT / "enforcer" / "control_protocol.py", "enforcer"):
        top = module.split(".")[0]
        assert top in allowed or module in ("enforcer", "enforcer.model", "enforcer.model.Mode"), module
