"""The daemon's ForwarderBridge with the real forwarder process, in a network namespace of its own.

The child runs under ``ip netns exec`` (which execs it: the bridge's pid is the child's), listens
on the namespace's address, writes the namespace's table; the checks: a missing table is a clear
start failure, retried with backoff until the table exists; a killed child is restarted; stats
reach the metrics; stop leaves no child behind.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from enforcer.dataplane.layout import DNS_GARDEN_SETS
from enforcer.dns_garden.bridge import ForwarderBridge
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.metrics import Metrics

TABLE = "wg_dnsbridge_test"
LISTEN = "198.51.100.1"
PORT = 5300


class Namespace:
    def __init__(self) -> None:
        self.name = f"wg-db-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.sh("ip", "link", "set", "lo", "up")
            self.sh("ip", "link", "add", "dns0", "type", "veth", "peer", "name", "dns1")   # nobody behind it
            self.sh("ip", "addr", "add", f"{LISTEN}/24", "dev", "dns0")
            self.sh("ip", "link", "set", "dns0", "up")
            self.sh("ip", "link", "set", "dns1", "up")
        except BaseException:
            self.close()
            raise

    def sh(self, *argv: str, timeout: float = 10) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{argv}: {done.stderr}")
        return done.stdout

    def create_table(self) -> None:
        sets = "".join(f"set {name} {{ type ipv{family}_addr; size 100; flags timeout; }}\n"
                       for family, name in DNS_GARDEN_SETS.items())
        self.sh("nft", f"add table inet {TABLE}\ntable inet {TABLE} {{\n{sets}}}")

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.close()


async def until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:   # a zombie is gone for our purpose
        return stat.read().split(")")[-1].split()[0] != "Z"


async def test_bridge_runs_restarts_and_stops_the_real_forwarder(ns: Namespace) -> None:
    settings = ForwarderSettings(table=TABLE, port=PORT, resolvers=(("198.51.100.53", 53),), listen=(LISTEN,),
                                 names=("pay.example.net",), upstream_timeout=0.3)
    metrics = Metrics()
    bridge = ForwarderBridge(settings, metrics, command_prefix=("ip", "netns", "exec", ns.name))
    stop = asyncio.Event()
    running = asyncio.create_task(bridge.run(stop))
    try:
        # No table yet: the child says why on stderr and exits 3; the bridge retries.
        await until("a start failure", lambda: bridge.last_exit_code == 3)
        assert "dnsgarden4" in (bridge.last_error or ""), bridge.last_error
        assert not bridge.ready.is_set()
        ns.create_table()
        await until("the forwarder to be ready", bridge.ready.is_set, timeout=20)
        first = bridge.status()
        assert first["running"] and first["ready"] and first["last_error"] is None
        assert metrics.registry.get_sample_value("walled_garden_dns_forwarder_up") == 1
        assert f"{LISTEN}:{PORT}" in ns.sh("ss", "-lnu")
        assert "255.255.255.255" in ns.sh("nft", "list", "set", "inet", TABLE, "dnsgarden4")   # its marker

        # A query to a resolver nobody answers: SERVFAIL, counted in the child, seen in the daemon's metrics.
        query = f"""
import socket
q = bytes.fromhex("abcd01000001000000000000") + b"\\x03pay\\x07example\\x03net\\x00\\x00\\x01\\x00\\x01"
s = socket.create_connection(({LISTEN!r}, {PORT}), timeout=5)
s.sendall(len(q).to_bytes(2, "big") + q)
print(s.recv(512)[5] & 0x0f)
"""
        assert ns.sh(sys.executable, "-c", query).strip() == "2"      # RCODE SERVFAIL
        udp = f"""
import socket
q = bytes.fromhex("abcd01000001000000000000") + b"\\x03pay\\x07example\\x03net\\x00\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(q, ({LISTEN!r}, {PORT}))
print(s.recvfrom(512)[0][3] & 0x0f)
"""
        assert ns.sh(sys.executable, "-c", udp).strip() == "2"
        def failed(transport: str) -> float | None:
            labels = {"transport": transport, "result": "upstream_failed"}
            return metrics.registry.get_sample_value("walled_garden_dns_queries_total", labels)

        await until("the counts in the metrics", lambda: failed("tcp") == 1 and failed("udp") == 1)

        # Killed: restarted, a new pid, ready again.
        os.kill(first["pid"], signal.SIGKILL)
        await until("the restart", lambda: bridge.restarts >= 2 and bridge.ready.is_set()
                    and bridge.status()["pid"] not in (None, first["pid"]), timeout=20)
        second = bridge.status()
        assert second["last_exit_code"] == -signal.SIGKILL
    finally:
        stop.set()
        await asyncio.wait_for(running, 15)
    assert not alive(second["pid"])
    assert bridge.status()["running"] is False
    assert metrics.registry.get_sample_value("walled_garden_dns_forwarder_up") == 0
    assert ns.pids() == []


async def test_cancelling_the_bridge_kills_the_child(ns: Namespace) -> None:
    ns.create_table()
    settings = ForwarderSettings(table=TABLE, port=PORT, resolvers=(("198.51.100.53", 53),), listen=(LISTEN,))
    bridge = ForwarderBridge(settings, Metrics(), command_prefix=("ip", "netns", "exec", ns.name))
    running = asyncio.create_task(bridge.run(asyncio.Event()))
    await until("the forwarder to be ready", bridge.ready.is_set, timeout=20)
    pid = bridge.status()["pid"]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 15)
    assert not alive(pid)
    assert ns.pids() == []


def test_a_listener_that_cannot_bind_is_a_clear_start_failure(ns: Namespace) -> None:
    ns.create_table()
    settings = ForwarderSettings(table=TABLE, port=PORT, resolvers=(("198.51.100.53", 53),),
                                 listen=("203.0.113.9",))     # no such address in the namespace
    ours, theirs = socket.socketpair()
    try:
        done = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "enforcer.dns_garden.process",
                               "--fd", str(theirs.fileno()), "--settings", settings.to_json()],
                              pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=20)
    finally:
        ours.close()
        theirs.close()
    assert done.returncode == 3, done.stderr
    assert "event=dns_forwarder_start_failed" in done.stderr and "203.0.113.9" in done.stderr, done.stderr
