"""Real DHCP and RADIUS peers for the kernel tests: dnsmasq, Kea, udhcpc/dhclient, radclient.

The session tests (issue 13) must watch restrictions follow addresses handed out by real
servers, written to real lease files, so these helpers start the genuine Debian binaries
inside the tests' own namespaces, with every file (config, leases, pid, lock) in the test's
own directory, and stop them again. Nothing listens in the root namespace; every wait is
bounded; every process runs in its own session and is killed on exit, also on failure.

Layout built by :class:`Lan` (one broadcast segment, so one pool serves several clients and
an address can move from one client to another)::

    <tag>-c1 ─┐
    <tag>-c2 ─┼─ bridge <tag>br (in the gateway namespace: 100.64.200.1/24, 2001:db8:100:200::1/64)
    ...      ─┘

Observed behaviour the tests rely on (dnsmasq 2.90, Kea 2.2, busybox 1.35 udhcpc, dhclient 4.4):

- dnsmasq answers DISCOVER with a unicast OFFER that the veth/bridge path hands to udhcpc's raw
  socket with a partial checksum, and udhcpc drops it; ``udhcpc -B`` (broadcast flag) makes the
  server broadcast and works. A RENEW (unicast, after the address is set) needs nothing special.
- Moving a client: write a ``dhcp-host`` reservation for it with the new address, SIGHUP dnsmasq,
  then have the client renew. dnsmasq NAKs the old address ("static lease available"), udhcpc
  waits 3 s, DISCOVERs and gets the reserved address; the old lease line is replaced, so the
  old address is free at once and a reservation for another client hands it to that one.
- Kea memfile appends one CSV line per change. A release appends the lease again with
  ``valid_lifetime`` 0. Lease File Cleanup (kea-lfc, every ``lfc-interval`` seconds) moves the
  compacted leases to ``<name>.2`` and restarts ``<name>`` with just the header: a reader must
  read ``<name>.2``, ``<name>.1`` and ``<name>`` in that order, like Kea does on start.
- kea-lfc is spawned with an empty environment, so it warns that ``/var/run/kea/logger_lockfile``
  is missing (it ignores KEA_LOCKFILE_DIR); the warning is harmless.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Dhcp6Client",
    "DhcpClient",
    "Dnsmasq",
    "Kea4",
    "Kea6",
    "Lan",
    "LanClient",
    "RadclientResult",
    "apparmor_enforcing",
    "radclient",
    "read_kea_leases",
]

IP = "ip"
_CMD_TIMEOUT = 10.0  # any single ip/sysctl invocation
_START_TIMEOUT = 8.0  # a server logging that it is ready
_STOP_GRACE = 2.0  # SIGTERM -> SIGKILL
_TAG_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")  # <= 8 chars keeps interface names <= 15
_ALLOWED = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10", "2001:db8::/32", "127.0.0.0/8", "::1/128"))

# AppArmor profiles (Debian/Ubuntu) that would deny config, lease and script files in a test
# directory when enforced: the helpers refuse to start under them with a message naming the fix.
_PROFILES = {"dhclient": "/{,usr/}sbin/dhclient"}  # the others are named after the program


class PeerError(RuntimeError):
    """A peer did not start, answer or stop as expected; the message carries its log tail."""


def _check_addr(text: str, what: str) -> None:
    """Refuse an address outside the documentation/shared ranges: nothing may leave the machine."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not an address or network") from exc
    if not any(net.version == a.version and net.subnet_of(a) for a in _ALLOWED):  # type: ignore[arg-type]
        raise ValueError(f"{what}: {text} is outside the test ranges ({', '.join(map(str, _ALLOWED))})")


def _run(argv: list[str], timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if r.returncode != 0:
        raise PeerError(f"command failed ({r.returncode}): {' '.join(argv)}: {r.stderr.strip()}")
    return r


def _ns(netns: str, *argv: str) -> list[str]:
    return [IP, "netns", "exec", netns, *argv]


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None,
          proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` or when ``proc`` exits, with the log tail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"{what}: process exited with {proc.returncode}; log: {_tail(log)}")
        if time.monotonic() > deadline:
            raise PeerError(f"{what}: not within {timeout}s; log: {_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path | None, chars: int = 2000) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def apparmor_enforcing(program: str) -> bool:
    """True when AppArmor enforces the packaged profile of ``program`` (kea-dhcp4, dhclient, ...)."""
    try:
        profiles = Path("/sys/kernel/security/apparmor/profiles").read_text()
    except OSError:
        return False  # AppArmor off (or not readable): nothing is confined
    name = _PROFILES.get(program, program)
    return f"{name} (enforce)" in profiles


def _refuse_confined(program: str) -> None:
    if apparmor_enforcing(program):
        raise PeerError(
            f"AppArmor enforces the {program} profile, which denies its config/lease files in a test "
            f"directory; put it in complain mode (apparmor_parser -C -r /etc/apparmor.d/<profile>), "
            f"as .ci/install does with CI set")


class _Process:
    """One long-running peer in a namespace: own session, output in a log file, stopped on exit."""

    def __init__(self, netns: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.netns = netns
        self.log = log
        self._argv = argv
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        if self.proc is not None and self.proc.poll() is None:
            raise PeerError(f"already running: {' '.join(self._argv)}")
        env = dict(os.environ, **self._env) if self._env else None
        with open(self.log, "ab") as out:
            # ip netns exec execs the program, so the Popen pid is the peer's own pid.
            self.proc = subprocess.Popen(_ns(self.netns, *self._argv), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if not self.running:
            raise PeerError(f"not running (exit {self.proc and self.proc.returncode}): {' '.join(self._argv)}; "
                            f"log: {_tail(self.log)}")
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL of the whole process group. Never raises."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, _STOP_GRACE), (signal.SIGKILL, 1.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)


# ---------------------------------------------------------------------------- the segment


@dataclass(frozen=True)
class LanClient:
    """One subscriber on the segment: its namespace, interface and (fixed, known) MAC."""

    netns: str
    interface: str
    mac: str


class Lan:
    """A bridge in a gateway namespace with ``clients`` subscriber namespaces attached.

    ``gateway_netns`` None creates a gateway namespace too; given (e.g. a Topology's gateway),
    the bridge is added there and removed on exit, and only the namespaces made here are deleted.
    """

    def __init__(self, clients: int = 2, gateway_netns: str | None = None, *, tag: str | None = None,
                 net4: str = "100.64.200.0/24", net6: str = "2001:db8:100:200::/64") -> None:
        if not isinstance(clients, int) or not 1 <= clients <= 9:
            raise ValueError(f"Lan clients must be 1..9, got {clients!r}")
        tag = tag or "dp" + secrets.token_hex(3)[:5]
        if not _TAG_RE.match(tag):
            raise ValueError(f"Lan tag {tag!r} must match {_TAG_RE.pattern}")
        _check_addr(net4, "Lan net4")
        _check_addr(net6, "Lan net6")
        self.tag = tag
        self.net4 = ipaddress.IPv4Network(net4)
        self.net6 = ipaddress.IPv6Network(net6)
        self._own_gateway = gateway_netns is None
        self.gateway_netns = gateway_netns or f"{tag}-gw"
        self.bridge = f"{tag}br"
        self.gateway4 = str(self.net4.network_address + 1)
        self.gateway6 = str(self.net6.network_address + 1)
        mac_base = secrets.token_hex(3)
        self.clients = [
            LanClient(f"{tag}-c{i}", f"{tag}c{i}", f"02:0d:{mac_base[0:2]}:{mac_base[2:4]}:{mac_base[4:6]}:{i:02x}")
            for i in range(1, clients + 1)
        ]
        self._made: list[str] = []
        self._bridge_made = False

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        existing = _run([IP, "netns", "list"]).stdout
        wanted = ([self.gateway_netns] if self._own_gateway else []) + [c.netns for c in self.clients]
        for ns in wanted:
            if re.search(rf"^{re.escape(ns)}\b", existing, re.M):
                raise PeerError(f"namespace {ns} already exists (tag collision?)")
            _run([IP, "netns", "add", ns])
            self._made.append(ns)
            # Before the veths exist so they inherit it: link-local usable at once, no RA.
            _run(_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                     "net.ipv6.conf.default.accept_ra=0", "net.ipv6.conf.all.accept_ra=0"))
            _run(_ns(ns, IP, "link", "set", "lo", "up"))
        gw = self.gateway_netns
        _run(_ns(gw, IP, "link", "add", self.bridge, "type", "bridge"))
        self._bridge_made = True
        _run(_ns(gw, IP, "addr", "add", f"{self.gateway4}/{self.net4.prefixlen}", "dev", self.bridge))
        _run(_ns(gw, IP, "-6", "addr", "add", f"{self.gateway6}/{self.net6.prefixlen}", "dev", self.bridge, "nodad"))
        _run(_ns(gw, IP, "link", "set", self.bridge, "up"))
        for i, c in enumerate(self.clients, 1):
            port = f"{self.tag}p{i}"
            _run(_ns(gw, IP, "link", "add", port, "type", "veth", "peer", "name", c.interface, "netns", c.netns))
            _run(_ns(gw, IP, "link", "set", port, "master", self.bridge, "up"))
            _run(_ns(c.netns, IP, "link", "set", c.interface, "address", c.mac, "up"))
        _wait(self._ready, 5.0, f"Lan {self.tag} links up")

    def _ready(self) -> bool:
        for c in self.clients:
            link = subprocess.run(_ns(c.netns, IP, "-o", "link", "show", "dev", c.interface), capture_output=True,
                                  text=True, timeout=_CMD_TIMEOUT).stdout
            ll = subprocess.run(_ns(c.netns, IP, "-6", "-o", "addr", "show", "dev", c.interface, "scope", "link"),
                                capture_output=True, text=True, timeout=_CMD_TIMEOUT).stdout
            if "LOWER_UP" not in link or "fe80::" not in ll or "tentative" in ll:
                return False
        return True

    def close(self) -> None:
        """Kill what runs in our namespaces, delete them and our bridge. Idempotent, never raises."""
        for ns in list(self._made):
            _kill_netns_pids(ns)
            with contextlib.suppress(PeerError, OSError):
                _run([IP, "netns", "del", ns])
                self._made.remove(ns)
        if self._bridge_made and not self._own_gateway:
            with contextlib.suppress(PeerError, OSError):
                _run(_ns(self.gateway_netns, IP, "link", "del", self.bridge))
        self._bridge_made = False

    def addresses4(self, netns: str) -> list[str]:
        """The IPv4 addresses configured in a client namespace (what its DHCP script set)."""
        out = _run(_ns(netns, IP, "-4", "-o", "addr", "show", "scope", "global")).stdout
        return re.findall(r"inet (\S+)/", out)


def _kill_netns_pids(ns: str) -> None:
    for _ in range(10):
        r = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True, timeout=_CMD_TIMEOUT)
        pids = [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


# ---------------------------------------------------------------------------- dnsmasq


class Dnsmasq:
    """dnsmasq as a DHCPv4 server only (``--port=0``: no DNS) on one interface of a namespace.

    Runs as root (``--user=root``) because pytest's directories are 0700: dropped to nobody,
    dnsmasq could no longer re-read the hosts file on SIGHUP.
    """

    def __init__(self, netns: str, interface: str, range_start: str, range_end: str, lease_file: Path,
                 hosts_file: Path | None = None, *, lease_time: str = "2m") -> None:
        _check_addr(range_start, "Dnsmasq range_start")
        _check_addr(range_end, "Dnsmasq range_end")
        if not re.fullmatch(r"\d+[mh]?|infinite", lease_time):
            raise ValueError(f"Dnsmasq lease_time {lease_time!r}: want e.g. 2m, 1h (dnsmasq's minimum is 2m)")
        self.lease_file = Path(lease_file)
        self.hosts_file = Path(hosts_file) if hosts_file else self.lease_file.with_suffix(".hosts")
        self.hosts_file.touch()
        self._reservations: dict[str, str] = {}
        directory = self.lease_file.parent
        self.log = directory / f"dnsmasq-{interface}.log"
        self._process = _Process(netns, [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root", "--group=root",
            f"--dhcp-range={range_start},{range_end},{lease_time}", f"--dhcp-leasefile={self.lease_file}",
            f"--dhcp-hostsfile={self.hosts_file}", f"--interface={interface}", "--bind-interfaces",
            f"--pid-file={directory / f'dnsmasq-{interface}.pid'}", "--dhcp-authoritative", "--log-dhcp",
        ], self.log)

    def __enter__(self) -> Dnsmasq:
        _refuse_confined("dnsmasq")
        try:
            proc = self._process.start()
            _wait(lambda: "DHCP, sockets bound exclusively" in _tail(self.log, 100_000), _START_TIMEOUT,
                  "dnsmasq ready", self.log, proc)
        except BaseException:
            self._process.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def reassign(self, mac: str, address: str) -> None:
        """Reserve ``address`` for ``mac`` (hosts file rewritten, SIGHUP). The client's next renew is
        NAKed and its new DISCOVER gets ``address``; waits until dnsmasq has re-read the file."""
        if not re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise ValueError(f"Dnsmasq.reassign mac {mac!r}: want lower-case aa:bb:cc:dd:ee:ff")
        _check_addr(address, "Dnsmasq.reassign address")
        self._reservations[mac] = address
        self.hosts_file.write_text("".join(f"{m},{a}\n" for m, a in self._reservations.items()))
        reads = _tail(self.log, 1_000_000).count(f"read {self.hosts_file}")
        self._process.signal(signal.SIGHUP)
        _wait(lambda: _tail(self.log, 1_000_000).count(f"read {self.hosts_file}") > reads, 5.0,
              "dnsmasq re-reading its hosts file", self.log)

    def leases(self) -> list[tuple[str, str, str]]:
        """(expiry, mac, address) of each line of the lease file as it is now."""
        try:
            text = self.lease_file.read_text()
        except FileNotFoundError:
            return []
        return [(p[0], p[1], p[2]) for p in (line.split() for line in text.splitlines()) if len(p) >= 3]

    def wait_lease(self, predicate: Callable[[list[tuple[str, str, str]]], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until the lease file satisfies ``predicate``."""
        _wait(lambda: predicate(self.leases()), timeout, f"dnsmasq lease file {self.lease_file}", self.log)


# ---------------------------------------------------------------------------- DHCPv4 client

_UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script of a test client: configures only the address (no resolv.conf, no
# routes beyond the subnet's own), then records the event: a waiter sees it once it is done.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" scope global ;;
  bound|renew)
    ip -4 addr flush dev "$interface" scope global
    ip -4 addr add "$ip/$mask" dev "$interface" ;;
esac
echo "$1 ${ip:-} ${mask:-}" >> "$0.events"
exit 0
"""


class DhcpClient:
    """A real DHCPv4 client (busybox udhcpc) on one interface; it configures the address it gets.

    udhcpc because its signals map onto what the tests do: SIGUSR1 renews (unicast REQUEST),
    SIGUSR2 releases (DHCPRELEASE). ``-B`` asks for broadcast replies (see the module docstring).
    """

    def __init__(self, netns: str, interface: str, directory: Path) -> None:
        self.netns = netns
        self.interface = interface
        self._script = Path(directory) / f"udhcpc-{netns}-{interface}.sh"
        self._script.write_text(_UDHCPC_SCRIPT)
        self._script.chmod(stat.S_IRWXU)
        self._events = Path(f"{self._script}.events")
        self._events.write_text("")
        self.log = Path(directory) / f"udhcpc-{netns}-{interface}.log"
        self._process = _Process(netns, [
            "udhcpc", "-f", "-B", "-i", interface, "-s", str(self._script), "-t", "5", "-T", "1", "-A", "1",
        ], self.log)
        self.address: str | None = None

    def __enter__(self) -> DhcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _events_now(self) -> list[list[str]]:
        return [line.split() for line in self._events.read_text().splitlines() if line.strip()]

    def _await(self, seen: int, wanted: tuple[str, ...], timeout: float, what: str) -> list[str]:
        found: list[list[str]] = []

        def arrived() -> bool:
            found[:] = [e for e in self._events_now()[seen:] if e[0] in wanted]
            return bool(found)

        _wait(arrived, timeout, f"udhcpc {self.netns}/{self.interface} {what}", self.log, self._process.proc)
        return found[0]

    def acquire(self, timeout: float = 10.0) -> str:
        """Start (or, after release, wake) the client; the address it is bound to."""
        seen = len(self._events_now())
        if self._process.running:
            self._process.signal(signal.SIGUSR1)  # released state -> DISCOVER again
        else:
            self._process.start()
        event = self._await(seen, ("bound",), timeout, "bound")
        self.address = event[1]
        return self.address

    def renew(self, timeout: float = 12.0) -> str:
        """Renew now (SIGUSR1). Answered by an ACK, the same address; by a NAK, udhcpc waits 3 s,
        DISCOVERs and binds whatever the server offers: the address it ends up with."""
        seen = len(self._events_now())
        self._process.signal(signal.SIGUSR1)
        event = self._await(seen, ("renew", "bound"), timeout, "renewed")
        self.address = event[1]
        return self.address

    def release(self, timeout: float = 5.0) -> None:
        """Send DHCPRELEASE (SIGUSR2); the client drops the address and waits for ``acquire``."""
        seen = len(self._events_now())
        self._process.signal(signal.SIGUSR2)
        self._await(seen, ("deconfig",), timeout, "released")
        self.address = None

    def stop(self) -> None:
        """Stop the client without releasing (the server keeps the lease until it expires)."""
        self._process.stop()


# ---------------------------------------------------------------------------- DHCPv6 client

_DHCLIENT6_SCRIPT = """#!/bin/sh
# dhclient -6 script of a test client: sets the address (a /128, as DHCPv6 does), leaves
# routes and resolv.conf alone, then records the event (a waiter sees it once it is done).
case "$reason" in
  BOUND6|RENEW6|REBIND6|REBOOT6)
    [ -n "$new_ip6_address" ] && ip -6 addr replace "$new_ip6_address/128" dev "$interface" nodad ;;
  RELEASE6|EXPIRE6|STOP6)
    [ -n "$old_ip6_address" ] && ip -6 addr del "$old_ip6_address/128" dev "$interface" ;;
esac
echo "$reason ${new_ip6_address:--} ${new_ip6_prefix:--} ${old_ip6_address:--} ${old_ip6_prefix:--}" >> "$0.events"
exit 0
"""


class Dhcp6Client:
    """ISC dhclient -6 asking for an address (IA_NA) and, with ``prefix_delegation``, a prefix (IA_PD).

    Its own config (empty), lease, pid and script files live in ``directory``, so it touches
    neither /var/lib/dhcp nor the namespace's resolv.conf.
    """

    def __init__(self, netns: str, interface: str, directory: Path, *, prefix_delegation: bool = True) -> None:
        self.netns = netns
        self.interface = interface
        base = Path(directory) / f"dhclient6-{netns}-{interface}"
        self._script = Path(f"{base}.sh")
        self._script.write_text(_DHCLIENT6_SCRIPT)
        self._script.chmod(stat.S_IRWXU)
        self._events = Path(f"{self._script}.events")
        self._events.write_text("")
        conf = Path(f"{base}.conf")
        conf.write_text("")
        self.log = Path(f"{base}.log")
        self._files = ["-cf", str(conf), "-lf", f"{base}.leases", "-pf", f"{base}.pid", "-sf", str(self._script)]
        self._mode = ["-6", "-N", *(["-P"] if prefix_delegation else [])]
        self._pd = prefix_delegation
        self._process = _Process(netns, ["dhclient", *self._mode, "-d", "-v", *self._files, interface], self.log)
        self.address: str | None = None
        self.prefix: str | None = None

    def __enter__(self) -> Dhcp6Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _events_now(self) -> list[list[str]]:
        return [line.split() for line in self._events.read_text().splitlines() if line.strip()]

    def acquire(self, timeout: float = 10.0) -> tuple[str, str | None]:
        """Start dhclient; (address, delegated prefix or None) once both are bound."""
        _refuse_confined("dhclient")
        seen = len(self._events_now())
        proc = self._process.start()

        def bound() -> bool:
            for reason, addr, prefix, *_ in self._events_now()[seen:]:
                if reason in ("BOUND6", "REBOOT6"):
                    self.address = addr if addr != "-" else self.address
                    self.prefix = prefix if prefix != "-" else self.prefix
            return self.address is not None and (self.prefix is not None or not self._pd)

        _wait(bound, timeout, f"dhclient -6 {self.netns}/{self.interface} bound", self.log, proc)
        assert self.address is not None
        return self.address, self.prefix

    def release(self, timeout: float = 10.0) -> None:
        """``dhclient -r``: stops the running client (via its pid file) and sends a RELEASE."""
        _run(_ns(self.netns, "dhclient", *self._mode, "-r", *self._files, self.interface), timeout=timeout)
        if self._process.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.proc.wait(timeout=_STOP_GRACE)
        self.address = self.prefix = None

    def stop(self) -> None:
        """Stop without releasing."""
        self._process.stop()


# ---------------------------------------------------------------------------- Kea


class _Kea:
    """Shared part of Kea4/Kea6: config JSON, pid/lock files and log in the test's directory."""

    program = ""
    started = ""

    def __init__(self, netns: str, config: dict[str, Any], lease_file: Path, directory: Path) -> None:
        self.lease_file = Path(lease_file)
        self.directory = Path(directory)
        self.config_file = self.directory / f"{self.program}-{netns}.json"
        self.config_file.write_text(json.dumps(config, indent=2))
        self.log = self.directory / f"{self.program}-{netns}.log"
        env = {"KEA_LOCKFILE_DIR": str(self.directory), "KEA_PIDFILE_DIR": str(self.directory)}
        self._process = _Process(netns, [self.program, "-c", str(self.config_file)], self.log, env)

    def __enter__(self) -> _Kea:
        _refuse_confined(self.program)
        _refuse_confined("kea-lfc")
        check = subprocess.run(_ns(self._process.netns, self.program, "-t", str(self.config_file)),
                               capture_output=True, text=True,
                               timeout=_CMD_TIMEOUT, env=dict(os.environ, KEA_LOCKFILE_DIR=str(self.directory),
                                                              KEA_PIDFILE_DIR=str(self.directory)))
        if check.returncode != 0:
            raise PeerError(f"{self.program} rejects {self.config_file}: {(check.stdout + check.stderr)[-2000:]}")
        try:
            proc = self._process.start()
            _wait(lambda: self.started in _tail(self.log, 100_000), _START_TIMEOUT, f"{self.program} ready",
                  self.log, proc)
        except BaseException:
            self._process.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def leases(self) -> list[dict[str, str]]:
        """Every lease line, in the order Kea itself reads them (``.2``, ``.1``, then the live file)."""
        return read_kea_leases(self.lease_file)

    def wait_lease(self, predicate: Callable[[list[dict[str, str]]], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until the lease lines satisfy ``predicate``."""
        _wait(lambda: predicate(self.leases()), timeout, f"{self.program} lease file {self.lease_file}", self.log)


def read_kea_leases(lease_file: Path) -> list[dict[str, str]]:
    """Kea memfile lines as dicts keyed by the header, from ``<name>.2``, ``<name>.1`` and ``<name>``."""
    rows: list[dict[str, str]] = []
    for path in (Path(f"{lease_file}.2"), Path(f"{lease_file}.1"), Path(lease_file)):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        if not lines:
            continue
        header = lines[0].split(",")
        rows += [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line.strip()]
    return rows


def _memfile(lease_file: Path, lfc_interval: int) -> dict[str, Any]:
    if not isinstance(lfc_interval, int) or lfc_interval < 0:
        raise ValueError(f"lfc_interval {lfc_interval!r}: want seconds >= 0 (0 turns Lease File Cleanup off)")
    if not Path(lease_file).is_absolute():
        raise ValueError(f"lease_file {lease_file}: Kea wants an absolute path")
    return {"type": "memfile", "persist": True, "name": str(lease_file), "lfc-interval": lfc_interval}


def _pool(pool: str | tuple[str, str], what: str) -> str:
    first, last = pool if isinstance(pool, tuple) else [p.strip() for p in pool.split("-", 1)]
    _check_addr(first, what)
    _check_addr(last, what)
    return f"{first} - {last}"


class Kea4(_Kea):
    """kea-dhcp4 with a memfile lease database (``lfc_interval`` 0 = no cleanup; 1 = every second)."""

    program = "kea-dhcp4"
    started = "DHCP4_STARTED"

    def __init__(self, netns: str, interface: str, subnet: str, pool: str | tuple[str, str], lease_file: Path, *,
                 directory: Path | None = None, lfc_interval: int = 0, valid_lifetime: int = 120,
                 reservations: Iterable[tuple[str, str]] = ()) -> None:
        _check_addr(subnet, "Kea4 subnet")
        config = {"Dhcp4": {
            "interfaces-config": {"interfaces": [interface], "dhcp-socket-type": "raw"},
            "lease-database": _memfile(lease_file, lfc_interval),
            "valid-lifetime": valid_lifetime, "renew-timer": valid_lifetime // 2,
            "rebind-timer": valid_lifetime * 3 // 4,
            "subnet4": [{"id": 1, "subnet": subnet, "interface": interface,
                         "pools": [{"pool": _pool(pool, "Kea4 pool")}],
                         "reservations": [{"hw-address": m, "ip-address": a} for m, a in reservations]}],
            "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stdout"}], "severity": "INFO"}],
        }}
        super().__init__(netns, config, lease_file, directory or Path(lease_file).parent)

    def __enter__(self) -> Kea4:
        super().__enter__()
        return self


class Kea6(_Kea):
    """kea-dhcp6 with a memfile lease database, an address pool and a prefix-delegation pool."""

    program = "kea-dhcp6"
    started = "DHCP6_STARTED"

    def __init__(self, netns: str, interface: str, subnet: str, pool: str | tuple[str, str], pd_pool: str,
                 lease_file: Path, *, delegated_len: int = 56, directory: Path | None = None, lfc_interval: int = 0,
                 valid_lifetime: int = 120) -> None:
        _check_addr(subnet, "Kea6 subnet")
        _check_addr(pd_pool, "Kea6 pd_pool")
        pd = ipaddress.IPv6Network(pd_pool)
        if not pd.prefixlen <= delegated_len <= 128:
            raise ValueError(f"Kea6 delegated_len {delegated_len}: must lie between {pd.prefixlen} and 128")
        directory = directory or Path(lease_file).parent
        config = {"Dhcp6": {
            "interfaces-config": {"interfaces": [interface]},
            "lease-database": _memfile(lease_file, lfc_interval),
            "server-id": {"type": "LLT", "persist": False},
            "data-directory": str(directory),
            "preferred-lifetime": valid_lifetime * 3 // 4, "valid-lifetime": valid_lifetime,
            "renew-timer": valid_lifetime // 2, "rebind-timer": valid_lifetime * 2 // 3,
            "subnet6": [{"id": 1, "subnet": subnet, "interface": interface,
                         "pools": [{"pool": _pool(pool, "Kea6 pool")}],
                         "pd-pools": [{"prefix": str(pd.network_address), "prefix-len": pd.prefixlen,
                                       "delegated-len": delegated_len}]}],
            "loggers": [{"name": "kea-dhcp6", "output_options": [{"output": "stdout"}], "severity": "INFO"}],
        }}
        super().__init__(netns, config, lease_file, directory)

    def __enter__(self) -> Kea6:
        super().__enter__()
        return self


# ---------------------------------------------------------------------------- RADIUS


@dataclass(frozen=True)
class RadclientResult:
    """radclient's exit code and its combined output.

    The exit code alone is not the answer: radclient 3.2 exits 0 even when it could not send
    at all ("sendto failed: Network is unreachable"); ``answered`` checks for the response.
    """

    returncode: int
    output: str

    @property
    def answered(self) -> bool:
        """True when a response (Accounting-Response, Access-Accept/Reject, CoA-ACK, ...) came back."""
        return self.returncode == 0 and "Received " in self.output


_ATTR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def radclient(host: str, port: int, secret: str, attributes: Mapping[str, str | int], *,
              netns: str | None = None, kind: str = "acct", timeout: float = 1.0, retries: int = 1) -> RadclientResult:
    """Send one request with FreeRADIUS's radclient (from ``netns``, or the root namespace to loopback).

    ``attributes`` e.g. {"Acct-Status-Type": "Start", "User-Name": "C-1001", "Framed-IP-Address": ...};
    strings are quoted for radclient. Bounded: radclient gives up after ``retries`` x ``timeout``.
    """
    _check_addr(host, "radclient host")
    if netns is None and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"radclient host {host}: from the root namespace only loopback is allowed")
    if kind not in ("acct", "auth", "status", "coa", "disconnect"):
        raise ValueError(f"radclient kind {kind!r}: want acct, auth, status, coa or disconnect")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"radclient port {port!r}: want 1..65535")
    lines = []
    for name, value in attributes.items():
        if not _ATTR_RE.match(name):
            raise ValueError(f"radclient attribute name {name!r}: want a dictionary name like Acct-Status-Type")
        if isinstance(value, int):
            lines.append(f"{name} = {value}")
        elif "\n" in value:
            raise ValueError(f"radclient attribute {name}: value must be one line")
        else:
            quoted = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{name} = "{quoted}"')
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv = ["radclient", "-x", "-r", str(retries), "-t", f"{timeout:g}", target, kind, secret]
    if netns is not None:
        argv = _ns(netns, *argv)
    limit = timeout * retries + 5.0
    try:
        r = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"radclient did not exit within {limit}s: {' '.join(argv)}") from exc
    return RadclientResult(r.returncode, r.stdout + r.stderr)
