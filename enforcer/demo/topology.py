"""A simulated ISP built from Linux network namespaces.

Used by the ``walled-garden demo`` command and by kernel tests that need
real traffic.  Layout (``<tag>`` is random per run so parallel runs never
collide)::

    <tag>-s1 ─┐
    <tag>-s2 ─┼─ <tag>-gw ─┬─ <tag>-up   "internet"     198.51.100.10 / 2001:db8:198::10
    ...      ─┘            └─ <tag>-gd   walled garden  203.0.113.10  / 2001:db8:203::10

Subscriber i: 100.64.i.10/24 and 2001:db8:100:i::10/64 (i written in
decimal in both, so subscriber 12 is 100.64.12.10 and 2001:db8:100:12::10).

Safety: every link is a veth pair *between our own namespaces*; nothing is
ever attached to the root namespace and no namespace has a route leaving the
machine.  ``curl`` refuses literal addresses outside the documentation /
shared ranges used here (or loopback).  Every wait is bounded and cleanup
runs on exceptions, Ctrl-C, SIGTERM/SIGHUP and interpreter exit (atexit).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = ["Host", "Topology", "kill_netns_pids"]

log = logging.getLogger(__name__)

IP = "ip"
SYSCTL = "sysctl"
CURL = "/usr/bin/curl" if os.path.exists("/usr/bin/curl") else "curl"

MAX_SUBSCRIBERS = 254  # one /24 per subscriber inside 100.64.0.0/16
_TAG_RE = re.compile(r"^[a-z][a-z0-9]{1,7}$")  # <=8 chars keeps veth names <=15

# The only destinations traffic may be aimed at (besides loopback).
ALLOWED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "100.64.0.0/10",
        "2001:db8:100::/48",
        "198.51.100.0/24",
        "2001:db8:198::/64",
        "203.0.113.0/24",
        "2001:db8:203::/64",
    )
)

_CMD_TIMEOUT = 10.0  # any single ip/sysctl invocation
_READY_TIMEOUT = 5.0  # links up / addresses usable / servers listening
_TERM_GRACE = 2.0  # SIGTERM -> SIGKILL grace for our processes


@dataclass(frozen=True)
class Host:
    """One endpoint: the namespace it lives in and its v4/v6 addresses."""

    netns: str
    addr4: str
    addr6: str


def _sub_net4(i: int) -> str:
    return f"100.64.{i}"


def _sub_net6(i: int) -> str:
    return f"2001:db8:100:{i}:"


# Tiny HTTP server run in a namespace.  socketserver is used directly instead
# of http.server.HTTPServer because HTTPServer.server_bind calls
# socket.getfqdn(), which would do DNS inside a namespace with no resolver.
_HTTP_SERVER_CODE = r"""
import socket, socketserver, sys, threading
from http.server import BaseHTTPRequestHandler

body = sys.argv[1].encode()
addrs = sys.argv[2].split(",")
ports = [int(p) for p in sys.argv[3].split(",")]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "wg-demo"
    sys_version = ""
    def _reply(self, with_body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(body)
    def do_GET(self):
        self._reply(True)
    def do_HEAD(self):
        self._reply(False)
    def log_message(self, *a):
        pass

class Server4(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET
    allow_reuse_address = True
    daemon_threads = True

class Server6(Server4):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

servers = []
for a in addrs:
    for p in ports:
        cls = Server6 if ":" in a else Server4
        servers.append(cls((a, p), Handler))
threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
for t in threads:
    t.start()
print("READY", flush=True)
for t in threads:
    t.join()
"""

# Bounded readiness probe run inside the server's namespace.
_PROBE_CODE = r"""
import socket, sys, time
targets = [(a, int(p)) for a in sys.argv[1].split(",") for p in sys.argv[2].split(",")]
deadline = time.monotonic() + float(sys.argv[3])
pending = list(targets)
while pending and time.monotonic() < deadline:
    still = []
    for a, p in pending:
        fam = socket.AF_INET6 if ":" in a else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((a, p))
        except OSError:
            still.append((a, p))
        finally:
            s.close()
    pending = still
    if pending:
        time.sleep(0.05)
if pending:
    print("not accepting: " + ", ".join(f"[{a}]:{p}" for a, p in pending))
    sys.exit(1)
"""


class Topology:
    """Context manager. Creates namespaces: gateway, N subscribers, upstream, garden.

    Build happens in ``__enter__``; ``close()`` (also via ``__exit__``,
    atexit, and SIGTERM/SIGHUP while entered) tears everything down.
    """

    def __init__(self, subscribers: int = 2, tag: str | None = None) -> None:
        if not isinstance(subscribers, int) or not 1 <= subscribers <= MAX_SUBSCRIBERS:
            raise ValueError(f"subscribers must be 1..{MAX_SUBSCRIBERS}, got {subscribers!r}")
        if tag is None:
            tag = "wg" + secrets.token_hex(3)[:5]
        if not _TAG_RE.match(tag):
            raise ValueError(f"tag must match {_TAG_RE.pattern} (veth names are limited to 15 chars)")
        self.tag = tag
        self.n = subscribers

        gw_ns = f"{tag}-gw"
        self.gateway = Host(gw_ns, self.gateway_addr4(1), self.gateway_addr6(1))
        self.subscribers: list[Host] = [
            Host(f"{tag}-s{i}", f"{_sub_net4(i)}.10", f"{_sub_net6(i)}:10")
            for i in range(1, subscribers + 1)
        ]
        self.upstream = Host(f"{tag}-up", "198.51.100.10", "2001:db8:198::10")
        self.garden = Host(f"{tag}-gd", "203.0.113.10", "2001:db8:203::10")

        # Interface names inside the gateway namespace.
        self.subscriber_interfaces: list[str] = [f"{tag}g{i}" for i in range(1, subscribers + 1)]
        self.upstream_interface = f"{tag}gup"
        self.garden_interface = f"{tag}ggd"
        # Peer names inside the far namespaces.
        self._sub_peer = [f"{tag}s{i}" for i in range(1, subscribers + 1)]
        self._up_peer = f"{tag}up"
        self._gd_peer = f"{tag}gd"
        for name in [*self.subscriber_interfaces, self.upstream_interface, self.garden_interface,
                     *self._sub_peer, self._up_peer, self._gd_peer]:
            assert len(name) <= 15, name

        self._all_ns = [gw_ns, *(h.netns for h in self.subscribers), self.upstream.netns, self.garden.netns]
        self._created_ns: list[str] = []  # only these are ever deleted
        self._procs: list[subprocess.Popen[Any]] = []
        self._tmpdir: str | None = None
        self._entered = False
        self._closed = False
        self._lock = threading.RLock()
        self._saved_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ addresses

    def gateway_addr4(self, i: int) -> str:
        """Gateway address on subscriber i's link (1-based)."""
        self._check_index(i)
        return f"{_sub_net4(i)}.1"

    def gateway_addr6(self, i: int) -> str:
        """Gateway IPv6 address on subscriber i's link (1-based)."""
        self._check_index(i)
        return f"{_sub_net6(i)}:1"

    def _check_index(self, i: int) -> None:
        if not 1 <= i <= self.n:
            raise IndexError(f"subscriber index {i} out of range 1..{self.n}")

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this topology (gateway first)."""
        return list(self._all_ns)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Topology:
        with self._lock:
            if self._entered:
                raise RuntimeError("Topology can only be entered once")
            self._entered = True
        # Register cleanup before creating anything so a crash mid-build is covered.
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            self._tmpdir = tempfile.mkdtemp(prefix=f"{self.tag}-")
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill our processes and delete our namespaces. Idempotent, never raises.

        A Ctrl-C/SIGTERM arriving during cleanup is deferred until cleanup
        finishes and then re-delivered, so half-deleted topologies don't leak.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        deferred: list[int] = []
        restore = self._defer_signals(deferred)
        try:
            self._cleanup()
        except BaseException:   # close() runs in __exit__, atexit and signal handlers: it never raises
            log.exception("event=topology_cleanup_failed namespaces_left=%s", ",".join(self._created_ns))
        finally:
            restore()
            self._restore_signal_handlers()
        if deferred:
            # Let the user's interrupt take effect now that we're clean.
            signal.raise_signal(deferred[0])

    def _cleanup(self) -> None:
        # 1. Our own process groups: TERM, bounded wait, then KILL.
        live = [p for p in self._procs if p.returncode is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_GRACE
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            _killpg(p.pid, signal.SIGKILL)
        for p in live:
            try:
                p.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass   # stuck in the kernel; the namespace deletion below still runs
        for p in self._procs:
            for stream in (p.stdin, p.stdout, p.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass   # a pipe whose reader is gone (flushing stdin); closing is all we wanted

        # 2. Anything else still running inside our namespaces.
        for ns in self._created_ns:
            kill_netns_pids(ns)

        # 3. Delete namespaces (destroys the veths too). Bounded retries.
        for ns in list(self._created_ns):
            for _ in range(5):
                _run_quiet([IP, "netns", "del", ns])
                if ns not in _list_netns():
                    self._created_ns.remove(ns)
                    break
                kill_netns_pids(ns)
                time.sleep(0.1)

        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- signals: turn SIGTERM/SIGHUP into SystemExit so __exit__/close run.

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self._saved_handlers[sig] = signal.SIG_DFL
                    signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._saved_handlers.items():
            try:
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._saved_handlers.clear()

    @staticmethod
    def _defer_signals(deferred: list[int]) -> Callable[[], None]:
        """Record (instead of act on) SIGINT/SIGTERM while cleaning up."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        saved: dict[int, Any] = {}

        def record(signum: int, frame: FrameType | None) -> None:
            deferred.append(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                saved[sig] = signal.signal(sig, record)
            except (ValueError, OSError):
                pass

        def restore() -> None:
            for sig, old in saved.items():
                try:
                    signal.signal(sig, old if old is not None else signal.SIG_DFL)
                except (ValueError, OSError):
                    pass

        return restore

    # ------------------------------------------------------------------ build

    def _build(self) -> None:
        existing = set(_list_netns())
        clash = [ns for ns in self._all_ns if ns in existing]
        if clash:
            raise RuntimeError(f"namespaces already exist (tag collision?): {clash}")
        for ns in self._all_ns:
            self._must([IP, "netns", "add", ns])
            self._created_ns.append(ns)
        for ns in self._all_ns:
            # Defaults first so the veths created next inherit them: no DAD
            # (addresses usable at once), no router advertisements.
            self._must_ns(ns, SYSCTL, "-q", "-w",
                          "net.ipv6.conf.all.disable_ipv6=0",
                          "net.ipv6.conf.default.disable_ipv6=0",
                          "net.ipv6.conf.all.accept_dad=0",
                          "net.ipv6.conf.default.accept_dad=0",
                          "net.ipv6.conf.all.accept_ra=0",
                          "net.ipv6.conf.default.accept_ra=0",
                          "net.ipv6.conf.all.autoconf=0",
                          "net.ipv6.conf.default.autoconf=0")
            self._must_ns(ns, IP, "link", "set", "lo", "up")
        gw = self.gateway.netns
        self._must_ns(gw, SYSCTL, "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

        # Links: created inside the gateway namespace with the peer placed
        # directly into the far namespace -> nothing ever touches the root ns.
        links: list[tuple[str, str, str]] = [
            (gw_if, peer, h.netns)
            for gw_if, peer, h in zip(self.subscriber_interfaces, self._sub_peer, self.subscribers, strict=True)
        ]
        links.append((self.upstream_interface, self._up_peer, self.upstream.netns))
        links.append((self.garden_interface, self._gd_peer, self.garden.netns))
        for gw_if, peer, far_ns in links:
            self._must_ns(gw, IP, "link", "add", gw_if, "type", "veth", "peer", "name", peer, "netns", far_ns)

        subscriber_links = zip(self.subscribers, self.subscriber_interfaces, self._sub_peer, strict=True)
        for i, (h, gw_if, peer) in enumerate(subscriber_links, 1):
            self._addr(gw, gw_if, f"{self.gateway_addr4(i)}/24", f"{self.gateway_addr6(i)}/64")
            self._addr(h.netns, peer, f"{h.addr4}/24", f"{h.addr6}/64")
            self._must_ns(h.netns, IP, "-4", "route", "add", "default", "via", self.gateway_addr4(i))
            self._must_ns(h.netns, IP, "-6", "route", "add", "default", "via", self.gateway_addr6(i))

        for far, gw_if, peer, gw4, gw6 in (
            (self.upstream, self.upstream_interface, self._up_peer, "198.51.100.1", "2001:db8:198::1"),
            (self.garden, self.garden_interface, self._gd_peer, "203.0.113.1", "2001:db8:203::1"),
        ):
            self._addr(gw, gw_if, f"{gw4}/24", f"{gw6}/64")
            self._addr(far.netns, peer, f"{far.addr4}/24", f"{far.addr6}/64")
            # Return routes only toward subscribers: no default route anywhere but subscribers.
            self._must_ns(far.netns, IP, "-4", "route", "add", "100.64.0.0/10", "via", gw4)
            self._must_ns(far.netns, IP, "-6", "route", "add", "2001:db8:100::/48", "via", gw6)

        self._wait_ready([(gw, gw_if) for gw_if, _, _ in links] + [(ns, peer) for _, peer, ns in links])

    def _addr(self, ns: str, dev: str, cidr4: str, cidr6: str) -> None:
        self._must_ns(ns, IP, "addr", "add", cidr4, "dev", dev)
        self._must_ns(ns, IP, "-6", "addr", "add", cidr6, "dev", dev, "nodad")
        self._must_ns(ns, IP, "link", "set", dev, "up")

    def _wait_ready(self, ifaces: list[tuple[str, str]]) -> None:
        """Bounded wait until every veth is operationally UP and no IPv6 address is tentative."""
        deadline = time.monotonic() + _READY_TIMEOUT
        pending = list(ifaces)
        while pending:
            still = []
            for ns, dev in pending:
                r = self.run(ns, IP, "-o", "link", "show", "dev", dev)
                t = self.run(ns, IP, "-6", "-o", "addr", "show", "dev", dev, "tentative")
                if " state UP " not in r.stdout or t.stdout.strip():
                    still.append((ns, dev))
            pending = still
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"links not ready after {_READY_TIMEOUT}s: {pending}")
            time.sleep(0.05)

    def _must(self, argv: list[str]) -> None:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"timed out after {_CMD_TIMEOUT}s: {' '.join(argv)}") from e
        if r.returncode != 0:
            raise RuntimeError(f"command failed ({r.returncode}): {' '.join(argv)}: {r.stderr.strip()}")

    def _must_ns(self, ns: str, *argv: str) -> None:
        self._must([IP, "netns", "exec", ns, *argv])

    def add_namespace(self, suffix: str) -> str:
        """Create one more namespace, ``<tag>-<suffix>`` (loopback up, nothing else), owned by
        this topology: ``run``/``popen``/``curl`` work in it and ``close`` deletes it with the
        rest. For hosts wired by someone else, e.g. the demo's DHCP segment."""
        if not re.fullmatch(r"[a-z0-9]{1,4}", suffix):
            raise ValueError(f"namespace suffix {suffix!r}: want 1-4 lower-case letters or digits")
        ns = f"{self.tag}-{suffix}"
        with self._lock:
            self._check_ns(self.gateway.netns)   # entered and not closed
            if ns in self._all_ns or ns in _list_netns():
                raise RuntimeError(f"namespace {ns} already exists")
            self._must([IP, "netns", "add", ns])
            self._created_ns.append(ns)
            self._all_ns.append(ns)
        self._must_ns(ns, IP, "link", "set", "lo", "up")
        return ns

    # ------------------------------------------------------------------ running things

    def _check_ns(self, netns: str) -> None:
        if netns not in self._all_ns:
            raise ValueError(f"{netns!r} is not a namespace of this topology ({self._all_ns})")
        if self._closed:
            raise RuntimeError("topology is closed")
        if not self._entered:
            raise RuntimeError("topology not built yet (use it as a context manager)")

    def run(self, netns: str, *argv: str, timeout: float = 10.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run argv inside one of our namespaces, capturing text output."""
        self._check_ns(netns)
        return subprocess.run([IP, "netns", "exec", netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def popen(self, netns: str, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in a namespace; its process group is killed in close()."""
        self._check_ns(netns)
        if kw.get("start_new_session") is False or "process_group" in kw:
            raise ValueError("popen always uses its own session/process group")
        kw["start_new_session"] = True
        with self._lock:
            if self._closed:
                raise RuntimeError("topology is closed")
            p = subprocess.Popen([IP, "netns", "exec", netns, *argv], **kw)
            self._procs.append(p)
        return p

    def serve_http(self, host: Host, body: str, ports: tuple[int, ...] = (80,)) -> None:
        """Serve `body` with 200 for every GET/HEAD on host.addr4/addr6 for each port; wait until listening."""
        self._check_ns(host.netns)
        if not ports or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise ValueError(f"bad ports {ports!r}")
        addrs = ",".join((host.addr4, host.addr6))
        port_s = ",".join(str(p) for p in ports)
        assert self._tmpdir is not None
        log_path = os.path.join(self._tmpdir, f"http-{host.netns}-{port_s.replace(',', '_')}-{len(self._procs)}.log")
        with open(log_path, "wb") as log:
            proc = self.popen(host.netns, sys.executable, "-c", _HTTP_SERVER_CODE, body, addrs, port_s,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        probe_timeout = _READY_TIMEOUT
        try:
            r = self.run(host.netns, sys.executable, "-c", _PROBE_CODE, addrs, port_s, str(probe_timeout),
                         timeout=probe_timeout + 5.0)
            ok, why = r.returncode == 0, (r.stdout + r.stderr).strip()
        except subprocess.TimeoutExpired:
            ok, why = False, "probe timed out"
        if not ok or proc.poll() is not None:
            try:
                with open(log_path, errors="replace") as f:
                    log_text = f.read()[-2000:]
            except OSError:
                log_text = ""
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            raise RuntimeError(
                f"HTTP server in {host.netns} on {addrs} ports {port_s} not accepting connections "
                f"within {probe_timeout}s (exit={proc.returncode}): {why}; server output: {log_text.strip()}"
            )

    def curl(self, netns: str, url: str, timeout: float = 5.0,
             extra: tuple[str, ...] = ()) -> tuple[int, str, dict[str, str], float]:
        """Fetch url from inside netns: (status or 0 on failure, body or error text, headers, seconds)."""
        self._check_ns(netns)
        _check_url(url)
        assert self._tmpdir is not None
        fd, hdr_path = tempfile.mkstemp(prefix="hdr-", dir=self._tmpdir)
        os.close(fd)
        fd, body_path = tempfile.mkstemp(prefix="body-", dir=self._tmpdir)
        os.close(fd)
        argv = [CURL, "-sS", "-g", "--noproxy", "*", "--max-time", f"{timeout:g}",
                "-D", hdr_path, "-o", body_path, "-w", "%{http_code} %{time_total}",
                *extra, "--url", url]
        start = time.monotonic()
        try:
            try:
                r = self.run(netns, *argv, timeout=timeout + 5.0)
            except subprocess.TimeoutExpired:
                return 0, f"curl did not exit within {timeout + 5.0}s", {}, time.monotonic() - start
            wall = time.monotonic() - start
            try:
                elapsed = float(r.stdout.split()[1])
            except (IndexError, ValueError):
                elapsed = wall
            if r.returncode != 0:
                return 0, r.stderr.strip() or f"curl exit {r.returncode}", {}, elapsed
            try:
                status = int(r.stdout.split()[0])
            except (IndexError, ValueError):
                status = 0
            with open(body_path, "rb") as f:
                body = f.read().decode("utf-8", errors="replace")
            with open(hdr_path, "rb") as f:
                headers = _parse_headers(f.read().decode("latin-1"))
            return status, body, headers, elapsed
        finally:
            for p in (hdr_path, body_path):
                try:
                    os.unlink(p)
                except OSError:
                    pass


# ---------------------------------------------------------------------- helpers


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def kill_netns_pids(ns: str) -> None:
    """SIGKILL whatever still runs in namespace ``ns`` (but this process), a bounded number of
    rounds: ``ip netns del`` leaves the processes alive, and with them the namespace."""
    me = os.getpid()
    for _ in range(10):
        r = _run_quiet([IP, "netns", "pids", ns])
        pids = [int(x) for x in (r.stdout if r else "").split() if x.isdigit() and int(x) != me]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _run_quiet(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):   # missing tool, or timed out
        return None


def _list_netns() -> list[str]:
    r = _run_quiet([IP, "netns", "list"])
    if r is None:
        return []
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _check_url(url: str) -> None:
    """Refuse literal destinations outside our ranges so nothing is aimed off-box."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise ValueError(f"URL without host: {url!r}")
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a name: namespaces have no resolver route out; caller may use --resolve
    if addr.is_loopback or any(addr in net for net in ALLOWED_NETS):
        return
    raise ValueError(f"refusing to send traffic to {addr}: outside the simulated ISP ranges")


def _parse_headers(raw: str) -> dict[str, str]:
    """Headers of the last response block (curl -D may hold 1xx/intermediate blocks)."""
    blocks = [b for b in re.split(r"\r?\n\r?\n", raw) if b.strip()]
    if not blocks:
        return {}
    headers: dict[str, str] = {}
    for line in blocks[-1].splitlines()[1:]:
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        k, v = k.strip().lower(), v.strip()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return headers
