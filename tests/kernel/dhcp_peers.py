"""Real DHCP and RADIUS peers for the kernel tests: dnsmasq, Kea, udhcpc/dhclient, radclient.

The session tests (issue 13) must watch restrictions follow addresses handed out by real
servers, written to real lease files, so these helpers start the genuine Debian binaries
inside the tests' own namespaces, with every file (config, leases, pid, lock) in the test's
own directory, and stop them again. Nothing listens in the root namespace; every wait is
bounded; every process runs in its own session and is killed on exit, also on failure.

The runners the demo needs too (the process helper, dnsmasq, udhcpc and its event script, the
bridge/veth wiring) live once in ``enforcer/demo/dhcp.py``; this module builds the tests' API on
them: its own namespaces (``Lan``), address checks, AppArmor checks, lease reading, Kea, dhclient
-6 and radclient.

Layout built by :class:`Lan` (one broadcast segment, so one pool serves several clients and
an address can move from one client to another)::

    <tag>-c1 ─┐
    <tag>-c2 ─┼─ bridge <tag>br (in the gateway namespace: 100.64.200.1/24, 2001:db8:100:200::1/64)
    ...      ─┘

Observed behaviour the tests rely on (dnsmasq 2.90, Kea 2.2, busybox 1.35 udhcpc, dhclient 4.4):

- dnsmasq runs with ``--no-ping`` (as in the demo): otherwise it pings each new address and
  waits 3 s for an answer before offering it; only the test's server hands out addresses here.
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
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enforcer.demo.dhcp import (
    STOP_GRACE,
    Client,
    DhcpError,
    DnsmasqServer,
    Process,
    ScriptedClient,
    Udhcpc,
    bridge_clients,
    wait,
)
from enforcer.demo.topology import kill_netns_pids

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
_TAG_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")  # <= 8 chars keeps interface names <= 15
_ALLOWED = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10", "2001:db8::/32", "127.0.0.0/8", "::1/128"))

# AppArmor profiles (Debian/Ubuntu) that would deny config, lease and script files in a test
# directory when enforced: the helpers refuse to start under them with a message naming the fix.
_PROFILES = {"dhclient": "/{,usr/}sbin/dhclient"}  # the others are named after the program


#: A peer did not start, answer or stop as expected; the message carries its log tail.
PeerError = DhcpError


def _check_addr(text: str, what: str) -> None:
    """Refuse an address outside the documentation/shared ranges: nothing may leave the machine."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not an address or network") from exc
    if not any(net.version == a.version and net.subnet_of(a) for a in _ALLOWED):  # type: ignore[arg-type]
        raise ValueError(f"{what}: {text} is outside the test ranges ({', '.join(map(str, _ALLOWED))})")


def unused_address(*taken: str, candidates: Iterable[str] = ("100.64.200.140", "100.64.200.141",
                                                               "100.64.200.142")) -> str:
    """The first of ``candidates`` nobody holds. A reservation for an address another client still
    leases is not handed out (dnsmasq keeps the live lease and ACKs the old one), so a move must go
    to an address neither client has."""
    for address in candidates:
        if address not in taken:
            return address
    raise ValueError(f"unused_address: all of {tuple(candidates)} are taken by {taken}")


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


def _popen(netns: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
    """Start a peer in ``netns`` in a session of its own (the tests' namespaces have no Topology)."""
    return subprocess.Popen(_ns(netns, *argv), start_new_session=True, **kw)


def _must(netns: str, *argv: str) -> None:
    _run(_ns(netns, *argv))


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


# ---------------------------------------------------------------------------- the segment


#: One subscriber on the segment: its namespace, interface and (fixed, known) MAC.
LanClient = Client


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
        self._bridge_made = True   # before: a half-built bridge is deleted too
        bridge_clients(_must, self.gateway_netns, self.bridge,
                       [f"{self.gateway4}/{self.net4.prefixlen}", f"{self.gateway6}/{self.net6.prefixlen}"],
                       [(f"{self.tag}p{i}", c) for i, c in enumerate(self.clients, 1)])
        wait(self._ready, 5.0, f"Lan {self.tag} links up")

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
            kill_netns_pids(ns)
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


# ---------------------------------------------------------------------------- dnsmasq


class Dnsmasq(DnsmasqServer):
    """The demo's dnsmasq runner (DHCPv4 only, ``--no-ping``) on one interface of any namespace,
    with the tests' knobs: checked addresses, a lease time, an AppArmor check, lease reading."""

    def __init__(self, netns: str, interface: str, range_start: str, range_end: str, lease_file: Path,
                 hosts_file: Path | None = None, *, lease_time: str = "2m") -> None:
        _check_addr(range_start, "Dnsmasq range_start")
        _check_addr(range_end, "Dnsmasq range_end")
        if not re.fullmatch(r"\d+[mh]?|infinite", lease_time):
            raise ValueError(f"Dnsmasq lease_time {lease_time!r}: want e.g. 2m, 1h (dnsmasq's minimum is 2m)")
        super().__init__(_popen, netns, interface, range_start, range_end, lease_file, hosts_file,
                         lease_time=lease_time)

    def __enter__(self) -> Dnsmasq:
        _refuse_confined("dnsmasq")
        return super().__enter__()

    def reassign(self, mac: str, address: str) -> None:
        """Reserve ``address`` for ``mac`` (hosts file rewritten, SIGHUP). The client's next renew is
        NAKed and its new DISCOVER gets ``address``; waits until dnsmasq has re-read the file."""
        if not re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
            raise ValueError(f"Dnsmasq.reassign mac {mac!r}: want lower-case aa:bb:cc:dd:ee:ff")
        _check_addr(address, "Dnsmasq.reassign address")
        self.reserve(mac, address)

    def leases(self) -> list[tuple[str, str, str]]:
        """(expiry, mac, address) of each line of the lease file as it is now."""
        try:
            text = self.lease_file.read_text()
        except FileNotFoundError:
            return []
        return [(p[0], p[1], p[2]) for p in (line.split() for line in text.splitlines()) if len(p) >= 3]

    def wait_lease(self, predicate: Callable[[list[tuple[str, str, str]]], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until the lease file satisfies ``predicate``."""
        wait(lambda: predicate(self.leases()), timeout, f"dnsmasq lease file {self.lease_file}", self.log)


# ---------------------------------------------------------------------------- DHCPv4 client

class DhcpClient(Udhcpc):
    """A real DHCPv4 client (busybox udhcpc, the demo's runner) on one interface; it configures
    only the address it gets (the tests set routes themselves). acquire, renew, release, stop."""

    def __init__(self, netns: str, interface: str, directory: Path) -> None:
        super().__init__(_popen, netns, interface, directory, default_route=False)


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


class Dhcp6Client(ScriptedClient):
    """ISC dhclient -6 asking for an address (IA_NA) and, with ``prefix_delegation``, a prefix (IA_PD).

    Its own config (empty), lease, pid and script files live in ``directory``, so it touches
    neither /var/lib/dhcp nor the namespace's resolv.conf.
    """

    def __init__(self, netns: str, interface: str, directory: Path, *, prefix_delegation: bool = True) -> None:
        self.netns = netns
        self.interface = interface
        base = Path(directory) / f"dhclient6-{netns}-{interface}"
        super().__init__(Path(f"{base}.sh"), _DHCLIENT6_SCRIPT)
        conf = Path(f"{base}.conf")
        conf.write_text("")
        self.log = Path(f"{base}.log")
        self._files = ["-cf", str(conf), "-lf", f"{base}.leases", "-pf", f"{base}.pid", "-sf", str(self._script)]
        self._mode = ["-6", "-N", *(["-P"] if prefix_delegation else [])]
        self._pd = prefix_delegation
        self._process = Process(_popen, netns, ["dhclient", *self._mode, "-d", "-v", *self._files, interface],
                                self.log)
        self.address: str | None = None
        self.prefix: str | None = None

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

        wait(bound, timeout, f"dhclient -6 {self.netns}/{self.interface} bound", self.log, proc)
        assert self.address is not None
        return self.address, self.prefix

    def release(self, timeout: float = 10.0) -> None:
        """``dhclient -r``: stops the running client (via its pid file) and sends a RELEASE."""
        _run(_ns(self.netns, "dhclient", *self._mode, "-r", *self._files, self.interface), timeout=timeout)
        if self._process.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.proc.wait(timeout=STOP_GRACE)
        self.address = self.prefix = None


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
        self._process = Process(_popen, netns, [self.program, "-c", str(self.config_file)], self.log, env)

    def __enter__(self) -> _Kea:
        _refuse_confined(self.program)
        _refuse_confined("kea-lfc")
        check = subprocess.run(_ns(self._process.netns, self.program, "-t", str(self.config_file)),
                               capture_output=True, text=True,
                               timeout=_CMD_TIMEOUT, env=dict(os.environ, KEA_LOCKFILE_DIR=str(self.directory),
                                                              KEA_PIDFILE_DIR=str(self.directory)))
        if check.returncode != 0:
            raise PeerError(f"{self.program} rejects {self.config_file}: {(check.stdout + check.stderr)[-2000:]}")
        self._process.start_until(self.started)
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stop()

    def leases(self) -> list[dict[str, str]]:
        """Every lease line, in the order Kea itself reads them (``.2``, ``.1``, then the live file)."""
        return read_kea_leases(self.lease_file)

    def wait_lease(self, predicate: Callable[[list[dict[str, str]]], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until the lease lines satisfy ``predicate``."""
        wait(lambda: predicate(self.leases()), timeout, f"{self.program} lease file {self.lease_file}", self.log)


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
