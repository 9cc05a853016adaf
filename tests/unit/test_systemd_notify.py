"""sd_notify and the watchdog against a fake systemd: a Unix datagram socket in a temp dir."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer import systemd_notify


class FakeSystemd:
    """Collects what arrives on ``NOTIFY_SOCKET``, stamped with its arrival time by a thread."""

    def __init__(self, path: str, address: str | bytes) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.received: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((time.monotonic(), message))

    def drain(self) -> list[tuple[float, str]]:
        """Everything received so far (waiting a moment for datagrams in flight), then forgotten."""
        time.sleep(0.1)
        out, self.received = self.received, []
        return out

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    path = str(tmp_path / "notify.sock")
    fake = FakeSystemd(path, path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield fake
    fake.close()


def test_notify_sends_one_datagram(systemd: FakeSystemd) -> None:
    assert systemd_notify.notify("READY=1\nSTATUS=enforcing")
    assert [m for _, m in systemd.drain()] == ["READY=1\nSTATUS=enforcing"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wg-test-{os.getpid()}-{time.monotonic_ns()}"
    fake = FakeSystemd("@" + name, "\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert systemd_notify.notify("WATCHDOG=1")
        assert [m for _, m in fake.drain()] == ["WATCHDOG=1"]
    finally:
        fake.close()


def test_without_systemd_notify_is_silent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd_notify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd_notify.notify("READY=1") is False  # logged, never raised


def test_reloading_carries_a_monotonic_timestamp(systemd: FakeSystemd) -> None:
    systemd_notify.reloading()
    (_, message), = systemd.drain()
    lines = message.split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert abs(int(lines[1].split("=")[1]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OURS"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),   # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_timeout_from_the_environment(env: dict[str, str], expected: float | None) -> None:
    env = {k: str(os.getpid()) if v == "OURS" else v for k, v in env.items()}
    assert systemd_notify.watchdog_seconds(env) == expected


def test_watchdog_pets_from_the_loop_and_stops_when_the_loop_hangs(systemd: FakeSystemd,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG=1 every half timeout while the loop runs; nothing at all while it is blocked."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")   # 0.4 s: a pet every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        petting = asyncio.run_coroutine_threadsafe(systemd_notify.watchdog(), loop)
        time.sleep(1.2)
        running = [t for t, m in systemd.drain() if m == "WATCHDOG=1"]
        assert len(running) >= 4, running             # ~6 in 1.2 s
        gaps = [b - a for a, b in itertools.pairwise(running)]
        assert max(gaps) < 0.4, gaps                  # always within the timeout

        blocked = threading.Event()
        hang = 1.5
        loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(hang)))   # the loop hangs
        assert blocked.wait(2)
        hung_at = time.monotonic()
        time.sleep(hang + 0.6)                          # the loop is free again after ``hang``
        received = [t for t, m in systemd.drain() if m == "WATCHDOG=1"]
        during = [t for t in received if hung_at + 0.05 < t < hung_at + hang - 0.05]
        assert during == [], "a blocked loop must not pet the watchdog"
        assert [t for t in received if t > hung_at + hang], "petting resumes when the loop runs again"
        petting.cancel()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(3)
        loop.close()


async def test_watchdog_returns_at_once_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd_notify.watchdog(), 1)
