"""The lock file: every distribution ``walled-garden[test]`` needs is pinned in
.ci/constraints.txt, at the version this environment runs.

.ci/install installs with ``-c .ci/constraints.txt`` and the Debian package bundles exactly the
pinned versions (.ci/package refuses an unpinned one); a dependency added to pyproject.toml without
its pin would otherwise be installed at whatever PyPI offers that day.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{CONSTRAINTS}: {line!r} is not name==version"
            out[canonical(name)] = version.strip()
    return out


def needed(name: str, extras: frozenset[str], seen: dict[str, str]) -> None:
    """Every installed distribution ``name[extras]`` requires, transitively, with its version."""
    dist = metadata.distribution(name)
    seen[canonical(dist.metadata["Name"])] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
            continue
        if canonical(req.name) not in seen:
            needed(req.name, frozenset(req.extras), seen)


def test_every_dependency_is_pinned_at_the_version_installed() -> None:
    seen: dict[str, str] = {}
    needed("walled-garden", frozenset({"test"}), seen)
    seen.pop("walled-garden")
    pinned = pins()
    missing = sorted(f"{name}=={version}" for name, version in seen.items() if name not in pinned)
    assert not missing, f"add to {CONSTRAINTS.name}: {missing}"
    differ = sorted(f"{name}: {version} installed, {pinned[name]} pinned"
                    for name, version in seen.items() if pinned[name] != version)
    assert not differ, f"this environment is not the locked one (bash .ci/install): {differ}"
