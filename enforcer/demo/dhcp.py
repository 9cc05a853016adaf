"""A DHCP segment for the demo: subscribers that get their addresses from a real dnsmasq.

The demo's DHCP act needs what an access network has: a broadcast segment on the gateway, a
DHCP server writing a lease file the daemon watches, and clients that take whatever address
they are given. Built from the genuine Debian programs (dnsmasq, busybox udhcpc), in the
demo's own namespaces, with every file in the demo's work directory::

    <tag>-d1 ─┐
    <tag>-d2 ─┴─ bridge <tag>br (in the gateway namespace: 100.64.200.1/24)

This is the small demo copy; ``tests/kernel/dhcp_peers.py`` is the fuller test version (Kea,
dhclient -6, radclient, AppArmor checks) and documents the observed behaviour both rely on:

- udhcpc runs with ``-B`` (broadcast replies): dnsmasq's unicast OFFER reaches udhcpc's raw
  socket through the veth/bridge path with a partial checksum and would be dropped.
- Moving a client: reserve a new address for its MAC (hosts file, SIGHUP), then have it renew.
  dnsmasq NAKs the old address, udhcpc waits 3 s, DISCOVERs and gets the reserved one; the old
  lease line is replaced at once, so the old address can be reserved for another client.

The segment's namespaces and processes belong to the demo's ``Topology`` (``add_namespace``,
``popen``): its ``close`` stops them and deletes the namespaces (the bridge goes with the
gateway namespace), also on failure, Ctrl-C or SIGTERM. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .topology import Topology

__all__ = ["POOL4", "TOOLS", "Client", "DhcpClient", "DhcpError", "Dnsmasq", "Segment", "missing_tools"]

NET4 = "100.64.200"          # the segment's /24, in the shared address space like the other subscribers
GATEWAY4 = f"{NET4}.1"
POOL4 = (f"{NET4}.100", f"{NET4}.150")
_STOP_GRACE = 2.0
#: program -> Debian package, for the message when one is missing
TOOLS = {"dnsmasq": "dnsmasq-base", "udhcpc": "udhcpc"}


class DhcpError(RuntimeError):
    """A DHCP peer did not start or answer in time; the message carries its log tail."""


def missing_tools() -> list[str]:
    """The programs of ``TOOLS`` that are not installed."""
    return [name for name in TOOLS if shutil.which(name) is None]


def _must(topo: Topology, netns: str, *argv: str) -> None:
    r = topo.run(netns, *argv)
    if r.returncode != 0:
        raise DhcpError(f"{' '.join(argv)} in {netns} failed ({r.returncode}): {r.stderr.strip()}")


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path,
          proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll until ``condition``; fail after ``timeout`` or when ``proc`` exits, with the log tail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise DhcpError(f"{what}: process exited with {proc.returncode}; log: {_tail(log)}")
        if time.monotonic() > deadline:
            raise DhcpError(f"{what}: not within {timeout}s; log: {_tail(log)}")
        time.sleep(0.02)


class _Process:
    """One long-running program in a topology namespace, its output in a log file."""

    def __init__(self, topo: Topology, netns: str, argv: list[str], log: Path) -> None:
        self.topo, self.netns, self.argv, self.log = topo, netns, argv, log
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> subprocess.Popen[Any]:
        with open(self.log, "ab") as out:   # ip netns exec execs the program: the pid is the program's
            self.proc = self.topo.popen(self.netns, *self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
        return self.proc

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise DhcpError(f"{self.argv[0]} is not running; log: {_tail(self.log)}")
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL of the process group. Never raises (the
        topology's close would stop it anyway; this keeps the order of a clean shutdown)."""
        proc = self.proc
        for sig, wait in ((signal.SIGTERM, _STOP_GRACE), (signal.SIGKILL, 1.0)):
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)


@dataclass(frozen=True)
class Client:
    """A subscriber on the segment: namespace, interface, and the MAC billing knows it by."""

    netns: str
    interface: str
    mac: str


class Segment:
    """A bridge in the topology's gateway namespace with ``clients`` subscriber namespaces on it.

    Names (bridge, MACs) are fixed at construction, so the daemon's config and the list can
    name them before ``build``.
    """

    def __init__(self, topo: Topology, clients: int = 2) -> None:
        if not 1 <= clients <= 9:
            raise ValueError(f"Segment clients must be 1..9, got {clients}")
        self.topo = topo
        self.bridge = f"{topo.tag}br"
        self.gateway4 = GATEWAY4
        # locally administered MACs (02:...), fixed so the list can name them before any lease
        self.clients = [Client(f"{topo.tag}-d{i}", f"{topo.tag}d{i}", f"02:00:5e:64:c8:{i:02x}")
                        for i in range(1, clients + 1)]

    def build(self) -> None:
        """Bridge with the gateway's address, one namespace and veth per client, all up."""
        topo, gw = self.topo, self.topo.gateway.netns
        for argv in (("ip", "link", "add", self.bridge, "type", "bridge"),
                     ("ip", "addr", "add", f"{GATEWAY4}/24", "dev", self.bridge),
                     ("ip", "link", "set", self.bridge, "up")):
            _must(topo, gw, *argv)
        for i, client in enumerate(self.clients, 1):
            topo.add_namespace(f"d{i}")
            port = f"{topo.tag}p{i}"
            _must(topo, gw, "ip", "link", "add", port, "type", "veth", "peer", "name", client.interface,
                  "netns", client.netns)
            _must(topo, gw, "ip", "link", "set", port, "master", self.bridge, "up")
            _must(topo, client.netns, "ip", "link", "set", client.interface, "address", client.mac, "up")


class Dnsmasq:
    """dnsmasq as a DHCPv4 server only (``--port=0``: no DNS) on the segment's bridge.

    Runs as root (``--user=root``): the demo's work directory is 0700, and dnsmasq dropped to
    nobody could not re-read its hosts file on SIGHUP. ``--no-ping``: dnsmasq would otherwise
    ping each new address and wait 3 s for an answer before offering it; on this segment only
    the demo hands out addresses.
    """

    def __init__(self, segment: Segment, directory: Path, lease_file: Path) -> None:
        self.hosts_file = directory / "dnsmasq.hosts"
        self.hosts_file.write_text("")
        self.log = directory / "dnsmasq.log"
        self._reservations: dict[str, str] = {}
        self._process = _Process(segment.topo, segment.topo.gateway.netns, [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root", "--group=root",
            f"--dhcp-range={POOL4[0]},{POOL4[1]},2m", f"--dhcp-leasefile={lease_file}",
            f"--dhcp-hostsfile={self.hosts_file}", f"--interface={segment.bridge}", "--bind-interfaces",
            f"--pid-file={directory / 'dnsmasq.pid'}", "--dhcp-authoritative", "--no-ping", "--log-dhcp",
        ], self.log)

    def __enter__(self) -> Dnsmasq:
        try:
            proc = self._process.start()
            _wait(lambda: "DHCP, sockets bound exclusively" in _tail(self.log, 100_000), 8.0, "dnsmasq ready",
                  self.log, proc)
        except BaseException:
            self._process.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def reserve(self, mac: str, address: str) -> None:
        """Reserve ``address`` for ``mac`` and wait until dnsmasq has re-read its hosts file."""
        self._reservations[mac] = address
        self.hosts_file.write_text("".join(f"{m},{a}\n" for m, a in self._reservations.items()))
        reads = _tail(self.log, 1_000_000).count(f"read {self.hosts_file}")
        self._process.signal(signal.SIGHUP)
        _wait(lambda: _tail(self.log, 1_000_000).count(f"read {self.hosts_file}") > reads, 5.0,
              "dnsmasq re-reading its hosts file", self.log)


# udhcpc calls this on every event: it sets the address and the default route the server gave
# (no resolv.conf: the namespaces have no DNS), then records the event for the demo to wait on.
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" scope global ;;
  bound|renew)
    ip -4 addr flush dev "$interface" scope global
    ip -4 addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip -4 route replace default via "${router%% *}" dev "$interface" ;;
esac
echo "$1 ${ip:-}" >> "$0.events"
exit 0
"""


class DhcpClient:
    """busybox udhcpc on a segment client: SIGUSR1 renews now (a unicast REQUEST)."""

    def __init__(self, segment: Segment, client: Client, directory: Path) -> None:
        self.client = client
        script = directory / f"udhcpc-{client.netns}.sh"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(stat.S_IRWXU)
        self._events = Path(f"{script}.events")
        self._events.write_text("")
        self.log = directory / f"udhcpc-{client.netns}.log"
        self._process = _Process(segment.topo, client.netns, [
            "udhcpc", "-f", "-B", "-i", client.interface, "-s", str(script), "-t", "5", "-T", "1", "-A", "1",
        ], self.log)

    def __enter__(self) -> DhcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def _seen(self) -> int:
        return len(self._events.read_text().splitlines())

    def _bound_after(self, seen: int, timeout: float, what: str) -> str:
        """The address of the first bound/renew event after the ``seen`` events already there."""
        found: list[str] = []

        def arrived() -> bool:
            events = [line.split() for line in self._events.read_text().splitlines()[seen:]]
            found[:] = [e[1] for e in events if len(e) == 2 and e[0] in ("bound", "renew")]
            return bool(found)

        _wait(arrived, timeout, f"udhcpc in {self.client.netns} {what}", self.log, self._process.proc)
        return found[0]

    def acquire(self, timeout: float = 10.0) -> str:
        """Start udhcpc; the address it is bound to."""
        seen = self._seen()
        self._process.start()
        return self._bound_after(seen, timeout, "bound")

    def renew(self, timeout: float = 12.0) -> str:
        """Renew now; after a NAK udhcpc waits 3 s and DISCOVERs: the address it ends up with."""
        seen = self._seen()
        self._process.signal(signal.SIGUSR1)
        return self._bound_after(seen, timeout, "renewed")
