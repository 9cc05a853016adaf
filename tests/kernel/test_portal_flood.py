"""The portal under one subscriber's connection flood, through the real portal in namespaces (SPEC §5: while
restricted, the portal itself keeps working; docs/security.md: listeners survive slow clients and floods).

One restricted subscriber opens 1,100 idle connections to the portal, which runs with the open-files limit systemd
gives a service by default (1024). Before the portal's connections were guarded that took every descriptor it had:
another restricted subscriber's redirect and a paying customer's page timed out, and asyncio logged
"socket.accept() out of system resource" thousands of times a second. Now one source holds at most
``captive_portal.server.PER_SOURCE`` connections, the oldest of its idle ones shed for its next, and an idle one is
closed at the head deadline.
"""

from __future__ import annotations

import re
import resource
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import SUB1

from enforcer.demo.lab import PORTAL_PORT, Lab
from enforcer.demo.topology import Topology

ATTACKER_CONNECTIONS = 1100
#: Opens ``count`` connections to ``host``:``port`` without sending a byte (non-blocking connects, one poll, all of
#: it bounded by ``limit`` seconds), says how many opened, then holds them until a line on stdin, ``limit`` or the
#: server closing them all, and says how many the server had closed by then and after how long the first closed.
HOLDER = """
    import os, resource, select, socket, sys, time
    host, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    started = time.monotonic()
    pending = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        pending.append(s)
    poller = select.poll()
    for s in pending:
        poller.register(s, select.POLLOUT)
    opened, waiting = set(), {s.fileno(): s for s in pending}
    while waiting and time.monotonic() - started < limit / 2:
        for fd, _ in poller.poll(200):
            s = waiting.pop(fd, None)
            if s is not None:
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    opened.add(s)
    print("opened", len(opened), round(time.monotonic() - started, 2), flush=True)
    closed_at = {}
    watch = select.poll()
    for s in opened:
        watch.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    while time.monotonic() - started < limit:
        if select.select([sys.stdin], [], [], 0)[0]:
            break
        for fd, _ in watch.poll(100):
            closed_at.setdefault(fd, time.monotonic() - started)
            watch.unregister(fd)
        if len(closed_at) == len(opened):
            break
    first = min(closed_at.values(), default=-1.0)
    print("closed", len(closed_at), round(first, 2), flush=True)
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(subscribers=3) as topology:
        topology.serve_http(topology.upstream, "UPSTREAM OK", ports=(80,))
        yield topology


@pytest.fixture
def lab(topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """Subscribers 1 and 3 restricted, subscriber 2 paying; the portal with systemd's default open-files limit."""
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4], "reason": "overdue"},
               {"id": "C-1003", "addresses": [topo.subscribers[2].addr4], "reason": "overdue"}]
    gateway = Lab(topo, tmp_path, entries)
    gateway.start_daemon()
    gateway.start_portal()
    try:
        assert gateway.portal is not None
        hard = resource.prlimit(gateway.portal.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(gateway.portal.pid, resource.RLIMIT_NOFILE, (1024, hard))
        yield gateway
    finally:
        gateway.stop_daemon()
        (tmp_path / "portal.log").exists() and print(gateway.log("portal.log"))


def _holder(topo: Topology, netns: str, host: str, count: int, limit: float) -> subprocess.Popen[str]:
    return topo.popen(netns, sys.executable, "-c", textwrap.dedent(HOLDER), host, str(PORTAL_PORT), str(count),
                      str(limit), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen[str], word: str, timeout: float) -> list[str]:
    """The holder's next line, which must start with ``word``; fails after ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], 0.2)[0]:
            continue
        line = proc.stdout.readline()
        if line:
            fields = line.split()
            assert fields[0] == word, line
            return fields
        if proc.poll() is not None:
            break
    raise AssertionError(f"no {word!r} line from the holder: {proc.stderr.read() if proc.stderr else ''}")


def _stop(proc: subprocess.Popen[str]) -> str:
    """Tell the holder to report and close; its last line."""
    try:
        out, _ = proc.communicate("stop\n", timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.strip().splitlines()[-1] if out.strip() else ""


def _shed(topo: Topology, reason: str) -> float:
    text = topo.run(topo.gateway.netns, "curl", "-s", "--max-time", "5", "http://127.0.0.1:9641/metrics").stdout
    match = re.search(rf'^walled_garden_portal_connections_shed_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else -1.0


def test_one_subscribers_idle_connections_do_not_lock_others_out_of_the_portal(topo: Topology, lab: Lab) -> None:
    attacker, paying, other = topo.subscribers
    portal_host = topo.gateway_addr4(1)
    holder = _holder(topo, attacker.netns, portal_host, ATTACKER_CONNECTIONS, limit=40)
    try:
        opened = int(_line(holder, "opened", 25)[1])
        assert opened >= 1000, f"the holder opened only {opened} connections"
        time.sleep(1.0)
        # Another restricted subscriber: the redirect, then the page, both within a few seconds.
        status, _, headers, took = topo.curl(other.netns, "http://198.51.100.10/some/page", timeout=8)
        assert status == 302 and headers["location"] == lab.portal_url, (status, took)
        assert took < 3.0, took
        status, page, _, took = topo.curl(other.netns, lab.portal_url, timeout=8)
        assert status == 200 and "Example Regional ISP" in page, (status, took)
        assert took < 3.0, took
        # A paying customer opening the portal page.
        status, _, _, took = topo.curl(paying.netns, lab.portal_url, timeout=8)
        assert status == 200 and took < 3.0, (status, took)
        assert _shed(topo, "source_cap") >= opened - 40, "the flood is counted in the portal's metrics"
    finally:
        last = _stop(holder)
    assert last.startswith("closed"), last
    log = lab.log("portal.log")
    assert "out of system resource" not in log
    assert log.count("event=connection_shed") <= 5, "shedding is logged once per 10 s, not per connection"


def test_an_idle_connection_is_closed_at_the_head_deadline(topo: Topology, lab: Lab) -> None:
    holder = _holder(topo, topo.subscribers[0].netns, topo.gateway_addr4(1), 1, limit=20)
    try:
        assert _line(holder, "opened", 10)[1] == "1"
        _, count, first = _line(holder, "closed", 18)
    finally:
        _stop(holder)
    assert count == "1" and 9.0 <= float(first) <= 12.0, (count, first)
    assert _shed(topo, "head_timeout") == 1.0
