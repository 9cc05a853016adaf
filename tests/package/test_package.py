"""The Debian package as an operator gets it: ``.ci/package`` builds it, lintian finds nothing,
apt installs it on this machine, every module imports with its interpreter, ``check-config``
and ``render`` pass on the shipped example, as root and as the enforcer's unit runs (root without
capabilities), billing's drop directory takes a list as the documented user, the portal's
identity reads the config but not the secret or the list, the installed units verify, nothing is
enabled, and a purge leaves nothing behind (files, directories, accounts).

It changes the machine while it runs (a package, two accounts, /etc/walled-garden): the units
are not enabled, so nothing starts, and a ``finally`` purges whatever happens. It runs only as
root and never over a walled-garden package someone installed (it would purge it).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from required import tool

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "walled-garden"
#: Whole test under this (build ~1 min with a warm pip cache, install and purge ~30 s each).
BUDGET = 900.0
ACCOUNTS = {"group": ["walled-garden", "walled-garden-billing"], "user": ["walled-garden-billing"]}
#: Where the package's files, and anything made on its behalf, could be.
SEARCHED = ["/etc", "/usr", "/var/lib", "/var/cache/debconf", "/run"]
ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
APT_LOCK = ["-o", "DPkg::Lock::Timeout=300"]   # another apt on this machine: wait, not fail
#: Two runs of this test at once (two checkouts' .ci/test) would install and purge one package.
MACHINE_LOCK = "/run/lock/wg-package-test.lock"


@contextlib.contextmanager
def machine_lock(deadline: float) -> Iterator[None]:
    """This test alone on the machine: waits (polling, within the budget) for another run to end."""
    with open(MACHINE_LOCK, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline - 300, "another run of the package test held the machine"
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(argv: list[str], deadline: float) -> subprocess.CompletedProcess[str]:
    """argv within what is left of the test's budget (at most 600 s), output captured."""
    left = min(600.0, deadline - time.monotonic())
    assert left > 0, f"out of time before {argv}"
    return subprocess.run(argv, capture_output=True, text=True, timeout=left, check=False, env=ENV)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def accounts() -> set[str]:
    """Which of the package's accounts exist now."""
    out = set()
    for name in ACCOUNTS["group"]:
        try:
            grp.getgrnam(name)
            out.add(f"group {name}")
        except KeyError:
            pass
    for name in ACCOUNTS["user"]:
        try:
            pwd.getpwnam(name)
            out.add(f"user {name}")
        except KeyError:
            pass
    return out


def traces() -> set[str]:
    """Paths whose name mentions walled-garden or walled_garden in the searched trees."""
    found = subprocess.run(["find", *SEARCHED, "-xdev", "(", "-name", "*walled-garden*", "-o", "-name",
                            "*walled_garden*", ")", "-print"], capture_output=True, text=True, timeout=120,
                           check=False)
    return set(found.stdout.split())


def mode(path: str) -> tuple[str, str, str]:
    info = os.stat(path)
    return (f"{info.st_mode & 0o7777:04o}", pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name)


def as_identity(uid: int, gid: int, groups: list[int], argv: list[str], deadline: float,
                ) -> subprocess.CompletedProcess[str]:
    """argv with these ids and no capabilities at all: root here is the enforcer's unit
    (CapabilityBoundingSet=CAP_NET_ADMIN: no CAP_DAC_OVERRIDE, files by their modes only)."""
    setpriv = tool("setpriv", "util-linux")
    return run([setpriv, f"--reuid={uid}", f"--regid={gid}", "--groups=" + ",".join(map(str, groups)),
                "--inh-caps=-all", "--bounding-set=-all", "--", *argv], deadline)


def test_package_builds_installs_checks_and_purges_clean(tmp_path: Path) -> None:
    deadline = time.monotonic() + BUDGET
    for name, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"), ("lintian", "lintian"),
                          ("systemd-analyze", "systemd"), ("apt-get", "apt"), ("dpkg", "dpkg")):
        tool(name, package)
    if os.geteuid() != 0:
        message = "installs a package: needs root"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI refuses to skip")
        pytest.skip(message)
    with machine_lock(deadline):
        installed = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE], deadline)
        if installed.returncode == 0 and installed.stdout.strip() not in ("", "un"):
            message = (f"{PACKAGE} is installed on this machine ({installed.stdout.strip()}): this test would purge "
                       "it; remove it first (apt-get purge walled-garden)")
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        accounts_before, traces_before = accounts(), traces()

        deb = Path(ok(run(["bash", str(ROOT / ".ci" / "package"), str(tmp_path / "dist")], deadline)).split()[-1])
        assert deb.is_file() and deb.name.startswith(f"{PACKAGE}_"), deb

        lintian = run(["lintian", "--fail-on", "error,warning", str(deb)], deadline)
        complaints = [line for line in (lintian.stdout + lintian.stderr).splitlines()
                      if line.strip() and "running with root privileges" not in line]
        assert lintian.returncode == 0 and not complaints, "\n".join(complaints)

        try:
            ok(run(["apt-get", "install", "-y", "-q", *APT_LOCK, "--no-install-recommends", str(deb)], deadline))
            _check_installed(deadline, tmp_path)
        finally:
            purged = run(["apt-get", "purge", "-y", "-q", *APT_LOCK, PACKAGE], deadline + 300)
        ok(purged)
        assert run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE], deadline).stdout.strip() in ("", "un")
        assert accounts() == accounts_before, f"accounts left behind: {accounts() - accounts_before}"
        assert traces() - traces_before == set(), f"left behind: {sorted(traces() - traces_before)}"


def _check_installed(deadline: float, tmp_path: Path) -> None:
    """What an operator finds after ``apt-get install``."""
    assert "walled-garden" in ok(run(["/usr/bin/walled-garden", "--version"], deadline))
    # Root running the command in a directory others can write imports nothing from it.
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "yaml.py").write_text("raise SystemExit('imported from the current directory')\n")
    (planted / "enforcer").mkdir()
    (planted / "enforcer" / "__init__.py").write_text("raise SystemExit('imported from the current directory')\n")
    left = min(60.0, deadline - time.monotonic())
    here = subprocess.run(["/usr/bin/walled-garden", "--version"], capture_output=True, text=True, timeout=left,
                          check=False, env=ENV, cwd=planted)
    assert here.returncode == 0 and "walled-garden" in here.stdout, here.stdout + here.stderr
    checked = run(["/usr/bin/walled-garden", "check-config", "--config", "/etc/walled-garden/config.yaml"], deadline)
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout + checked.stderr

    # Every module imports with the package's interpreter: no dependency or package data missing.
    python = "/usr/lib/walled-garden/bin/python3"
    walk = ("import importlib, pkgutil, enforcer, captive_portal\n"
            "for pkg in (enforcer, captive_portal):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n")
    ok(run([python, "-c", walk], deadline))
    rendered = ok(run(["/usr/bin/walled-garden", "render"], deadline))
    assert "table inet walled_garden" in rendered, rendered[:2000]

    socket_gid = grp.getgrnam("walled-garden").gr_gid
    billing = pwd.getpwnam("walled-garden-billing")
    assert mode("/etc/walled-garden") == ("0750", "root", "walled-garden")
    assert mode("/etc/walled-garden/config.yaml") == ("0640", "root", "walled-garden")
    assert mode("/etc/walled-garden/webhook.secret")[:2] == ("0600", "root")
    assert mode("/var/lib/walled-garden") == ("0700", "root", "root")
    assert mode("/var/lib/walled-garden-billing") == ("2750", "walled-garden-billing", "root")
    assert mode("/var/lib/walled-garden-billing/restricted.yaml") == ("0640", "walled-garden-billing", "root")

    # Billing delivers a list the documented way: as its user, a temporary file, mode 0640, rename.
    drop = "/var/lib/walled-garden-billing"
    script = (f"set -e; t=$(mktemp -p {drop}); printf 'subscribers:\\n  - id: C-1\\n    addresses: [100.64.0.10]\\n'"
              f" > $t; chmod 0640 $t; mv $t {drop}/restricted.yaml")
    ok(as_identity(billing.pw_uid, billing.pw_gid, [billing.pw_gid], ["sh", "-c", script], deadline))
    # The enforcer's unit: root, group walled-garden, no capabilities. It reads config, list and secret.
    enforcer = as_identity(0, 0, [socket_gid], ["/usr/bin/walled-garden", "check-config"], deadline)
    assert enforcer.returncode == 0 and "1 restricted subscriber(s) listed" in enforcer.stdout, \
        enforcer.stdout + enforcer.stderr
    # The portal's unit: a dynamic user in group walled-garden. The config yes; secret and list no.
    probe = ("import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p).read(); print(p, 'read')\n"
             "    except PermissionError:\n        print(p, 'denied')")
    portal = ok(as_identity(61934, 61934, [socket_gid], [python, "-c", probe, "/etc/walled-garden/config.yaml",
                                                          "/etc/walled-garden/webhook.secret",
                                                          f"{drop}/restricted.yaml"], deadline))
    assert portal.split("\n")[:3] == ["/etc/walled-garden/config.yaml read", "/etc/walled-garden/webhook.secret denied",
                                      f"{drop}/restricted.yaml denied"], portal

    units = [f"/lib/systemd/system/{u}" for u in ("walled-garden.service", "walled-garden-portal.service")]
    verified = run(["systemd-analyze", "verify", "--man=no", *units], deadline)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), \
        verified.stdout + verified.stderr
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    assert not list(wants.glob("walled-garden*")), "the package enabled a unit without the operator"
