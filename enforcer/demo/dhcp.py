"""A DHCP segment for the demo: subscribers that get their addresses from a real dnsmasq.

The demo's DHCP act needs what an access network has: a broadcast segment on the gateway, a
DHCP server writing a lease file the daemon watches, and clients that take whatever address
they are given. Built from the genuine Debian programs (dnsmasq, busybox udhcpc), in the
demo's own namespaces, with every file in the demo's work directory::

    <tag>-d1 ─┐
    <tag>-d2 ─┴─ bridge <tag>br (in the gateway namespace: 100.64.200.1/24)

The runners here (``Process``, ``DnsmasqServer``, ``Udhcpc``, ``ScriptedClient``,
``bridge_clients``) are the one copy: ``tests/kernel/dhcp_peers.py`` builds the kernel tests'
fuller peers on them (Kea, dhclient -6, radclient, AppArmor checks, its own namespaces) and
documents the observed behaviour both rely on:

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from .topology import Topology

__all__ = [
    "POOL4", "TOOLS", "Client", "DhcpClient", "DhcpError", "Dnsmasq", "DnsmasqServer", "Popen", "Process",
    "ScriptedClient", "Segment", "Udhcpc", "bridge_clients", "missing_tools", "tail", "wait",
]

NET4 = "100.64.200"          # the segment's /24, in the shared address space like the other subscribers
GATEWAY4 = f"{NET4}.1"
POOL4 = (f"{NET4}.100", f"{NET4}.150")
STOP_GRACE = 2.0             # SIGTERM -> SIGKILL
START_TIMEOUT = 8.0          # a server logging that it is ready
#: program -> Debian package, for the message when one is missing
TOOLS = {"dnsmasq": "dnsmasq-base", "udhcpc": "udhcpc"}

#: Starts ``argv`` in namespace ``netns`` in a session of its own (``Topology.popen``, or the
#: kernel tests' own): ``popen(netns, *argv, **popen_keywords)``.
Popen = Callable[..., subprocess.Popen[Any]]
#: Runs ``argv`` in namespace ``netns`` and raises when it fails: ``must(netns, *argv)``.
Must = Callable[..., None]


class DhcpError(RuntimeError):
    """A DHCP peer did not start or answer in time; the message carries its log tail."""


def missing_tools() -> list[str]:
    """The programs of ``TOOLS`` that are not installed."""
    return [name for name in TOOLS if shutil.which(name) is None]


def tail(path: Path | None, chars: int = 2000) -> str:
    """The end of a peer's log, for an error message ("" when there is none yet)."""
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def wait(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None,
         proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll until ``condition``; fail after ``timeout`` or when ``proc`` exits, with the log tail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise DhcpError(f"{what}: process exited with {proc.returncode}; log: {tail(log)}")
        if time.monotonic() > deadline:
            raise DhcpError(f"{what}: not within {timeout}s; log: {tail(log)}")
        time.sleep(0.02)


class Process:
    """One long-running program in a namespace, its output in a log file, stopped on exit.

    ``popen`` starts it in a session of its own, so ``stop`` can kill whatever it forked.
    """

    def __init__(self, popen: Popen, netns: str, argv: list[str], log: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.netns, self.argv, self.log = netns, argv, log
        self._popen, self._env = popen, env
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> subprocess.Popen[Any]:
        if self.running:
            raise DhcpError(f"already running: {' '.join(self.argv)}")
        env = dict(os.environ, **self._env) if self._env else None
        with open(self.log, "ab") as out:   # ip netns exec execs the program: the pid is the program's
            self.proc = self._popen(self.netns, *self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
        return self.proc

    def start_until(self, ready: str, timeout: float = START_TIMEOUT) -> None:
        """Start, and wait until the log shows ``ready`` (a server is ready only once it says so);
        stopped again when that fails."""
        try:
            proc = self.start()
            wait(lambda: ready in tail(self.log, 100_000), timeout, f"{self.argv[0]} ready", self.log, proc)
        except BaseException:
            self.stop()
            raise

    def signal(self, sig: int) -> None:
        if self.proc is None or not self.running:
            raise DhcpError(f"not running (exit {self.proc and self.proc.returncode}): {' '.join(self.argv)}; "
                            f"log: {tail(self.log)}")
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL of the process group. Never raises (whoever owns
        the namespace kills what is left anyway; this keeps the order of a clean shutdown)."""
        proc = self.proc
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 1.0)):
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)


# ---------------------------------------------------------------------------- the segment


@dataclass(frozen=True)
class Client:
    """A subscriber on a segment: namespace, interface, and the MAC billing knows it by."""

    netns: str
    interface: str
    mac: str


def bridge_clients(must: Must, gateway_netns: str, bridge: str, addresses: Iterable[str],
                   ports: Sequence[tuple[str, Client]]) -> None:
    """A bridge in ``gateway_netns`` with ``addresses`` (CIDRs; IPv6 without DAD), and per
    (port, client) a veth from the bridge port into the client's existing namespace, the client
    end carrying its MAC; all up. Nothing is attached to the root namespace."""
    must(gateway_netns, "ip", "link", "add", bridge, "type", "bridge")
    for cidr in addresses:
        must(gateway_netns, "ip", "addr", "add", cidr, "dev", bridge, *(["nodad"] if ":" in cidr else []))
    must(gateway_netns, "ip", "link", "set", bridge, "up")
    for port, client in ports:
        must(gateway_netns, "ip", "link", "add", port, "type", "veth", "peer", "name", client.interface,
             "netns", client.netns)
        must(gateway_netns, "ip", "link", "set", port, "master", bridge, "up")
        must(client.netns, "ip", "link", "set", client.interface, "address", client.mac, "up")


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

    def _must(self, netns: str, *argv: str) -> None:
        r = self.topo.run(netns, *argv)
        if r.returncode != 0:
            raise DhcpError(f"{' '.join(argv)} in {netns} failed ({r.returncode}): {r.stderr.strip()}")

    def build(self) -> None:
        """Bridge with the gateway's address, one namespace and veth per client, all up."""
        for i in range(1, len(self.clients) + 1):
            self.topo.add_namespace(f"d{i}")
        bridge_clients(self._must, self.topo.gateway.netns, self.bridge, [f"{GATEWAY4}/24"],
                       [(f"{self.topo.tag}p{i}", c) for i, c in enumerate(self.clients, 1)])


# ---------------------------------------------------------------------------- dnsmasq


class DnsmasqServer:
    """dnsmasq as a DHCPv4 server only (``--port=0``: no DNS) on one interface of a namespace,
    handing out ``first``..``last``; its log and pid file beside the lease file.

    Runs as root (``--user=root``): the work directories are 0700, and dnsmasq dropped to nobody
    could not re-read its hosts file on SIGHUP. ``--no-ping``: dnsmasq would otherwise ping each
    new address and wait 3 s for an answer before offering it; on these segments only it hands
    out addresses.
    """

    def __init__(self, popen: Popen, netns: str, interface: str, first: str, last: str, lease_file: Path,
                 hosts_file: Path | None = None, *, lease_time: str = "2m") -> None:
        self.lease_file = Path(lease_file)
        self.hosts_file = Path(hosts_file) if hosts_file else self.lease_file.with_suffix(".hosts")
        self.hosts_file.write_text("")
        directory = self.lease_file.parent
        self.log = directory / f"dnsmasq-{interface}.log"
        self._reservations: dict[str, str] = {}
        self._process = Process(popen, netns, [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root", "--group=root",
            f"--dhcp-range={first},{last},{lease_time}", f"--dhcp-leasefile={self.lease_file}",
            f"--dhcp-hostsfile={self.hosts_file}", f"--interface={interface}", "--bind-interfaces",
            f"--pid-file={directory / f'dnsmasq-{interface}.pid'}", "--dhcp-authoritative", "--no-ping",
            "--log-dhcp",
        ], self.log)

    def __enter__(self) -> Self:
        self._process.start_until("DHCP, sockets bound exclusively")
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def reserve(self, mac: str, address: str) -> None:
        """Reserve ``address`` for ``mac`` and wait until dnsmasq has re-read its hosts file."""
        self._reservations[mac] = address
        self.hosts_file.write_text("".join(f"{m},{a}\n" for m, a in self._reservations.items()))
        reads = tail(self.log, 1_000_000).count(f"read {self.hosts_file}")
        self._process.signal(signal.SIGHUP)
        wait(lambda: tail(self.log, 1_000_000).count(f"read {self.hosts_file}") > reads, 5.0,
             "dnsmasq re-reading its hosts file", self.log)


class Dnsmasq(DnsmasqServer):
    """The demo's dnsmasq: on the segment's bridge, handing out ``POOL4``."""

    def __init__(self, segment: Segment, directory: Path, lease_file: Path) -> None:
        super().__init__(segment.topo.popen, segment.topo.gateway.netns, segment.bridge, *POOL4, lease_file,
                         directory / "dnsmasq.hosts")


# ---------------------------------------------------------------------------- clients


class ScriptedClient:
    """A DHCP client whose event script sets the address, then appends the event as one line
    to ``<script>.events``: a waiter that reads an event knows its address is already set."""

    def __init__(self, script: Path, text: str) -> None:
        self._script = script
        script.write_text(text)
        script.chmod(stat.S_IRWXU)
        self._events = Path(f"{script}.events")
        self._events.write_text("")
        self._process: Process

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _events_now(self) -> list[list[str]]:
        return [line.split() for line in self._events.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        """Stop the client without releasing (the server keeps the lease until it expires)."""
        self._process.stop()


# udhcpc calls this on every event: it sets the address and (``{route}``) the default route the
# server gave (no resolv.conf: the namespaces have no DNS), then records the event for a waiter.
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" scope global ;;
  bound|renew)
    ip -4 addr flush dev "$interface" scope global
    ip -4 addr add "$ip/$mask" dev "$interface"{route} ;;
esac
echo "$1 ${{ip:-}} ${{mask:-}}" >> "$0.events"
exit 0
"""
_UDHCPC_ROUTE = '\n    [ -n "$router" ] && ip -4 route replace default via "${router%% *}" dev "$interface"'


class Udhcpc(ScriptedClient):
    """busybox udhcpc on one interface of a namespace; it configures the address it gets.

    udhcpc because its signals map onto what a demo or test does: SIGUSR1 renews (a unicast
    REQUEST), SIGUSR2 releases (DHCPRELEASE). ``-B`` asks for broadcast replies (see above).
    ``default_route``: also set the default route the server offers (dnsmasq offers itself).
    """

    def __init__(self, popen: Popen, netns: str, interface: str, directory: Path, *,
                 default_route: bool = True) -> None:
        script = _UDHCPC_SCRIPT.format(route=_UDHCPC_ROUTE if default_route else "")
        super().__init__(Path(directory) / f"udhcpc-{netns}-{interface}.sh", script)
        self.netns, self.interface = netns, interface
        self.log = Path(directory) / f"udhcpc-{netns}-{interface}.log"
        self._process = Process(popen, netns, [
            "udhcpc", "-f", "-B", "-i", interface, "-s", str(self._script), "-t", "5", "-T", "1", "-A", "1",
        ], self.log)
        self.address: str | None = None

    def _await(self, seen: int, wanted: tuple[str, ...], timeout: float, what: str) -> list[str]:
        """The first event of ``wanted`` after the ``seen`` events already there."""
        found: list[list[str]] = []

        def arrived() -> bool:
            found[:] = [e for e in self._events_now()[seen:] if e[0] in wanted]
            return bool(found)

        wait(arrived, timeout, f"udhcpc {self.netns}/{self.interface} {what}", self.log, self._process.proc)
        return found[0]

    def acquire(self, timeout: float = 10.0) -> str:
        """Start (or, after ``release``, wake) the client; the address it is bound to."""
        seen = len(self._events_now())
        if self._process.running:
            self._process.signal(signal.SIGUSR1)  # released state -> DISCOVER again
        else:
            self._process.start()
        self.address = self._await(seen, ("bound",), timeout, "bound")[1]
        return self.address

    def renew(self, timeout: float = 12.0) -> str:
        """Renew now (SIGUSR1). Answered by an ACK, the same address; by a NAK, udhcpc waits 3 s,
        DISCOVERs and binds whatever the server offers: the address it ends up with."""
        seen = len(self._events_now())
        self._process.signal(signal.SIGUSR1)
        self.address = self._await(seen, ("renew", "bound"), timeout, "renewed")[1]
        return self.address

    def release(self, timeout: float = 5.0) -> None:
        """Send DHCPRELEASE (SIGUSR2); the client drops the address and waits for ``acquire``."""
        seen = len(self._events_now())
        self._process.signal(signal.SIGUSR2)
        self._await(seen, ("deconfig",), timeout, "released")
        self.address = None


class DhcpClient(Udhcpc):
    """udhcpc on a segment client of the demo."""

    def __init__(self, segment: Segment, client: Client, directory: Path) -> None:
        super().__init__(segment.topo.popen, client.netns, client.interface, directory)
        self.client = client
