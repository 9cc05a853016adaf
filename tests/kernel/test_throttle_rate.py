"""Throttle mode on the real kernel: a per-subscriber rate limit in both directions.

Four subscribers behind the gateway: s1 and s4 throttled (each its own bucket), s2 free, s3 in
notice mode. Traffic is a plain TCP stream on port 9100 (port 80 would meet the notice
redirect) from the "internet" host and from the walled-garden host, which is never slowed.
Rates are measured by the receiver after a warm-up, because the kernel's byte limiter starts
with a full bucket (about a second of the rate plus the burst).
"""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Host, Topology

RATE = "4 mbit/s"
RATE_BYTES = 500_000          # 4 mbit/s in bytes per second
TOLERANCE = 0.20
PORT = 9100
WARMUP = 1.5                  # seconds not counted: the initial bucket, TCP slow start
WINDOW = 6.0                  # seconds of a measured (throttled) transfer
QUICK = 1.5                   # seconds of an unthrottled transfer

# Both ends measure what they receive the same way: bytes over time after the warm-up.
_RECEIVE = r"""
import socket, time

def receive(conn, start, seconds):
    total, marks = 0, []
    conn.settimeout(0.5)
    while time.monotonic() - start < seconds:
        try:
            data = conn.recv(262144)
        except socket.timeout:
            continue
        if not data:
            break
        total += len(data)
        marks.append((time.monotonic(), total))
    return total, marks

def rate_of(marks, start, warmup):
    inside = [(t, n) for t, n in marks if t - start >= warmup]
    if len(inside) < 2:  # an unthrottled transfer can finish its 512 MiB before the warm-up ends
        inside = [(start, 0)] + marks
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return 0.0
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
"""

# The far end of each measurement: "D" streams zeros to the caller (capped in time and size),
# "U<seconds>" reads for that long and answers the rate it received after the warm-up.
_STREAM_SERVER = _RECEIVE + r"""
import sys, threading

WARMUP, CAP_SECONDS, CAP_BYTES = float(sys.argv[3]), 30.0, 512 << 20

def serve(conn):
    with conn:
        conn.settimeout(CAP_SECONDS)
        kind = conn.recv(16)
        start = time.monotonic()
        if kind.startswith(b"D"):
            chunk, sent = bytes(65536), 0
            while sent < CAP_BYTES and time.monotonic() - start < CAP_SECONDS:
                try:
                    conn.sendall(chunk)
                except OSError:
                    return
                sent += len(chunk)
        elif kind.startswith(b"U"):
            seconds = min(float(kind[1:].decode()), CAP_SECONDS)
            total, marks = receive(conn, start, seconds)
            conn.sendall(f"RATE {rate_of(marks, start, WARMUP):.0f} {total}\n".encode())

def listen(addr, port):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    srv = socket.socket(family)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    srv.bind((addr, port))
    srv.listen(16)
    return srv

def accept_loop(srv):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

servers = [listen(a, int(sys.argv[2])) for a in sys.argv[1].split(",")]
for s in servers:
    threading.Thread(target=accept_loop, args=(s,), daemon=True).start()
print("READY", flush=True)
threading.Event().wait(120)
"""

# The subscriber's end: prints the measured rate in bytes per second.
_STREAM_CLIENT = _RECEIVE + r"""
import select, sys

host, port, kind, seconds, warmup = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.settimeout(5)
s.connect((host, port))
start = time.monotonic()
if kind == "down":
    s.sendall(b"D")
    total, marks = receive(s, start, seconds)
    print(f"{rate_of(marks, start, warmup):.0f} {total}")
else:
    # A small send buffer keeps what is queued (and still drains after the window) small.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.sendall(f"U{seconds}".encode().ljust(16))
    s.setblocking(False)
    chunk, answer = bytes(65536), b""
    deadline = start + seconds + 10
    while time.monotonic() < deadline and not answer.endswith(b"\n"):
        readable, writable, _ = select.select([s], [] if answer else [s], [], 0.5)
        if readable:
            data = s.recv(100)
            if not data:
                break
            answer += data
        elif writable:
            try:
                s.send(chunk)
            except (BlockingIOError, InterruptedError):
                pass
    parts = answer.split()
    print(f"{parts[1].decode()} {parts[2].decode()}" if len(parts) == 3 else "0 0")
"""


@pytest.fixture
def throttle_lab(tmp_path: Path) -> Iterator[tuple[Topology, Lab]]:
    with Topology(subscribers=4) as topo:
        s1, _, s3, s4 = topo.subscribers
        entries = [
            {"id": "C-3001", "addresses": [s1.addr4, "2001:db8:100:1::/64"], "mode": "throttle", "reason": "overdue"},
            {"id": "C-3003", "addresses": [s3.addr4], "mode": "notice", "reason": "overdue"},
            {"id": "C-3004", "addresses": [s4.addr4], "mode": "throttle", "reason": "fair_use"},
        ]
        lab = Lab(topo, tmp_path, entries)
        lab.config["policy"]["throttle_rate"] = RATE
        lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
        for host in (topo.upstream, topo.garden):
            _start_stream_server(topo, host)
        lab.start_daemon()
        try:
            yield topo, lab
        finally:
            lab.stop_daemon()
            print(lab.log())


def _start_stream_server(topo: Topology, host: Host) -> None:
    proc = topo.popen(host.netns, sys.executable, "-c", _STREAM_SERVER, f"{host.addr4},{host.addr6}", str(PORT),
                      str(WARMUP), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    assert line.strip() == "READY", f"stream server in {host.netns} did not start: {line!r}"


def _client(topo: Topology, subscriber: Host, host: str, kind: str, seconds: float,
            warmup: float = WARMUP) -> subprocess.Popen[str]:
    return topo.popen(subscriber.netns, sys.executable, "-c", _STREAM_CLIENT, host, str(PORT), kind, str(seconds),
                      str(warmup), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)


def _rate(proc: subprocess.Popen[str], seconds: float) -> float:
    """Bytes per second a client measured (it ends on its own; bounded wait anyway)."""
    try:
        out, err = proc.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    fields = out.split()
    assert proc.returncode == 0 and len(fields) == 2, f"client failed ({proc.returncode}): {out!r} {err!r}"
    return float(fields[0])


def _measure(topo: Topology, subscriber: Host, host: str, kind: str, seconds: float,
             warmup: float = WARMUP) -> float:
    return _rate(_client(topo, subscriber, host, kind, seconds, warmup), seconds)


def _near(rate: float) -> bool:
    return abs(rate - RATE_BYTES) <= TOLERANCE * RATE_BYTES


def test_throttled_subscribers_get_the_configured_rate_and_others_do_not(
        throttle_lab: tuple[Topology, Lab]) -> None:
    topo, lab = throttle_lab
    s1, s2, s3, s4 = topo.subscribers
    rules = topo.run(topo.gateway.netns, "nft", "list", "chain", "inet", lab.table, "throttle").stdout
    assert f"limit rate over {RATE_BYTES} bytes/second" in rules, \
        ("policy.throttle_rate did not reach the kernel table: enforcer.table_layout.base_layout must pass "
         f"throttle_rate= and throttle_burst= from config.policy to Layout:\n{rules}")
    up4 = topo.upstream.addr4

    # Two throttled subscribers at once: each gets the rate; the buckets are per subscriber.
    first, second = _client(topo, s1, up4, "down", WINDOW), _client(topo, s4, up4, "down", WINDOW)
    down1, down4 = _rate(first, WINDOW), _rate(second, WINDOW)
    print(f"throttled download: s1 {down1 * 8 / 1e6:.2f} mbit/s, s4 {down4 * 8 / 1e6:.2f} mbit/s "
          f"(configured {RATE})")
    assert _near(down1) and _near(down4), (down1, down4)

    # Upload, over IPv6: s1's /64 is the throttled key (masked lookup).
    up6 = _measure(topo, s1, topo.upstream.addr6, "up", WINDOW)
    print(f"throttled upload (IPv6 /64): {up6 * 8 / 1e6:.2f} mbit/s")
    assert _near(up6), up6

    # Not limited: a free subscriber, a notice subscriber, and the walled garden for anyone.
    free = _measure(topo, s2, up4, "down", QUICK, warmup=0.3)
    notice = _measure(topo, s3, up4, "down", QUICK, warmup=0.3)
    garden = _measure(topo, s1, topo.garden.addr4, "down", QUICK, warmup=0.3)
    print(f"unthrottled: free {free * 8 / 1e6:.0f} mbit/s, notice {notice * 8 / 1e6:.0f} mbit/s, "
          f"throttled from the garden {garden * 8 / 1e6:.0f} mbit/s")
    for what, rate in (("free", free), ("notice", notice), ("garden", garden)):
        assert rate > 5 * RATE_BYTES, f"{what} subscriber limited: {rate:.0f} bytes/s"


def test_lifting_a_throttle_removes_the_limit(throttle_lab: tuple[Topology, Lab]) -> None:
    topo, lab = throttle_lab
    s1 = topo.subscribers[0]
    result = lab.send_event("payment.received", "C-3001")
    assert result["status"] == 200, result
    rate = _measure(topo, s1, topo.upstream.addr4, "down", QUICK, warmup=0.3)
    assert rate > 5 * RATE_BYTES, f"still limited after payment: {rate:.0f} bytes/s"
