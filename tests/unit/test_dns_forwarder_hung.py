"""A hung DNS forwarder is noticed, reported down, killed and restarted (NOC audit: a child stopped
with SIGSTOP kept ``walled_garden_dns_forwarder_up`` at 1 and ``status`` at "ready" for good,
while restricted subscribers could not resolve the payment page).

The child's stats line every ``STATS_EVERY`` s is its heartbeat: the bridge reads with a
timeout, and a silence of ``SILENT_LIMIT`` s kills it with SIGKILL (a stopped process ignores
SIGTERM until continued). The real bridge runs here a stand-in child (``command_prefix``) that
speaks the wire protocol and stops itself; the real child's heartbeat during its start-up is
checked in process (``child_main`` with a slow seed).
tests/kernel/test_dns_forwarder_hung_daemon.py does the same with the real forwarder behind a
daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from enforcer.dataplane import libnftables
from enforcer.dns_garden import bridge as bridge_module
from enforcer.dns_garden import garden_set, process
from enforcer.dns_garden.bridge import ForwarderBridge
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.metrics import Metrics
from enforcer.supervisor import Supervisor

SETTINGS = ForwarderSettings(table="wg_test", port=5300, resolvers=(("198.51.100.53", 53),))

#: The stand-in child: ``python -c CHILD RUNS_FILE <the real command line>``. Run 1 says ready,
#: sends one stats line and stops itself (SIGSTOP, as an operator's ``kill -STOP`` or a debugger
#: would); later runs say ready and send stats every 0.05 s until EOF.
CHILD = """
import json, os, signal, socket, sys, time
runs_file = sys.argv[1]
fd = int(sys.argv[sys.argv.index("--fd") + 1])
with open(runs_file, "a") as f:
    f.write(f"{os.getpid()}\\n")
run = len(open(runs_file).read().split())
sock = socket.socket(fileno=fd)
stats = {"counts": [], "gauges": [], "added": {"buckets": [], "sum": 0, "count": 0}}
sock.sendall(b'{"ready": true}\\n' + json.dumps({"stats": stats}).encode() + b"\\n")
if run == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
sock.settimeout(0.05)
for _ in range(2000):
    try:
        if sock.recv(100) == b"":
            break
    except socket.timeout:
        pass
    sock.sendall(json.dumps({"stats": stats}).encode() + b"\\n")
"""


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


async def until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def state(pid: int) -> str:
    """The process's state letter (``T``: stopped); ``gone`` once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"


async def test_a_silent_child_is_reported_down_killed_counted_and_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(bridge_module, "SILENT_LIMIT", 0.5)
    monkeypatch.setattr(bridge_module, "RECHECK", 0.2)
    monkeypatch.setattr(bridge_module, "STOP_GRACE", 0.5)   # without the kill, the stop would wait this long
    runs = tmp_path / "runs"
    metrics = Metrics()
    bridge = ForwarderBridge(SETTINGS, metrics, command_prefix=(sys.executable, "-c", CHILD, str(runs)))
    stop = asyncio.Event()
    supervisor = Supervisor(stop, metrics.task_failures)
    ups: list[float | None] = []
    try:
        with caplog.at_level(logging.INFO, "walled_garden.dns"):
            supervisor.start("dns_forwarder", lambda: bridge.run(stop))
            await until("the first child ready", bridge.ready.is_set)
            first = bridge.status()["pid"]
            assert value(metrics, "walled_garden_dns_forwarder_up") == 1
            await until("the first child to stop itself", lambda: state(first) == "T")
            # Stopped: within SILENT_LIMIT + RECHECK it is down, killed and (after 1 s) running again.
            await until("the hang to be noticed", lambda: bridge.restarts == 1, timeout=5)
            ups.append(value(metrics, "walled_garden_dns_forwarder_up"))
            assert state(first) == "gone", "a stopped child is killed (SIGKILL), not left behind"
            assert bridge.status()["last_exit_code"] == -9
            task = supervisor.status()["dns_forwarder"]
            assert task["failures"] == 1, task
            assert task["last_error"].startswith("dns forwarder killed by SIGKILL: unresponsive: sent nothing"), task
            assert value(metrics, "walled_garden_task_failures_total", {"task": "dns_forwarder"}) == 1
            await until("a new child ready", lambda: bridge.ready.is_set() and bridge.status()["pid"] != first)
            assert value(metrics, "walled_garden_dns_forwarder_up") == 1
            assert supervisor.status()["dns_forwarder"]["running"] is True
            # The healthy one, sending every 0.05 s, is not called hung.
            await asyncio.sleep(1.0)
            assert bridge.restarts == 1 and bridge.ready.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(supervisor.close(), 10)
    assert ups == [0]
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith(f"event=dns_forwarder_unresponsive pid={first} ") for m in messages), messages
    assert any(m.startswith("event=dns_forwarder_exited code=-9 error=unresponsive") for m in messages), messages
    assert value(metrics, "walled_garden_task_failures_total", {"task": "dns_forwarder"}) == 1   # the stop: none


async def test_lines_waiting_unread_after_a_busy_loop_are_no_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's own loop blocked past the limit while the child kept sending: its lines are
    read, not taken for silence (on Python 3.12+ ``wait_for`` cancels the read in the turn the
    timeout fires even when the line came in the same turn; ``RECHECK`` reads it then)."""
    monkeypatch.setattr(bridge_module, "SILENT_LIMIT", 0.2)
    monkeypatch.setattr(bridge_module, "RECHECK", 0.2)
    bridge = ForwarderBridge(SETTINGS, Metrics())
    bridge.ready.set()
    reader = asyncio.StreamReader()
    serving = asyncio.create_task(bridge._serve(reader))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, reader.feed_data, b'{"ready": true}\n')   # fed in the turn the timeout fires
    loop.call_soon(time.sleep, 0.4)                                  # the loop busy past the limit
    await asyncio.sleep(0.5)
    assert not serving.done()
    reader.feed_eof()
    assert await asyncio.wait_for(serving, 2) is None


async def test_the_limit_before_ready_is_the_start_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until it is ready the child may take ``START_LIMIT`` between lines (the interpreter loads);
    once ready, ``SILENT_LIMIT``."""
    monkeypatch.setattr(bridge_module, "SILENT_LIMIT", 0.1)
    monkeypatch.setattr(bridge_module, "START_LIMIT", 0.4)
    monkeypatch.setattr(bridge_module, "RECHECK", 0.05)
    bridge = ForwarderBridge(SETTINGS, Metrics())
    reader = asyncio.StreamReader()
    serving = asyncio.create_task(bridge._serve(reader))
    await asyncio.sleep(0.3)
    assert not serving.done(), "silent for 0.3 s before ready: still starting"
    reader.feed_data(b'{"ready": true}\n')
    assert await asyncio.wait_for(serving, 2) == pytest.approx(0.15)


async def test_the_child_reports_at_once_and_every_second_while_it_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real child's heartbeat does not wait for it to be ready: a seed that takes several
    stats periods (a slow ``nft list`` of full sets) is not taken for a hang."""
    monkeypatch.setattr(process, "STATS_EVERY", 0.05)

    class NoNft:
        def close(self) -> None:
            pass

    async def slow_seed(self: Any) -> None:
        await asyncio.sleep(0.5)    # ten stats periods
        raise garden_set.GardenSetError("no table (this test)")

    monkeypatch.setattr(libnftables, "Nftables", NoNft)
    monkeypatch.setattr(garden_set.GardenSet, "seed", slow_seed)
    ours, theirs = socket.socketpair()
    try:
        code = await asyncio.wait_for(process.child_main(theirs.detach(), SETTINGS), 5)
        assert code == process.EXIT_START_FAILED
        ours.setblocking(False)
        received = b""
        try:
            while chunk := ours.recv(65536):
                received += chunk
        except BlockingIOError:   # all read (the child's end is not closed on a start failure)
            pass
    finally:
        ours.close()
    lines = [json.loads(line) for line in received.splitlines()]
    assert len(lines) >= 5 and all("stats" in line for line in lines), lines
    assert not any(line.get("ready") for line in lines)
