"""The webhook worker process: a real child serving HTTP on loopback, the daemon's enforcer
behind the socketpair (fake kernel), signed requests from outside."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon_helpers import RESULTS, NoConntrack
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.demo.billing import signed_request
from enforcer.events import Event, event_from_wire, event_to_wire, parse_event
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address
from enforcer.webhook_worker import LineWriter, WorkerBridge

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_wire_round_trip() -> None:
    body = json.dumps({"type": "subscriber.restricted", "timestamp": 5, "data": {
        "subscriber": "C-1", "addresses": ["100.64.0.10", "2001:db8:1::/56"], "mode": "notice", "reason": "overdue"}})
    event = parse_event("e1", body)
    assert event_from_wire(json.loads(json.dumps(event_to_wire(event)))) == event
    opened = Event("e2", "dispute.opened", 5.0, "C-1", note="ticket", until=99.0)
    assert event_from_wire(event_to_wire(opened)) == opened


def test_wire_round_trip_of_a_session_event() -> None:
    body = {"type": "session.started", "timestamp": 1_795_000_000,
            "data": {"username": "c1@isp", "mac": "02-00-00-00-10-01", "addresses": ["100.64.0.9", "2001:db8::/56"]}}
    event = parse_event("s-1", json.dumps(body))
    assert event_from_wire(json.loads(json.dumps(event_to_wire(event)))) == event


@pytest.fixture
async def bridge(tmp_path: Path, unused_tcp_port: int) -> Any:
    (tmp_path / "secret").write_text(SECRET)
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          f"api: {{socket: {tmp_path}/c.sock, webhook_secret_file: {tmp_path}/secret}}\n")
    fake = FakeDataplane()
    enforcer = Enforcer(config, dataplane=fake, conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    await enforcer.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.10"),))], "l", "1"))
    stop = asyncio.Event()
    worker = WorkerBridge(enforcer.events, "127.0.0.1", unused_tcp_port, str(tmp_path / "secret"))
    task = asyncio.create_task(worker.run(stop))
    assert await worker.wait_ready(15.0)
    yield worker, enforcer, fake, f"http://127.0.0.1:{unused_tcp_port}/v1/events", tmp_path
    stop.set()
    await asyncio.wait_for(task, 10)
    await enforcer.close()


async def post(url: str, secret: str, body: dict, event_id: str | None = None) -> tuple[int, dict]:
    request = signed_request(url, secret, body, event_id=event_id)
    async with (aiohttp.ClientSession() as session,
                session.post(url, data=request.data, headers=dict(request.header_items())) as response):
        return response.status, await response.json()


async def test_events_flow_through_the_worker(bridge: Any) -> None:
    _worker, enforcer, fake, url, _tmp = bridge
    pay = {"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}}
    status, answer = await post(url, SECRET, pay, "msg_1")
    assert status == 200 and answer["result"] == "applied" and answer["mode"] == "free"
    assert "100.64.0.10" not in fake.view["mode4_32"]
    assert (await post(url, SECRET, pay, "msg_1")) == (status, answer), "a replay gets the same answer"
    assert enforcer.metrics.event_to_enforce._sum.get() > 0
    status, answer = await post(url, "whsec_" + "A" * 43, pay)
    assert status == 401
    status, answer = await post(url, SECRET, {"type": "nonsense", "timestamp": 1, "data": {}})
    assert status == 400 and "type" in answer["error"]
    status, answer = await post(url, SECRET, {"type": "payment.received", "timestamp": 1, "data": {}})
    assert status == 400                      # a known type without its subscriber: counted under its type
    await asyncio.sleep(0.2)  # the counts travel on the socketpair
    assert enforcer.metrics.events.labels("unknown", "unauthorized")._value.get() == 1
    assert enforcer.metrics.events.labels("unknown", "malformed")._value.get() == 1
    assert enforcer.metrics.events.labels("payment.received", "malformed")._value.get() == 1


async def test_secret_reload_and_worker_restart(bridge: Any) -> None:
    worker, _enforcer, _fake, url, tmp = bridge
    new = "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
    (tmp / "secret2").write_text(new)
    worker.reload_secret(str(tmp / "secret2"))
    body = {"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}}
    for _ in range(50):
        if (await post(url, new, body))[0] == 200:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the reloaded secret was never accepted")
    assert (await post(url, SECRET, body))[0] == 401
    assert worker.process is not None
    worker.process.kill()                        # a crashed worker is restarted
    await asyncio.sleep(0.1)
    assert await worker.wait_ready(15.0)
    for _ in range(100):
        try:
            if (await post(url, new, body))[0] == 200:
                break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the restarted worker never answered")


async def test_answers_of_a_turn_go_out_in_one_write() -> None:
    class Writer:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closing = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closing

    writer = Writer()
    lines = LineWriter(writer)  # type: ignore[arg-type]
    for n in range(3):
        lines.send({"n": n})
    assert writer.writes == []
    await asyncio.sleep(0)
    assert writer.writes == [b'{"n":0}\n{"n":1}\n{"n":2}\n']
    writer.closing = True          # the child that asked is gone: its answers are dropped
    lines.send({"n": 4})
    await asyncio.sleep(0)
    assert len(writer.writes) == 1


async def test_a_burst_through_the_worker_gets_each_request_its_own_answer(bridge: Any) -> None:
    _worker, enforcer, fake, url, _tmp = bridge
    bodies = [{"type": "subscriber.restricted", "timestamp": "2026-11-23T10:00:00Z",
               "data": {"subscriber": f"B-{i}", "addresses": [f"100.64.7.{i}"]}} for i in range(1, 61)]
    bodies.append({"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}})
    results = await asyncio.gather(*(post(url, SECRET, body, f"burst-{i}") for i, body in enumerate(bodies)))
    assert [status for status, _ in results] == [200] * 61
    assert [answer["id"] for _, answer in results] == [f"burst-{i}" for i in range(61)]
    assert [answer["subscriber"] for _, answer in results] == [f"B-{i}" for i in range(1, 61)] + ["C-1"]
    assert {f"100.64.7.{i}" for i in range(1, 61)} <= set(fake.view["mode4_32"])
    assert enforcer.events.batcher.largest > 1


@pytest.mark.parametrize("status", [200, 400, 403, 404, 409, 503])
async def test_the_daemons_status_reaches_billing_through_the_worker_unchanged(bridge: Any, monkeypatch: Any,
                                                                              status: int) -> None:
    """E.g. 409 for an address another subscriber holds, 400 for an address outside
    ``gateway.subscriber_prefixes``: the bridge carries the daemon's result, answered as
    ``api.http`` answers it in the daemon itself."""
    _worker, enforcer, _fake, url, _tmp = bridge

    def submit(event: Event, received: float) -> Any:
        future = asyncio.get_running_loop().create_future()
        future.set_result(RESULTS[status](event.id))
        return future

    monkeypatch.setattr(enforcer.events, "submit", submit)
    body = {"type": "subscriber.restricted", "timestamp": "2026-11-23T10:00:00Z",
            "data": {"subscriber": "C-5", "addresses": ["100.64.0.55"]}}
    assert await post(url, SECRET, body, f"pass-{status}") == (status, {"id": f"pass-{status}",
                                                                        "error": f"daemon says {status}"})


async def test_an_address_conflict_is_409_through_the_worker(bridge: Any) -> None:
    _worker, _enforcer, _fake, url, _tmp = bridge
    body = {"type": "subscriber.restricted", "timestamp": "2026-11-23T10:00:00Z",
            "data": {"subscriber": "C-8", "addresses": ["100.64.0.10"]}}
    status, answer = await post(url, SECRET, body, "clash-1")
    assert status == 409 and "C-1" in answer["error"]


async def test_a_flood_of_refusals_is_counted_in_full_with_few_lines_to_the_daemon(bridge: Any) -> None:
    _worker, enforcer, _fake, url, _tmp = bridge
    body = {"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}}
    results = await asyncio.gather(*(post(url, "whsec_" + "A" * 43, body) for _ in range(100)))
    assert {status for status, _ in results} == {401}
    for _ in range(50):
        if enforcer.metrics.events.labels("unknown", "unauthorized")._value.get() == 100:
            break
        await asyncio.sleep(0.05)
    assert enforcer.metrics.events.labels("unknown", "unauthorized")._value.get() == 100


def test_the_worker_process_loads_no_part_of_the_daemon() -> None:
    """The webhook worker faces the network: what it runs must not include the daemon, its
    engine, the state store or the dataplane (it knows the daemon only as an ``EventSink``)."""
    import subprocess
    import sys

    code = ("import sys, enforcer.webhook_worker as w, enforcer.api.webhooks, enforcer.api.listeners\n"
            "print(sorted(m for m in sys.modules if m.startswith('enforcer')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    modules = loaded.stdout
    for privileged in ("enforcer.daemon", "enforcer.engine", "enforcer.store", "enforcer.reconciler",
                       "enforcer.dataplane", "enforcer.event_intake"):
        assert f"'{privileged}" not in modules, f"{privileged} is loaded by the worker: {modules}"
