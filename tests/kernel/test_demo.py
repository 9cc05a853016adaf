"""``walled-garden demo`` end to end: every act runs, the DHCP act shows the walled garden
following a lease, and nothing is left behind (namespaces, dnsmasq, udhcpc), also after Ctrl-C.

The demo is for people, so it skips the DHCP act when dnsmasq or udhcpc is missing; these tests
need both (``required.tool``: a skip on a developer's machine, a failure under CI).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enforcer.demo import run
from required import tool

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "enforcer.cli", "demo"]
ACT = re.compile(r"DHCP act: ok in ([\d.]+) s \(C-3003 (\S+) -> (\S+): redirected; (\S+) for C-4004: free\)")


def _need_dhcp_tools() -> None:
    tool("dnsmasq", "dnsmasq-base")
    tool("udhcpc", "udhcpc")


def _tag(output: str) -> str:
    found = re.search(r"^\s+gateway\s+(\w+)-gw:", output, re.M)
    assert found, f"no gateway line in the demo's output:\n{output}"
    return found.group(1)


def _leftovers(tag: str) -> list[str]:
    """Namespaces and processes of the demo run tagged ``tag`` that still exist."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    left = [line.split()[0] for line in names.splitlines() if line.startswith(f"{tag}-")]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue   # exited while we looked
        # dnsmasq --interface=<tag>br, udhcpc -i <tag>d1, anything else run in the demo's namespaces
        if tag in cmdline:
            left.append(f"pid {entry.name}: {cmdline.strip()}")
    return left


def test_demo_runs_the_dhcp_act_and_cleans_up() -> None:
    _need_dhcp_tools()
    done = subprocess.run(DEMO, cwd=ROOT, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, output
    assert "right after: 200" in output                      # the payment act still restores service
    act = ACT.search(output)
    assert act, "the DHCP act did not report its outcome"
    seconds, old, new, handed = float(act.group(1)), act.group(2), act.group(3), act.group(4)
    assert old != new and handed == old
    assert seconds < 20, f"the DHCP act took {seconds} s"
    assert f"subscriber 3 at {new}: GET http://198.51.100.10/: 302" in output
    assert f"subscriber 4 at {old}: GET http://198.51.100.10/: 200" in output
    assert _leftovers(_tag(output)) == []


def test_ctrl_c_in_the_dhcp_act_leaves_nothing_behind() -> None:
    _need_dhcp_tools()
    proc = subprocess.Popen(DEMO, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    deadline = time.monotonic() + 60
    try:
        # interrupt once dnsmasq and the first udhcpc are running
        while b"subscriber 3 leased" not in output:
            assert time.monotonic() < deadline and proc.poll() is None, output.decode(errors="replace")
            if select.select([proc.stdout], [], [], 0.5)[0]:
                output += os.read(proc.stdout.fileno(), 65536)
        tag = _tag(output.decode(errors="replace"))
        assert _leftovers(tag), "nothing of the demo seen running: the test would prove nothing"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    output += proc.stdout.read()
    print(output.decode(errors="replace"))
    assert proc.returncode != 0
    assert _leftovers(tag) == []


def test_without_the_dhcp_tools_the_demo_says_how_to_install_them_and_runs_the_rest(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(run.dhcp, "missing_tools", lambda: ["udhcpc"])
    assert run.main() == 0
    output = capsys.readouterr().out
    assert "DHCP act skipped" in output and "apt install dnsmasq-base udhcpc" in output
    assert "right after: 200" in output and "DHCP act: ok" not in output
    assert _leftovers(_tag(output)) == []
