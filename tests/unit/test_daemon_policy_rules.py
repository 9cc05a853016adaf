"""The policy rules through the daemon (fake kernel, real control socket and CLI): exemptions, dispute
events, enforcement windows across restarts, escalation, promises with the outgoing webhook,
and the audit log."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from daemon_helpers import NoConntrack, cli, exempt, handle_event, operator_change, promise
from enforcer.api.control import control_app
from enforcer.api.listeners import start_tcp_site, start_unix_site
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import parse_event
from enforcer.service import outbox_for
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

DAY = 86400.0
MONDAY_10 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OUTBOX_SECRET = "whsec_" + "b3V0Ym94LXNlY3JldC1mb3ItdGVzdHMtMTIzNDU2"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sub(sid: str = "C-1", ip: str = "100.64.0.10", mode: Mode = Mode.WALLED_GARDEN) -> Subscriber:
    return Subscriber(sid, (parse_address(ip),), mode, "overdue")


def make_config(tmp: Path, policy: str = "", port: int = 0) -> Any:
    (tmp / "secret").write_text(SECRET)
    (tmp / "outbox.secret").write_text(OUTBOX_SECRET)     # its own key, never the inbound one
    policy = policy.replace("@OUTBOX_SECRET@", str(tmp / "outbox.secret"))
    text = (f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.yaml}}\n"
            f"api: {{socket: {tmp}/control.sock, webhook_secret_file: {tmp}/secret}}\n" + policy)
    (tmp / "config.yaml").write_text(text)
    return parse_config(text, str(tmp / "config.yaml"))


@contextlib.asynccontextmanager
async def running(config: Any, clock: Clock, fake: FakeDataplane | None = None) -> Any:
    fake = fake or FakeDataplane()
    enforcer = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=clock)  # type: ignore[arg-type]
    await enforcer.engine.restore()
    runner = await start_unix_site(control_app(enforcer), config.api.socket)
    try:
        yield enforcer, fake
    finally:
        await runner.cleanup()
        await enforcer.close()


def kernel_mode(fake: FakeDataplane, ip: str = "100.64.0.10") -> str | None:
    assert fake.state is not None
    return fake.view["mode4_32"].get(ip)


async def test_exempt_and_unexempt_via_cli_are_audited(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running(config, Clock(MONDAY_10)) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        assert kernel_mode(fake) == "goto garden"
        code, out = await cli("exempt", "C-1", "--category", "vulnerable", "--until", "14d",
                              "--note", "medical equipment", "--config", str(tmp_path / "config.yaml"))
        assert code == 0 and "now free" in out, out
        assert kernel_mode(fake) is None
        code, out = await cli("explain", "C-1", "--config", str(tmp_path / "config.yaml"))
        assert "vulnerable household: medical equipment" in out and "chain of reasons" in out
        code, out = await cli("unexempt", "C-1", "--config", str(tmp_path / "config.yaml"), "--note", "resolved")
        assert code == 0 and kernel_mode(fake) == "goto garden"
        code, out = await cli("audit", "C-1", "--config", str(tmp_path / "config.yaml"))
        lines = out.strip().splitlines()
        assert [line.split()[3] for line in lines] == ["free", "walled-garden", "free"], out
        assert "->" in lines[1] and "exempt (vulnerable household" in lines[1]
        assert "ended by operator" in lines[2]
        code, out = await cli("exempt", "C-1", "--category", "vulnerable", "--until", "2020-01-01",
                              "--config", str(tmp_path / "config.yaml"))
        assert code == 1


async def test_exemption_expires_by_itself(tmp_path: Path) -> None:
    clock = Clock(MONDAY_10)
    async with running(make_config(tmp_path), clock) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        status, _ = await exempt(enforcer, "alice", "C-1", "business", MONDAY_10 + DAY, "shop till")
        assert status == 200 and kernel_mode(fake) is None
        assert enforcer.engine.inputs.next_change(clock.now) == MONDAY_10 + DAY
        clock.now = MONDAY_10 + DAY
        await enforcer.timers.tick()
        assert kernel_mode(fake) == "goto garden"
        assert enforcer.queries.audit("C-1", None, 10)[-1]["new"] == "walled-garden"


async def test_dispute_events_open_and_close_an_exemption(tmp_path: Path) -> None:
    clock = Clock(MONDAY_10)
    async with running(make_config(tmp_path), clock) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))

        async def send(kind: str, ts: float, eid: str, **data: Any) -> tuple[int, dict]:
            body = json.dumps({"type": kind, "timestamp": ts, "data": {"subscriber": "C-1", **data}})
            return await handle_event(enforcer, parse_event(eid, body), 0.0)

        status, answer = await send("dispute.opened", MONDAY_10 - 60, "e1", note="ticket 4711")
        assert status == 200 and answer["mode"] == "free" and kernel_mode(fake) is None
        assert enforcer.engine.inputs.exemptions["C-1"]["dispute"].until == MONDAY_10 + 30 * DAY  # configured default
        status, answer = await send("dispute.closed", MONDAY_10 - 120, "e2")          # older: ignored
        assert answer["result"] == "ignored" and kernel_mode(fake) is None
        status, answer = await send("dispute.closed", MONDAY_10, "e3")
        assert answer["mode"] == "walled-garden" and kernel_mode(fake) == "goto garden"


@pytest.mark.parametrize("body, message", [
    ({"type": "outage.opened", "timestamp": 1, "data": {"subscriber": "C-1", "until": "soon"}}, "data.until"),
    ({"type": "outage.opened", "timestamp": 100, "data": {"subscriber": "C-1", "until": 50}}, "before"),
    ({"type": "dispute.opened", "timestamp": 1, "data": {"subscriber": "C-1", "note": 5}}, "data.note"),
])
def test_malformed_exemption_events(body: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_event("x", json.dumps(body))


WINDOWS = "policy:\n  windows: {timezone: UTC, days: [mon, tue, wed, thu, fri], hours: '08:00-17:00'}\n"


async def test_restriction_waits_for_window_and_survives_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, WINDOWS)
    saturday = MONDAY_10 + 5 * DAY
    clock = Clock(saturday)
    fake = FakeDataplane()
    async with running(config, clock, fake) as (enforcer, _):
        await enforcer.lists.on_list(ListUpdate([sub("C-1"), sub("C-2", "100.64.0.11")], "l.yaml", "1"))
        assert kernel_mode(fake) is None and enforcer.queries.status()["waiting_for_window"] == 2
        explained = enforcer.queries.explain("C-1")
        assert explained["pending"] == "walled-garden" and "waits for the enforcement window" in explained["why"]
        # a payment while waiting lifts nothing further but clears the wait
        body = json.dumps({"type": "payment.received", "timestamp": saturday, "data": {"subscriber": "C-2"}})
        await handle_event(enforcer, parse_event("p1", body), 0.0)
        assert enforcer.queries.status()["waiting_for_window"] == 1
    clock.now = MONDAY_10 + 7 * DAY - 2 * 3600      # Monday 08:00
    async with running(config, clock, fake) as (enforcer, _):
        assert kernel_mode(fake) == "goto garden"     # restart inside the window: applied at start
        assert kernel_mode(fake, "100.64.0.11") is None
    clock.now = MONDAY_10 + 7 * DAY + 9 * 3600       # Monday 19:00: window closed again
    async with running(config, clock, fake) as (enforcer, _):
        assert kernel_mode(fake) == "goto garden", "a restart outside the window keeps restrictions"


async def test_window_opening_applies_waiting_restrictions(tmp_path: Path) -> None:
    clock = Clock(MONDAY_10 + 10 * 3600)             # Monday 20:00
    async with running(make_config(tmp_path, WINDOWS), clock) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        assert kernel_mode(fake) is None
        opens = enforcer.engine.inputs.next_change(clock.now, waiting=True)
        assert opens == MONDAY_10 + DAY - 2 * 3600    # Tuesday 08:00
        clock.now = opens
        await enforcer.timers.tick()
        assert kernel_mode(fake) == "goto garden"
        assert enforcer.queries.status()["waiting_for_window"] == 0


async def test_escalation_climbs_the_ladder(tmp_path: Path) -> None:
    ladder = "policy:\n  escalation: [{after: 7d, mode: throttle}, {after: 14d, mode: walled-garden}]\n"
    clock = Clock(MONDAY_10)
    async with running(make_config(tmp_path, ladder), clock) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub(mode=Mode.NOTICE)], "l.yaml", "1"))
        assert kernel_mode(fake) == "goto notice"
        clock.now = MONDAY_10 + 7 * DAY + 1
        await enforcer.timers.tick()
        assert kernel_mode(fake) == "goto throttle"
        clock.now = MONDAY_10 + 14 * DAY + 400
        await enforcer.timers.tick()
        assert kernel_mode(fake) == "goto garden"
        assert "escalated to walled-garden" in enforcer.queries.explain("C-1")["why"]


PROMISE = ("policy:\n  promise_to_pay: {term: 3d, max: 2, period: 90d, reasons: [overdue], "
           "webhook_url: 'http://127.0.0.1:%d/hook', webhook_secret_file: '@OUTBOX_SECRET@'}\n")


async def test_promise_to_pay_lifts_tells_billing_and_lapses(tmp_path: Path, unused_tcp_port: int) -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=500 if len(received) == 1 else 204)   # first delivery fails: retried

    app = web.Application()
    app.router.add_post("/hook", hook)
    billing = await start_tcp_site(app, "127.0.0.1", unused_tcp_port)
    clock = Clock(MONDAY_10)
    try:
        async with running(make_config(tmp_path, PROMISE % unused_tcp_port), clock) as (enforcer, fake):
            await enforcer.lists.on_list(ListUpdate([sub(), Subscriber("C-9", (parse_address("100.64.0.99"),),
                                                                 Mode.WALLED_GARDEN, "fraud")], "l.yaml", "1"))
            assert enforcer.queries.lookup("100.64.0.10")["promise"]["eligible"] is True
            assert enforcer.queries.lookup("100.64.0.99")["promise"]["why"] == "reason_not_eligible"
            status, answer = await promise(enforcer, "100.64.0.10")
            assert status == 200 and answer["until"] == MONDAY_10 + 3 * DAY and kernel_mode(fake) is None
            assert (await promise(enforcer, "100.64.0.10"))[0] == 409          # not restricted any more
            assert (await promise(enforcer, "100.64.0.99"))[0] == 403
            outbox = outbox_for(enforcer, enforcer.engine.config)
            import aiohttp
            async with aiohttp.ClientSession() as session:
                assert await outbox.deliver_due(session) == 0                   # billing answered 500
                assert enforcer.engine.store.outbox_size() == 1
                clock.now += 3600                                              # past the backoff
                assert await outbox.deliver_due(session) == 1
            assert enforcer.engine.store.outbox_size() == 0
            body, headers = received[-1]
            assert received[0][1]["webhook-id"] == headers["webhook-id"], "retries keep the id"
            Webhook(OUTBOX_SECRET).verify(body, {k.lower(): v for k, v in headers.items()})
            payload = json.loads(body)
            assert payload["type"] == "promise.made" and payload["data"]["subscriber"] == "C-1"
            assert payload["data"]["reference"] == enforcer.references.code("C-1")
            clock.now = MONDAY_10 + 3 * DAY
            await enforcer.timers.tick()
            assert kernel_mode(fake) == "goto garden"
            assert enforcer.queries.lookup("100.64.0.10")["promise"]["why"] == "last_promise_lapsed"
            chain = enforcer.queries.explain("C-1")["chain"]
            assert any("promise to pay" in step and "lapsed" in step for step in chain)
    finally:
        await billing.cleanup()


async def test_operator_restriction_is_not_promisable(tmp_path: Path) -> None:
    async with running(make_config(tmp_path, PROMISE % 9), Clock(MONDAY_10)) as (enforcer, _):
        await operator_change(enforcer, "alice", "C-5", True, "abuse", addresses=["100.64.0.55"])
        assert enforcer.queries.lookup("100.64.0.55")["promise"]["why"] == "operator_restriction"


async def test_audit_retention_and_since(tmp_path: Path) -> None:
    clock = Clock(MONDAY_10)
    async with running(make_config(tmp_path, "policy: {audit_retention: 30d}\n"), clock) as (enforcer, _):
        enforcer.engine.store.append_audit([(MONDAY_10 - 40 * DAY, "C-1", "free", "walled-garden", "old"),
                                     (MONDAY_10 - 10 * DAY, "C-1", "walled-garden", "free", "recent")])
        assert [e["cause"] for e in enforcer.queries.audit("C-1", MONDAY_10 - 20 * DAY, 10)] == ["recent"]
        enforcer.timers._pruned = -1e9          # the hourly prune is due
        await enforcer.timers.tick()
        assert [e["cause"] for e in enforcer.queries.audit(None, None, 10)] == ["recent"]


async def test_explain_by_address_finds_a_freed_subscriber(tmp_path: Path) -> None:
    async with running(make_config(tmp_path), Clock(MONDAY_10)) as (enforcer, _):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        await exempt(enforcer, "alice", "C-1", "outage", MONDAY_10 + DAY, "fibre cut")
        answer = enforcer.queries.explain("100.64.0.10")
        assert answer["found"] and answer["subscriber"] == "C-1" and not answer["restricted"]
        assert enforcer.queries.explain("100.64.9.9")["found"] is False


async def test_reload_with_new_windows_re_decides(tmp_path: Path) -> None:
    clock = Clock(MONDAY_10 + 5 * DAY)   # Saturday
    config = make_config(tmp_path)
    async with running(config, clock) as (enforcer, fake):
        await enforcer.lists.on_list(ListUpdate([sub()], "l.yaml", "1"))
        assert kernel_mode(fake) == "goto garden"
        await operator_change(enforcer, "alice", "C-1", False, "checking")
        assert kernel_mode(fake) is None
        windowed = make_config(tmp_path, WINDOWS)
        await enforcer.engine.reload(windowed)
        assert enforcer.engine.inputs.rules.windows.configured
        # a new list entry on Saturday now waits for Monday 08:00
        await enforcer.lists.on_list(ListUpdate([sub(), sub("C-2", "100.64.0.11")], "l.yaml", "2"))
        assert kernel_mode(fake, "100.64.0.11") is None and "C-2" in enforcer.engine.record.waiting
