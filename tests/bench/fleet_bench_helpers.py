"""What ``bench_fleet.py`` needs besides its own orchestration: a private network namespace that
is removed whatever happens, a process tree's CPU time, a Prometheus scrape, and billing's
open-loop sender.

Why its own namespace wrapper rather than ``private_netns``: the benchmark starts daemons in
sessions of their own (so each one's process group can be stopped whole), and on Ctrl-C
``subprocess.run`` gives the inner process 0.25 s before killing it, too little to stop six
daemons; here the inner process gets its signal and up to ``CLEANUP_GRACE`` seconds, and then
every process still inside the namespace (all of them started by this run) is killed by id
before the namespace is deleted.

Run as ``python fleet_bench_helpers.py load SPEC.json`` this file is the sender: one gateway's
share of a step, the pre-signed requests posted at their due times over keep-alive
connections (a small HTTP/1.1 client on ``asyncio.Protocol``: aiohttp's client costs ~150 µs a
request, which on a 2-core machine would be taken from the daemons being measured). It
imports nothing from the project.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ENV = "WG_FLEET_BENCH_NETNS"
CLEANUP_GRACE = 60.0


# ------------------------------------------------------------------------------ the namespace


def run_in_private_netns(script: str, argv: list[str]) -> int:
    """Run ``script argv`` in a fresh network namespace (loopback only); its exit code.

    SIGINT/SIGTERM are passed on to it and it gets ``CLEANUP_GRACE`` seconds to stop what it
    started; whatever is still inside the namespace then is killed (by pid), and the namespace
    deleted, on every way out of here.
    """
    if os.geteuid() != 0:
        print("run as root (it creates a private network namespace and nftables tables)", file=sys.stderr)
        return 1
    name = f"wgfleet{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    proc: subprocess.Popen[bytes] | None = None
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, script, *argv],
                                env={**os.environ, ENV: name})
        while True:
            try:
                # bounded by the inner run's own deadlines; after a signal, by the grace period
                return proc.wait(timeout=CLEANUP_GRACE if stopping else None)
            except subprocess.TimeoutExpired:
                print(f"the benchmark did not stop within {CLEANUP_GRACE:.0f}s of the signal; killing it",
                      file=sys.stderr)
                proc.kill()
                proc.wait(10)
                return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], timeout=30, check=False)


def kill_namespace_processes(name: str) -> None:
    """SIGKILL every process left in namespace ``name`` (all started by this benchmark), bounded."""
    for _ in range(20):
        listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10,
                                check=False)
        pids = [int(p) for p in listed.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    print(f"WARNING: processes still in namespace {name} after SIGKILL", file=sys.stderr)


# -------------------------------------------------------------------------- CPU and metrics


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:   # gone meanwhile
        pass
    return out


def tree_cpu(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` and its living descendants (the daemon and its
    webhook worker); 0 for none or a process that is gone."""
    if pid is None:
        return 0.0
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            total += _cpu_of(current)
        except OSError:
            continue
        todo += _children(current)
    return total


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, timeout: float = 5.0) -> Samples:
    """Every sample on ``127.0.0.1:port/metrics``: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for (n, have), value in samples.items()
               if n == name and all((k, v) in have for k, v in labels.items()))


# ------------------------------------------------------------------------------- the sender


class Sender:
    """One gateway's share of a step: request ``i`` goes out at ``start_at + i / rate`` on an idle
    keep-alive connection (a new one while fewer than ``connections`` are open; else it waits
    for the first to come free, which shows as the sender's lag)."""

    def __init__(self, port: int, requests: list[bytes], rate: float, start_at: float, timeout: float,
                 connections: int, indices: list[int] | None = None) -> None:
        self.port, self.requests, self.rate, self.start_at = port, requests, rate, start_at
        self.timeout, self.limit = timeout, connections
        count = len(requests)
        self.indices = sorted(set(indices)) if indices is not None else list(range(count))   # the ones it sends
        self.sent = [0.0] * count
        self.answered = [0.0] * count
        self.status = [-1] * count
        self.result = [""] * count
        self.idle: list[Connection] = []
        self.backlog: collections.deque[int] = collections.deque()
        self.opened = 0
        self.finished = 0
        self.done = asyncio.Event()
        self.opening: set[asyncio.Task[None]] = set()   # held: the loop keeps only weak references

    def open_new(self, index: int) -> None:
        self.opened += 1
        task = asyncio.get_running_loop().create_task(self.open_and_send(index))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    def launch(self, index: int) -> None:
        if self.idle:
            self.idle.pop().send(index)
        elif self.opened < self.limit:
            self.open_new(index)
        else:
            self.backlog.append(index)

    async def open_and_send(self, index: int) -> None:
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: Connection(self), "127.0.0.1", self.port)
        except OSError as exc:
            self.opened -= 1
            self.sent[index] = time.monotonic()
            self.record(index, 0, f"connect: {exc}")
            return
        connection.send(index)

    def record(self, index: int, status: int, result: str) -> None:
        if self.status[index] != -1:
            return
        self.answered[index] = time.monotonic()
        self.status[index], self.result[index] = status, result
        self.finished += 1
        if self.finished == len(self.indices):
            self.done.set()

    def free(self, connection: Connection) -> None:
        if self.backlog:
            connection.send(self.backlog.popleft())
        else:
            self.idle.append(connection)

    def lost(self, connection: Connection) -> None:
        self.opened -= 1
        if connection in self.idle:
            self.idle.remove(connection)
        if self.backlog:
            self.open_new(self.backlog.popleft())

    async def run(self) -> None:
        count, todo = len(self.requests), self.indices
        if not todo:
            return
        await asyncio.sleep(max(self.start_at - time.monotonic(), 0.0))
        k = 0
        while k < len(todo):
            now = time.monotonic()
            while k < len(todo) and self.start_at + todo[k] / self.rate <= now:
                self.launch(todo[k])
                k += 1
            if k < len(todo):
                await asyncio.sleep(max(self.start_at + todo[k] / self.rate - time.monotonic(), 0.0))
        deadline = self.start_at + count / self.rate + self.timeout + 5.0
        try:
            await asyncio.wait_for(self.done.wait(), max(deadline - time.monotonic(), 0.1))
        except TimeoutError:
            for i in todo:
                if self.status[i] == -1 and not self.sent[i]:
                    self.sent[i] = time.monotonic()   # never went out (no connection came free)
                self.record(i, 0, "no answer (sender deadline)")


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.index = -1
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, index: int) -> None:
        assert self.transport is not None
        self.index = index
        self.sender.sent[index] = time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(self.sender.timeout, self.timed_out)
        self.transport.write(self.sender.requests[index])

    def timed_out(self) -> None:
        if self.index >= 0:
            self.sender.record(self.index, 0, f"no answer within {self.sender.timeout:.0f}s")
            self.index = -1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length, close = -1, False
        for line in lines[1:]:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "connection":
                close = value.strip().lower() == "close"
        if length < 0:
            self.fail("answer without Content-Length")
            return
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self.fail(f"bad status line {lines[0][:80]!r}")
            return
        try:
            answer = json.loads(body)
            text = str(answer.get("result", "")) if status == 200 else str(answer.get("error", ""))[:300]
        except (ValueError, AttributeError):
            text = body[:300].decode(errors="replace")
        if self.timer is not None:
            self.timer.cancel()
        index, self.index = self.index, -1
        if index >= 0:
            self.sender.record(index, status, text)
        if close:
            assert self.transport is not None
            self.transport.close()
        else:
            self.sender.free(self)

    def fail(self, why: str) -> None:
        if self.index >= 0:
            self.sender.record(self.index, 0, why)
            self.index = -1
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.index >= 0:
            self.sender.record(self.index, 0, f"connection lost: {exc}")
            self.index = -1
        self.sender.lost(self)


def load_main(spec_path: str) -> int:
    """The sender process: the spec names the port, the requests file (NUL-separated HTTP
    requests), rate, start instant (CLOCK_MONOTONIC, shared by all senders of a step), timeout,
    connection limit and the output file (JSON)."""
    spec = json.loads(Path(spec_path).read_text())
    requests = Path(spec["requests"]).read_bytes().split(b"\0")[:-1]
    sender = Sender(int(spec["port"]), requests, float(spec["rate"]), float(spec["start_at"]),
                    float(spec["timeout"]), int(spec["connections"]), spec.get("indices"))
    cpu = time.process_time()
    asyncio.run(sender.run())
    cpu = time.process_time() - cpu
    Path(spec["out"]).write_text(json.dumps({"sent": sender.sent, "answered": sender.answered,
                                             "status": sender.status, "result": sender.result, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "load":
        sys.exit("usage: fleet_bench_helpers.py load SPEC.json")
    sys.exit(load_main(sys.argv[2]))
