"""Pieces of ``bench_scale.py``: the list written streamed, the daemon started as systemd starts it,
its memory read from /proc, signed webhooks and kernel look-ups.

Kept apart so the benchmark itself reads as the four measurements it makes. Nothing here holds
per-subscriber Python objects: at 1,000,000 subscribers the list is written line by line and a
subscriber is only ever named by its index.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from enforcer.control import ControlError, request
from enforcer.dataplane.nfnetlink import ElementLookup
from enforcer.demo.billing import event_body, signed_request

BASE4 = (100 << 24) | (64 << 16)   # 100.64.0.0, as bench_dataplane.subscribers()
FORMATS = ("csv", "json", "yaml")
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
#: libc loaded once, in the parent: a preexec_fn (between fork and exec) must not dlopen.
LIBC = ctypes.CDLL(None, use_errno=True)


# -- the list ------------------------------------------------------------------------------------

def subscriber_id(i: int) -> str:
    return f"C-{i:07d}"


def address4(i: int) -> str:
    """Subscriber i's IPv4 address: 100.64.0.0 + 1 + i (bench_dataplane.subscribers())."""
    v = BASE4 + 1 + i
    return f"{v >> 24}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}"


def prefix6(i: int) -> str:
    """Subscriber i's IPv6 /56 (every fourth has one): 2001:db8:: + (i + 1) << 72, i < 2**24."""
    v = i + 1
    return f"2001:db8:{v >> 8:x}:{(v & 255) << 8:x}::/56"


def addresses(i: int) -> list[str]:
    return [address4(i), prefix6(i)] if i % 4 == 0 else [address4(i)]


def address_count(n: int) -> int:
    return n + (n + 3) // 4


def write_list(path: Path, n: int, fmt: str) -> int:
    """Write n restricted subscribers to ``path`` in ``fmt``, one entry at a time; returns bytes.

    Written to a temporary name and renamed, as billing should (docs/reference.md)."""
    if not 1 <= n < 1 << 24:
        raise ValueError("1 <= n < 2**24 (the IPv6 /56 numbering)")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", buffering=1 << 20) as out:
        if fmt == "csv":
            out.write("id,addresses,mode,reason\n")
            for i in range(n):
                out.write(f"{subscriber_id(i)},{' '.join(addresses(i))},walled-garden,overdue\n")
        elif fmt == "json":
            out.write('{"subscribers": [\n')
            for i in range(n):
                out.write(("," if i else "") + f'{{"id": "{subscriber_id(i)}", "addresses": {json.dumps(addresses(i))},'
                          ' "reason": "overdue"}\n')
            out.write("]}\n")
        elif fmt == "yaml":
            out.write("subscribers:\n")
            for i in range(n):
                out.write(f"  - id: {subscriber_id(i)}\n    addresses: {json.dumps(addresses(i))}\n"
                          "    reason: overdue\n")
        else:
            raise ValueError(f"format one of {FORMATS}")
    os.replace(tmp, path)
    return path.stat().st_size


def payers(n: int, count: int) -> Iterator[int]:
    """Distinct subscriber indices spread over the list (a stride coprime with n), for payments."""
    stride = 7919 if n % 7919 else 7907
    for k in range(min(count, n)):
        yield (k * stride + n // 3) % n


# -- namespaces and the kernel ---------------------------------------------------------------------

def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``sig`` when our parent (the private_netns wrapper) dies, so a killed
    wrapper still lets this process clean up the daemon it started."""
    if LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def enter_netns(path: str) -> None:
    """setns(2) into the network namespace at ``path``; a preexec_fn, so the command timed is
    just the command (``nft -f``), not ``ip netns exec``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _hold_new_netns() -> None:
    """preexec_fn of the holder: a new network namespace, and SIGKILL when the benchmark dies."""
    if LIBC.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ScratchNetns:
    """A fresh network namespace that exists only while one ``sleep`` holds it: nothing is named
    in /run/netns, so even a SIGKILLed benchmark leaves nothing (the holder dies with it, and the
    kernel frees the namespace and its tables)."""

    def __enter__(self) -> ScratchNetns:
        self.holder = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL, preexec_fn=_hold_new_netns)
        self.path = f"/proc/{self.holder.pid}/ns/net"
        return self

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: enter_netns(self.path))

    def __exit__(self, *exc: object) -> None:
        self.holder.kill()
        self.holder.wait(10)


class ElementProbe:
    """``nft get element inet <table> <set> { <address> }``, asked the way the daemon's own table
    checks ask it (``enforcer.dataplane.nfnetlink.ElementLookup``: the one netlink request, an exact
    hash lookup). Not nft/libnftables: nft 1.0.6 loads every set's elements before answering
    whenever the table changed (~0.3 s at 125k elements, seconds at 1.25M): a poll would cost
    more than what it times. Use from one thread."""

    def __init__(self, table: str, element_set: str) -> None:
        self.lookup = ElementLookup(table)
        self.set = element_set

    def holds(self, address: str) -> bool:
        return self.lookup.holds(self.set, address)

    def close(self) -> None:
        self.lookup.close()


# -- processes and memory ----------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children; empty if it is gone)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return sorted(set(found))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Memory:
    rss_kib: int
    pss_kib: int


def memory(pid: int) -> Memory | None:
    """VmRSS (/proc/PID/status) and Pss (/proc/PID/smaps_rollup), or None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None

    def field_kib(text: str, name: str) -> int:
        for line in text.splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        return 0
    return Memory(field_kib(status, "VmRSS"), field_kib(rollup, "Pss"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return next((line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:")), "")
    except OSError:
        return "zombie"


@dataclass
class Daemon:
    """``walled-garden run`` as the unit starts it: its own session (process group), cwd /, stdin
    /dev/null, stdout to a reader (journald's role: each line stamped when it arrives), and a
    ``NOTIFY_SOCKET`` whose ``READY=1``/``STATUS=`` datagrams are stamped the same way."""

    argv: list[str]
    log_path: Path
    notify_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)     # (seconds after exec, line)
    notices: list[tuple[float, str]] = field(default_factory=list)   # sd_notify datagrams
    _threads: list[threading.Thread] = field(default_factory=list)
    _notify: socket.socket | None = None

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("already running")
        self.lines, self.notices = [], []
        self.notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        self._notify.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path)}
        env.pop("WG_BENCH_NETNS", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd="/", env=env, start_new_session=True,
                                     preexec_fn=_die_with_us)
        log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 -- closed by the reader thread
        log.write(f"--- start at {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n")
        self._threads = [threading.Thread(target=self._read_log, args=(self.proc.stdout, log), daemon=True),
                         threading.Thread(target=self._read_notify, args=(self._notify, self.proc), daemon=True)]
        for t in self._threads:
            t.start()

    def _read_log(self, stream: IO[bytes] | None, log: IO[str]) -> None:
        try:
            assert stream is not None
            for raw in stream:
                at = time.monotonic() - self.started
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((at, line))
                log.write(f"{at:9.3f} {line}\n")
        finally:
            log.close()

    def _read_notify(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.notices.append((time.monotonic() - self.started, data.decode(errors="replace")))

    def ready_at(self) -> float | None:
        return next((at for at, text in self.notices if "READY=1" in text.split("\n")), None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker(self) -> int | None:
        """The webhook worker: the daemon's child running ``enforcer.webhook_worker``."""
        if self.proc is None:
            return None
        return next((c for c in children(self.proc.pid) if "enforcer.webhook_worker" in cmdline(c)), None)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (or SIGKILL) to the whole process group, as systemd's KillMode=control-group
        would; SIGKILL after ``timeout`` (the unit's TimeoutStopSec). Waits until every member of
        the group is gone (bounded)."""
        if self.proc is None:
            return
        proc, pgid = self.proc, self.proc.pid
        members = [pgid, *children(pgid)]
        _killpg(pgid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(pgid, signal.SIGKILL)
            proc.wait(10)
        _killpg(pgid, signal.SIGKILL)   # a worker outliving its daemon
        deadline = time.monotonic() + 10
        while any(alive(p) for p in members[1:]) and time.monotonic() < deadline:
            time.sleep(0.02)
        for t in self._threads:
            t.join(timeout=2)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        self.proc = None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(f"{at:9.3f} {line}" for at, line in self.lines[-lines:])


def _die_with_us() -> None:
    """In the daemon's child before exec: SIGKILL when the thread that started it ends (the
    benchmark's main thread: when the benchmark dies, even by SIGKILL). A safety net only; the
    benchmark stops the daemon itself, and nothing the daemon does depends on it."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# -- talking to the daemon ------------------------------------------------------------------------

def status(socket_path: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """``GET /v1/status`` on the control socket: the answer ``walled-garden status --json`` prints."""
    try:
        answer = request(socket_path, "GET", "/v1/status", timeout=timeout)
    except ControlError:
        return None
    return answer if isinstance(answer, dict) else None


def cli_status(cli: list[str], config: Path, timeout: float = 30.0) -> dict[str, Any] | None:
    """``walled-garden status --json --config <config>`` run as an operator types it."""
    try:
        result = subprocess.run([*cli, "status", "--json", "--config", str(config)], capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def in_sync(answer: dict[str, Any] | None, entries: int, restricted: set[int]) -> bool:
    """The list of ``entries`` is in force, the number restricted is one of ``restricted`` and the
    kernel is in sync (no repair, no rebuild, a sync done)."""
    if not answer:
        return False
    in_force = (answer.get("source") or {}).get("list_in_force") or {}
    return (in_force.get("entries") == entries
            and sum((answer.get("modes") or {}).values()) in restricted
            and answer.get("kernel_in_sync") is True
            and not answer.get("rebuilding_from_kernel")
            and answer.get("last_sync") is not None)


def problem(answer: dict[str, Any] | None) -> str | None:
    """Something that means waiting longer is pointless: a refused list or a held change."""
    if not answer:
        return None
    source = answer.get("source") or {}
    if source.get("last_error"):
        return f"list refused: {source['last_error']}"
    if answer.get("held_changes"):
        return f"list held by the mass-change guard: {answer['held_changes']}"
    return None


def post_payment(host: str, port: int, secret: str, sid: str, event_id: str, timeout: float) -> int:
    """POST one signed ``payment.received``; the HTTP status, or 0 when the connection failed.

    http.client directly: no proxy from the environment, a fresh connection per attempt."""
    req = signed_request(f"http://{host}:{port}/v1/events", secret, event_body("payment.received", sid), event_id)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        assert isinstance(req.data, bytes)
        conn.request("POST", "/v1/events", body=req.data, headers=dict(req.header_items()))
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def python_cli() -> list[str]:
    """``walled-garden`` as the unit's ExecStart runs it, but with *this checkout's* code, compiled.

    The venv's entry point alone is not enough: the venv's editable install maps ``enforcer`` to
    the tree it was installed from, so a bench run from a ``git worktree`` of another commit
    (``side_by_side.sh``) started that tree's daemon on both sides (found 2026-12-02). So
    ``PYTHONPATH`` names this checkout, for the daemon and the worker it starts, and the answer is
    checked. The checkout's modules are compiled to bytecode first, as pip and the .deb's postinst
    compile an installed package: a source tree run under ``PYTHONDONTWRITEBYTECODE`` (as this
    machine's shells set it) compiles every module of ours at every start, ~0.2 s of each start
    that an installed daemon does not pay."""
    use_this_checkout()
    script = Path(sys.executable).with_name("walled-garden")
    return [str(script)] if script.exists() else [sys.executable, "-m", "enforcer.cli"]


CHECKOUT = Path(__file__).resolve().parents[2]


def use_this_checkout() -> None:
    """Make every process this bench starts import ``enforcer`` from :data:`CHECKOUT`, compiled."""
    if os.environ.get("PYTHONPATH") == str(CHECKOUT):
        return
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(CHECKOUT / "enforcer"),
                    str(CHECKOUT / "captive_portal")], check=True, timeout=300, stdout=subprocess.DEVNULL)
    os.environ["PYTHONPATH"] = str(CHECKOUT)
    found = subprocess.run([sys.executable, "-c", "import enforcer; print(enforcer.__file__)"], cwd="/",
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    if Path(found).resolve() != CHECKOUT / "enforcer" / "__init__.py":
        raise SystemExit(f"a started daemon would import {found}, not this checkout's {CHECKOUT}/enforcer")
