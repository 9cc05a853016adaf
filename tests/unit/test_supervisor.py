"""No background task dies silently (docs/reference.md, Safety rules).

The supervisor on its own (a failure is logged with its traceback, counted, shown and
restarted with capped, resetting backoff; an unasked return is a failure; stop and
cancellation are not), then the Service: a failure injected into each kind of task it starts
is logged, counted in ``walled_garden_task_failures_total{task}``, shown by ``status`` and
the task runs again. And start-up never waits for, nor fails on, a listen address that the
network has not brought up yet (the unit runs before the network).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from daemon_helpers import NoConntrack
from enforcer import service as service_module
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.service import Service, address_present
from enforcer.supervisor import Supervisor

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def counter() -> Counter:
    return Counter("walled_garden_task_failures", "test", ["task"], registry=CollectorRegistry())


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


class Flaky:
    """A task body that fails ``failures`` times, then runs until the stop event."""

    def __init__(self, stop: asyncio.Event, failures: int = 1, returns: bool = False) -> None:
        self.stop, self.failures, self.returns = stop, failures, returns
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            if self.returns:
                return
            raise RuntimeError(f"injected failure {self.runs}")
        await self.stop.wait()


async def test_a_failure_is_logged_counted_shown_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures, first_delay=0.01, clock=lambda: 1000.0)
    body = Flaky(stop)
    with caplog.at_level(logging.ERROR, "walled_garden.supervisor"):
        supervisor.start("timers", body)
        await until(lambda: body.runs == 2)
    assert failures.labels("timers")._value.get() == 1
    state = supervisor.status()["timers"]
    assert state["running"] and state["failures"] == 1 and state["last_failure_at"] == 1000.0
    assert state["last_error"] == "RuntimeError: injected failure 1"
    record = next(r for r in caplog.records if "event=task_failed" in r.getMessage())
    assert "task=timers" in record.getMessage() and record.exc_info is not None, "the traceback is logged"
    stop.set()
    await supervisor.close()
    assert supervisor.status()["timers"]["failures"] == 1, "stopping is not a failure"


async def test_a_task_that_returns_unasked_is_a_failure_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures, first_delay=0.01)
    body = Flaky(stop, returns=True)
    with caplog.at_level(logging.ERROR, "walled_garden.supervisor"):
        supervisor.start("source", body)
        await until(lambda: body.runs == 2)
    assert supervisor.status()["source"]["last_error"] == "ended without being asked to stop"
    assert failures.labels("source")._value.get() == 1
    assert any("event=task_failed task=source" in r.getMessage() for r in caplog.records)
    stop.set()
    await supervisor.close()


async def test_stop_and_cancellation_count_nothing() -> None:
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures, first_delay=0.01)
    ended = Flaky(stop, failures=0)
    supervisor.start("table_check", ended)
    supervisor.start("outbox", Flaky(stop, failures=0))
    await until(lambda: ended.runs == 1)
    supervisor.start("outbox", Flaky(stop, failures=0))       # a reload replaces it: cancelled
    supervisor.start("hosts", Flaky(stop, failures=0))
    supervisor.start("hosts", None)                           # no longer wanted
    await asyncio.sleep(0.05)
    stop.set()
    await until(lambda: not supervisor.status()["table_check"]["running"])
    await supervisor.close()
    status = supervisor.status()
    assert set(status) == {"table_check", "outbox"}
    assert all(s["failures"] == 0 for s in status.values())
    assert failures.labels("table_check")._value.get() == 0 and failures.labels("outbox")._value.get() == 0


async def test_backoff_doubles_is_capped_and_resets_after_a_healthy_run(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = asyncio.Event()
    waits: list[float] = []

    async def no_wait(self: Supervisor, seconds: float) -> bool:
        waits.append(seconds)
        return False

    monkeypatch.setattr(Supervisor, "_stopped_within", no_wait)
    supervisor = Supervisor(stop, first_delay=1.0, max_delay=4.0, healthy_after=3600.0)
    body = Flaky(stop, failures=5)
    supervisor.start("timers", body)
    await until(lambda: body.runs == 6)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert supervisor.status()["timers"]["restart_at"] is None   # running again

    waits.clear()
    healthy = Supervisor(stop, first_delay=1.0, max_delay=4.0, healthy_after=0.0)   # every run was healthy
    body = Flaky(stop, failures=3)
    healthy.start("timers", body)
    await until(lambda: body.runs == 4)
    assert waits == [1.0, 1.0, 1.0]
    stop.set()
    await supervisor.close()
    await healthy.close()


async def test_a_failure_while_stopping_is_counted_but_not_restarted() -> None:
    stop, failures = asyncio.Event(), counter()
    supervisor = Supervisor(stop, failures, first_delay=0.01)
    runs = 0

    async def fails_on_stop() -> None:
        nonlocal runs
        runs += 1
        await stop.wait()
        raise RuntimeError("broke while stopping")

    supervisor.start("webhooks", fails_on_stop)
    await until(lambda: runs == 1)
    stop.set()
    await until(lambda: supervisor.status()["webhooks"]["failures"] == 1)
    await asyncio.sleep(0.05)
    assert runs == 1 and supervisor.status()["webhooks"]["restart_at"] is None
    await supervisor.close()


# -- the Service: every task it starts is supervised ----------------------------------------------

def write_config(tmp_path: Path) -> Path:
    (tmp_path / "webhook.secret").write_text(SECRET + "\n")
    (tmp_path / "webhook.secret").chmod(0o600)
    (tmp_path / "promises.secret").write_text(SECRET + "\n")
    (tmp_path / "promises.secret").chmod(0o600)
    (tmp_path / "l.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n")
    raw: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "subscribers": {"source": str(tmp_path / "l.yaml")},
        "walled_garden": {"allow": ["192.0.2.0/24", "pay.example.net"]},
        "api": {"socket": str(tmp_path / "control.sock"), "listen": "127.0.0.1:18081",
                "webhook_secret_file": str(tmp_path / "webhook.secret")},
        "metrics": {"listen": "127.0.0.1:19640", "portal_listen": None},
        "policy": {"promise_to_pay": {"enabled": True, "webhook_url": "http://127.0.0.1:9/promises",
                                            "webhook_secret_file": str(tmp_path / "promises.secret")}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class StubBridge:
    """The webhook worker bridge without a child process."""

    run_impl: Callable[..., Awaitable[None]]

    def __init__(self, *args: Any) -> None:
        pass

    async def run(self, stop: asyncio.Event) -> None:
        await type(self).run_impl(stop)

    async def wait_ready(self, timeout: float = 15.0) -> bool:
        return True

    def reload_secret(self, secret_file: str) -> None:
        pass


def flaky_method(stop: asyncio.Event, calls: list[int]) -> Callable[..., Awaitable[None]]:
    """A replacement for a task's ``run``: fails on the first call, then runs until stopped."""
    async def run(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        await stop.wait()
    return run


class FakeRunner:
    async def cleanup(self) -> None:
        pass


TASKS = ["source", "timers", "table_check", "outbox", "webhooks", "hosts", "metrics_listener"]


@pytest.mark.parametrize("task", TASKS)
async def test_each_service_task_is_supervised(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    config = parse_config(path.read_text(), str(path))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    stop = asyncio.Event()
    calls: list[int] = []
    fail = flaky_method(stop, calls)

    async def quiet(*args: Any, **kwargs: Any) -> None:
        await stop.wait()

    async def runner(*args: Any, **kwargs: Any) -> FakeRunner:
        return FakeRunner()

    StubBridge.run_impl = staticmethod(fail if task == "webhooks" else quiet)  # type: ignore[assignment]
    monkeypatch.setattr(service_module, "WorkerBridge", StubBridge)
    monkeypatch.setattr(service_module.FileSource, "run", fail if task == "source" else quiet)
    monkeypatch.setattr(service_module.Outbox, "run", fail if task == "outbox" else quiet)
    monkeypatch.setattr(service_module.GardenHosts, "run", fail if task == "hosts" else quiet)
    monkeypatch.setattr(enforcer.timers, "run", fail if task == "timers" else quiet)
    if task == "metrics_listener":
        async def broken_site(*args: Any) -> FakeRunner:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return FakeRunner()
        monkeypatch.setattr(service_module, "start_tcp_site", broken_site)
    else:
        monkeypatch.setattr(service_module, "start_tcp_site", runner)
    service = Service(config, enforcer, stop)
    if task == "table_check":
        monkeypatch.setattr(service, "_check_table", fail)
    else:
        monkeypatch.setattr(service, "_check_table", quiet)
    service.supervisor.first_delay = 0.01
    try:
        with caplog.at_level(logging.ERROR, "walled_garden.supervisor"):
            await service.start()
            await until(lambda: len(calls) >= 2)        # restarted
            await until(lambda: enforcer.queries.status()["tasks"][task]["running"])
        tasks = enforcer.queries.status()["tasks"]
        assert set(tasks) == set(TASKS)
        assert tasks[task]["failures"] == 1 and tasks[task]["last_error"] == "RuntimeError: injected"
        assert all(s["failures"] == 0 and s["running"] for name, s in tasks.items() if name != task)
        assert enforcer.metrics.task_failures.labels(task)._value.get() == 1
        assert any(f"event=task_failed task={task} " in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        stop.set()
        await service.close()
        await enforcer.close()


async def test_no_outbox_task_without_a_billing_url(tmp_path: Path) -> None:
    """The outbox has nothing to do without ``webhook_url``; it is not started (rather than
    ending at once, which the supervisor would rightly call a failure)."""
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["policy"] = {}
    raw["api"]["listen"] = None
    raw["metrics"]["listen"] = None
    raw["walled_garden"]["allow"] = ["192.0.2.0/24"]
    path.write_text(yaml.safe_dump(raw))
    config = parse_config(path.read_text(), str(path))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    stop = asyncio.Event()
    service = Service(config, enforcer, stop)
    try:
        await service.start()
        await asyncio.sleep(0.05)
        assert set(enforcer.queries.status()["tasks"]) == {"source", "timers", "table_check"}
        assert all(s["failures"] == 0 for s in enforcer.queries.status()["tasks"].values())
    finally:
        stop.set()
        await service.close()
        await enforcer.close()


# -- listen addresses the network has not brought up yet ------------------------------------------

def test_address_present() -> None:
    assert address_present("0.0.0.0") and address_present("::") and address_present("127.0.0.1")
    assert not address_present("192.0.2.77"), "TEST-NET-1 is on no interface of a test machine"


async def test_a_metrics_address_not_there_yet_is_retried_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Start-up (and READY=1) goes on; the listener binds once the address exists; no task failure."""
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["metrics"]["listen"] = "192.0.2.77:19640"
    raw["api"]["listen"] = "192.0.2.77:18081"
    raw["walled_garden"]["allow"] = ["192.0.2.0/24"]
    path.write_text(yaml.safe_dump(raw))
    config = parse_config(path.read_text(), str(path))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    stop = asyncio.Event()
    monkeypatch.setattr(service_module, "LISTEN_RETRY_FIRST", 0.01)
    attempts: list[str] = []
    real = service_module.start_tcp_site

    async def appears_later(app: Any, host: str, port: int) -> Any:
        attempts.append(host)
        if len(attempts) < 3:
            return await real(app, host, port)      # EADDRNOTAVAIL: not on any interface yet
        return FakeRunner()

    class NeverReady(StubBridge):
        async def wait_ready(self, timeout: float = 15.0) -> bool:
            raise AssertionError("start-up waited for a listener whose address is not there")

    async def quiet(stop: asyncio.Event) -> None:
        await stop.wait()

    NeverReady.run_impl = staticmethod(quiet)  # type: ignore[assignment]
    monkeypatch.setattr(service_module, "start_tcp_site", appears_later)
    monkeypatch.setattr(service_module, "WorkerBridge", NeverReady)
    service = Service(config, enforcer, stop)
    try:
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(service.start(), 5.0)
            await until(lambda: len(attempts) >= 3)
        messages = [r.getMessage() for r in caplog.records]
        assert any("event=listen_failed listener=metrics listen=192.0.2.77:19640" in m for m in messages)
        assert any("event=listen_address_absent listen=192.0.2.77:18081" in m for m in messages)
        status = enforcer.queries.status()["tasks"]["metrics_listener"]
        assert status["running"] and status["failures"] == 0
    finally:
        stop.set()
        await service.close()
        await enforcer.close()

