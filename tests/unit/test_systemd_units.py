"""The shipped systemd units: ``systemd-analyze verify`` clean, sandbox exposure under the
thresholds (enforcer ≤ 4.0, portal ≤ 2.0), and the directives operations rely on.

Outside CI a machine without ``systemd-analyze`` skips these; with CI set, a missing tool
fails (``.ci/install`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
#: Highest ``systemd-analyze security`` exposure allowed per unit (0 = locked down, 10 = none).
THRESHOLDS = {"walled-garden.service": 4.0, "walled-garden-portal.service": 2.0}
INSTALLED = "/usr/bin/walled-garden"   # where the Debian package (.ci/package) puts it


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: CI refuses to skip (.ci/install installs it)")
        pytest.skip(f"needs {name}")
    return path


def directives(unit: str) -> dict[str, list[str]]:
    """``Key`` → every value it is given (systemd allows repeats), sections ignored."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def staged(unit: str, tmp_path: Path) -> Path:
    """The unit as installed, with ``ExecStart`` pointing at an executable that exists here.

    ``verify`` checks that commands are executable; this machine need not have the package
    installed in /usr/bin for the unit itself to be checked.
    """
    stub = tmp_path / "bin" / "walled-garden"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    target = tmp_path / unit
    target.write_text((UNITS / unit).read_text().replace(INSTALLED, str(stub)))
    return target


@pytest.mark.parametrize("unit", sorted(THRESHOLDS))
def test_unit_verifies_clean(unit: str, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    assert INSTALLED in (UNITS / unit).read_text()
    result = subprocess.run([analyze, "verify", "--man=no", str(staged(unit, tmp_path))],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.parametrize("unit", sorted(THRESHOLDS))
def test_unit_exposure_is_under_its_threshold(unit: str, tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(staged(unit, tmp_path))],
                            capture_output=True, text=True, check=False, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= THRESHOLDS[unit], f"{unit}: exposure {exposure} > {THRESHOLDS[unit]}\n{result.stdout}"


def test_enforcer_unit_is_notify_watchdog_and_net_admin_only() -> None:
    d = directives("walled-garden.service")
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert "AmbientCapabilities" not in d or d["AmbientCapabilities"] in (["CAP_NET_ADMIN"], [""])
    assert d["RuntimeDirectory"] == ["walled-garden"] and d["StateDirectory"] == ["walled-garden"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["SupplementaryGroups"] == ["walled-garden"], "needed to give the control socket to the portal"
    assert "RuntimeDirectoryPreserve" not in d


def test_portal_unit_is_notify_watchdog_dynamic_user_without_capabilities() -> None:
    d = directives("walled-garden-portal.service")
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["DynamicUser"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    assert d["SupplementaryGroups"] == ["walled-garden"], "the control socket's group"
    assert "AF_NETLINK" not in " ".join(d["RestrictAddressFamilies"])


def test_watchdog_timeouts_leave_room_for_the_half_interval_pet() -> None:
    for unit in THRESHOLDS:
        seconds = int(directives(unit)["WatchdogSec"][0].rstrip("s"))
        assert seconds >= 10, f"{unit}: a pet every {seconds / 2}s leaves no slack for a busy loop"


def test_enforcer_is_ordered_before_the_network() -> None:
    """docs/reference.md, Safety rules: after a reboot the table is back before any interface is up."""
    d = directives("walled-garden.service")
    before = " ".join(d["Before"]).split()
    after = " ".join(d["After"]).split()
    assert "network-pre.target" in before and "network-pre.target" in " ".join(d["Wants"]).split()
    assert d["DefaultDependencies"] == ["no"], "the defaults order us after basic.target (and sysinit.target)"
    assert "shutdown.target" in before and d["Conflicts"] == ["shutdown.target"], "what the defaults gave"
    assert "local-fs.target" in after and "systemd-sysusers.service" in after
    assert not {t for t in after if t.startswith("network") or t in ("sysinit.target", "basic.target")}, after
    assert "network-online.target" not in " ".join(d.get("Wants", []) + d.get("Requires", []))


def test_no_ordering_cycle_where_sysinit_waits_for_the_network(tmp_path: Path) -> None:
    """cloud-init orders a networked service before sysinit.target: a unit After=sysinit.target
    and Before=network-pre.target would close a cycle, and systemd would drop a job at boot."""
    analyze = tool("systemd-analyze")
    staged("walled-garden.service", tmp_path)
    (tmp_path / "early-network.service").write_text(
        "[Unit]\nDefaultDependencies=no\nAfter=network-pre.target\nBefore=sysinit.target\n"
        "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    (tmp_path / "boot-check.target").write_text(
        "[Unit]\nWants=walled-garden.service early-network.service sysinit.target network-pre.target\n")
    result = subprocess.run([analyze, "verify", "--man=no", "boot-check.target", "walled-garden.service",
                             "early-network.service"], cwd=tmp_path, capture_output=True, text=True,
                            check=False, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ordering cycle" not in output, output
