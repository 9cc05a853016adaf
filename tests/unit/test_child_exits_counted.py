"""A child process that dies unasked is a task failure like any other (SPEC §8: no background
task dies silently; NOC audit: ``kill -KILL`` of the webhook worker was logged and restarted but
``walled_garden_task_failures_total{task="webhooks"}`` and ``status`` stayed at 0).

``child_process.keep_running`` restarts the child without ending its task, so it reports each
unasked end to the supervisor running it (``supervisor.report_failure``): counted under the
task's name, shown by ``status`` with what happened, running again once restarted. The daemon
stopping and a reload cancelling the task count nothing. First the mechanism with a stand-in
child, then the real webhook worker behind a real ``Service``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from daemon_helpers import NoConntrack
from enforcer import child_process
from enforcer.cli import _print_health
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.service import Service
from enforcer.supervisor import Supervisor

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def counter() -> Counter:
    return Counter("walled_garden_task_failures", "test", ["task"], registry=CollectorRegistry())


async def until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Child:
    """One life of a stand-in child per ``run_once``: the first ``deaths`` end at once with
    ``code``; the next lives until ``stop`` (its end then asked for)."""

    def __init__(self, stop: asyncio.Event, deaths: int, code: int = -signal.SIGKILL) -> None:
        self.stop, self.deaths, self.code = stop, deaths, code
        self.lives = 0

    async def run_once(self) -> int:
        self.lives += 1
        if self.lives <= self.deaths:
            return self.code
        await self.stop.wait()
        return 0

    def exited(self, code: int | None, delay: float) -> str:
        return f"stand-in {child_process.describe_exit(code)}"


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_process, "RESTART_FIRST", 0.005)
    monkeypatch.setattr(child_process, "RESTART_MAX", 0.02)


async def test_each_unasked_exit_is_counted_and_shown_under_the_task(fast: None) -> None:
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures, clock=lambda: 1_800_000_000.0)
    child = Child(stop, deaths=2)
    supervisor.start("webhooks", lambda: child_process.keep_running(child.run_once, stop, child.exited))
    try:
        await until("the third life", lambda: child.lives == 3)
        await until("it to run again", lambda: supervisor.status()["webhooks"]["running"])
        shown = supervisor.status()["webhooks"]
        assert shown["failures"] == 2 and shown["last_error"] == "stand-in killed by SIGKILL", shown
        assert shown["last_failure_at"] == 1_800_000_000.0 and shown["restart_at"] is None
        assert failures.labels("webhooks")._value.get() == 2
    finally:
        stop.set()
        await supervisor.close()
    assert failures.labels("webhooks")._value.get() == 2, "the end at stop is asked for: not counted"
    assert supervisor.status()["webhooks"]["failures"] == 2


async def test_while_waiting_for_its_restart_the_task_is_shown_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_process, "RESTART_FIRST", 30.0)   # a quick exit doubles it, capped: 30 s
    monkeypatch.setattr(child_process, "RESTART_MAX", 30.0)
    stop = asyncio.Event()
    supervisor = Supervisor(stop, counter(), clock=lambda: 1_800_000_000.0)
    child = Child(stop, deaths=1, code=3)
    supervisor.start("dns_forwarder", lambda: child_process.keep_running(child.run_once, stop, child.exited))
    try:
        await until("the failure", lambda: supervisor.status()["dns_forwarder"]["failures"] == 1)
        shown = supervisor.status()["dns_forwarder"]
        assert shown["running"] is False and shown["restart_at"] == 1_800_000_030.0, shown
        assert shown["last_error"] == "stand-in exited with code 3"
    finally:
        stop.set()
        await supervisor.close()


async def test_a_child_ended_by_a_cancelled_task_is_no_failure(fast: None) -> None:
    """A reload that replaces or drops the child (``Supervisor.end``/``start``) cancels its task."""
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures)
    ended = asyncio.Event()

    async def run_once() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()   # the bridge reaps its child here
        return 0

    supervisor.start("dns_forwarder", lambda: child_process.keep_running(run_once, stop, lambda c, d: "x"))
    await asyncio.sleep(0.05)
    await supervisor.end("dns_forwarder")
    assert ended.is_set()
    assert failures.labels("dns_forwarder")._value.get() == 0
    await supervisor.close()


async def test_outside_a_supervisor_an_exit_is_still_restarted(fast: None) -> None:
    """A bridge driven by hand (tests, tools) has no task to count under: nothing breaks."""
    stop = asyncio.Event()
    child = Child(stop, deaths=1)
    running = asyncio.create_task(child_process.keep_running(child.run_once, stop, child.exited))
    await until("the restart", lambda: child.lives == 2)
    stop.set()
    await asyncio.wait_for(running, 5)


@pytest.mark.parametrize(("code", "text"), [(-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
                                            (3, "exited with code 3"), (0, "exited with code 0"), (None, "ended"),
                                            (-200, "killed by signal 200")])
def test_describe_exit(code: int | None, text: str) -> None:
    assert child_process.describe_exit(code) == text


# -- the real webhook worker behind the daemon's Service ----------------------------------------------

def write_config(tmp_path: Path, port: int) -> Path:
    (tmp_path / "webhook.secret").write_text(SECRET + "\n")
    (tmp_path / "webhook.secret").chmod(0o600)
    (tmp_path / "l.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n")
    raw: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "subscribers": {"source": str(tmp_path / "l.yaml")},
        "walled_garden": {"allow": ["192.0.2.0/24"]},
        "api": {"socket": str(tmp_path / "control.sock"), "listen": f"127.0.0.1:{port}",
                "webhook_secret_file": str(tmp_path / "webhook.secret")},
        "metrics": {"listen": None, "portal_listen": None},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def test_a_killed_webhook_worker_is_counted_and_shown_by_status(
        tmp_path: Path, unused_tcp_port: int, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, unused_tcp_port)
    config = parse_config(path.read_text(), str(path))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    stop = asyncio.Event()
    service = Service(config, enforcer, stop)

    def webhooks() -> dict[str, Any]:
        tasks: dict[str, Any] = enforcer.queries.status()["tasks"]
        return dict(tasks["webhooks"])

    def failures() -> float:
        return float(enforcer.metrics.registry.get_sample_value("walled_garden_task_failures_total",
                                                                {"task": "webhooks"}) or 0)
    try:
        with caplog.at_level(logging.ERROR, "walled_garden.webhooks"):
            await service.start()
            worker = service.webhooks
            assert worker is not None and await worker.wait_ready(15.0)
            assert worker.process is not None
            first = worker.process.pid
            assert webhooks()["failures"] == 0 and failures() == 0
            worker.process.send_signal(signal.SIGKILL)
            await until("the failure to be recorded", lambda: webhooks()["failures"] == 1)
            assert failures() == 1
            assert webhooks()["last_error"] == "webhook worker killed by SIGKILL"
            await until("the worker to run again", lambda: worker.ready.is_set() and worker.process is not None
                        and worker.process.pid != first and webhooks()["running"], timeout=15)
        assert any(r.getMessage().startswith("event=webhook_worker_exited code=-9 ") for r in caplog.records)
        _print_health(enforcer.queries.status())
        out = capsys.readouterr().out
        assert "task webhooks FAILED 1 time(s) since the start, last at " in out, out
        assert out.rstrip().endswith(": webhook worker killed by SIGKILL; running again"), out
    finally:
        stop.set()
        await service.close()
        await enforcer.close()
    assert failures() == 1, "the worker's end at the daemon's stop is asked for: not counted"
