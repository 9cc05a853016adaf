"""Two gateways (the daemon's parts, fake dataplanes) and one real nats-server on loopback:
every input travels through the stream and applies on both, in order, once."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from enforcer.config import Config, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, RELEASED, RESTRICTED, SESSION_STARTED, Event
from enforcer.fleet.link import subject
from enforcer.match import Match
from enforcer.model import Mode
from enforcer.outcome import Outcome, Refusal, Refused, Result
from enforcer.session_intake import CLI_SOURCE
from enforcer.sessions.session import Session
from enforcer.sessions.source import SessionChangeFailed
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_list
from tests.daemon_helpers import NoConntrack
from tests.nats_server import NatsServer, pair_on_nats

LIST = """subscribers:
  - {id: C-1, addresses: [100.64.0.10], reason: overdue}
  - {id: C-2, addresses: [100.64.0.20], reason: overdue}
  - {id: C-3, match: {mac: "02:00:00:00:00:03"}, reason: overdue}
"""


def config(tmp: Path, name: str, url: str) -> Config:
    return parse_config(
        f"state_dir: {tmp}/{name}\n"
        f"subscribers: {{source: {tmp}/l.yaml, guard: {{max_restrict: 3, max_restrict_share: 0.5}}}}\n"
        "policy: {promise_to_pay: {enabled: true, term: 3d}}\n"
        f"fleet: {{gateway: {name}, nats: {{url: '{url}'}}, stream: WG_TEST, catch_up_timeout: 5s, "
        f"answer_timeout: 3s}}\n", str(tmp / f"{name}.yaml"))


class Gateway:
    def __init__(self, tmp: Path, name: str, url: str) -> None:
        self.tmp, self.name, self.url = tmp, name, url
        self.enforcer: Enforcer | None = None
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def e(self) -> Enforcer:
        assert self.enforcer is not None
        return self.enforcer

    async def start(self, wait: bool = True) -> None:
        self.enforcer = Enforcer(config(self.tmp, self.name, self.url), dataplane=FakeDataplane(),
                                 conntrack=NoConntrack())  # type: ignore[arg-type]
        await self.e.engine.restore()
        await self.e.lists.on_list(ListUpdate(parse_list(LIST, "l.yaml"), "l.yaml", "1"))
        self.stop = asyncio.Event()
        assert self.e.fleet is not None
        self.task = asyncio.create_task(self.e.fleet.run(self.stop))
        if wait:
            assert await self.e.fleet.caught_up(10), self.e.fleet.error

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=10)
            if not done:
                import io
                out = io.StringIO()
                self.task.print_stack(file=out)
                for t in asyncio.all_tasks():
                    t.print_stack(file=out)
                raise AssertionError(f"fleet task did not end: {out.getvalue()}")
        if self.enforcer is not None:
            await self.enforcer.close()
        self.enforcer = None

    def mode(self, sid: str) -> Mode:
        decision = self.e.engine.decisions.get(sid)
        return decision.mode if decision else Mode.FREE

    async def event(self, kind: str, sid: str, event_id: str, **kw: Any) -> Result:
        event = Event(event_id, kind, time.time(), sid, **kw)
        return await asyncio.wait_for(self.e.sink.submit(event, time.perf_counter()), 10)


@contextlib.asynccontextmanager
async def two_gateways(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Gateway, Gateway]]:
    """A nats-server of this test's own and gateways gw-a and gw-b on it, all stopped after."""
    (tmp_path / "l.yaml").write_text(LIST)
    async with pair_on_nats(tmp_path, lambda name, url: Gateway(tmp_path, name, url)) as started:
        yield started


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Gateway, Gateway]]:
    async with two_gateways(tmp_path) as started:
        yield started


async def until(predicate: Any, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_payment_on_one_gateway_lifts_on_both(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    assert a.mode("C-1") is Mode.WALLED_GARDEN and b.mode("C-1") is Mode.WALLED_GARDEN
    result = await a.event(PAYMENT, "C-1", "evt-pay-1")
    assert isinstance(result, Outcome) and result.body["mode"] == "free", result
    assert a.mode("C-1") is Mode.FREE   # the answer came after A's own commit
    await until(lambda: b.mode("C-1") is Mode.FREE)
    audit = b.e.queries.audit("C-1", None, 10)
    assert any("via gw-a" in row["cause"] for row in audit), audit


async def test_same_webhook_id_on_both_gateways_acts_once(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    first, second = await asyncio.gather(a.event(PAYMENT, "C-2", "evt-dup"), b.event(PAYMENT, "C-2", "evt-dup"))
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert first.body["mode"] == second.body["mode"] == "free"
    assert a.e.metrics.fleet_published.labels("duplicate")._value.get() + \
        b.e.metrics.fleet_published.labels("duplicate")._value.get() == 1
    await until(lambda: a.e.fleet is not None and b.e.fleet is not None
                and a.e.fleet.applier.applied == b.e.fleet.applier.applied)
    for gw in (a, b):
        rows = [r for r in gw.e.queries.audit("C-2", None, 10) if "evt-dup" in r["cause"]]
        assert len(rows) == 1, rows


async def test_operator_actions_travel(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    result = await b.e.operator.change("root", "C-1", False, "called support")
    assert isinstance(result, Outcome), result
    await until(lambda: a.mode("C-1") is Mode.FREE)
    result = await a.e.operator.exempt("root", "C-2", "vulnerable", time.time() + 86400, "oxygen at home")
    assert isinstance(result, Outcome), result
    await until(lambda: b.mode("C-2") is Mode.FREE)
    assert "C-2" in b.e.engine.inputs.exemptions
    result = await b.e.operator.unexempt("root", "C-2", None, "ended")
    assert isinstance(result, Outcome), result
    await until(lambda: a.mode("C-2") is Mode.WALLED_GARDEN)


async def test_gateway_down_catches_up_in_order(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    await b.close()
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-order-0"), Outcome)
    assert isinstance(await a.e.operator.change("root", "C-1", True, "evt-order-1: still owes"), Outcome)
    assert isinstance(await a.event(RELEASED, "C-1", "evt-order-2"), Outcome)
    await b.start(wait=False)
    assert b.e.fleet is not None
    assert await b.e.fleet.caught_up(10)
    assert b.mode("C-1") is Mode.FREE and a.mode("C-1") is Mode.FREE
    causes = [r["cause"] for r in b.e.queries.audit("C-1", None, 20)]   # oldest first
    order = [next(i for i, c in enumerate(causes) if f"evt-order-{n}" in c) for n in (0, 1, 2)]
    assert order == sorted(order), causes


async def test_nats_down_answers_retry_later_and_changes_nothing(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    server, a, b = fleet
    server.stop()
    result = await a.event(PAYMENT, "C-1", "evt-down")
    assert isinstance(result, Refusal) and result.kind is Refused.UNAVAILABLE, result
    assert a.mode("C-1") is Mode.WALLED_GARDEN and b.mode("C-1") is Mode.WALLED_GARDEN
    server.start()
    assert a.e.fleet is not None and b.e.fleet is not None
    deadline = time.monotonic() + 20
    result = await a.event(PAYMENT, "C-1", "evt-down")
    while isinstance(result, Refusal) and time.monotonic() < deadline:   # billing retries
        await asyncio.sleep(0.5)
        result = await a.event(PAYMENT, "C-1", "evt-down")
    assert isinstance(result, Outcome), result
    await until(lambda: b.mode("C-1") is Mode.FREE, 15)
    for gw in (a, b):
        rows = [r for r in gw.e.queries.audit("C-1", None, 10) if "evt-down" in r["cause"]]
        assert len(rows) == 1, rows


async def test_status_lists_both_gateways(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, _b = fleet
    assert a.e.fleet is not None
    view: dict[str, Any] = {}

    async def both() -> bool:
        nonlocal view
        view = await a.e.fleet.status()   # type: ignore[union-attr]
        return {g["gateway"] for g in view["gateways"]} == {"gw-a", "gw-b"}

    deadline = time.monotonic() + 8
    while not await both():
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.3)
    assert view["connected"] and view["gateway"] == "gw-a"
    assert a.e.queries.status()["fleet"]["caught_up"] is True


async def test_a_promise_made_on_one_portal_holds_on_the_other(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    result = await a.e.portal.promise("100.64.0.10")
    assert isinstance(result, Outcome) and result.body["promised"] is True, result
    await until(lambda: b.mode("C-1") is Mode.FREE)
    promise = b.e.engine.inputs.promise("C-1")
    assert promise is not None and promise.until == pytest.approx(a.e.engine.inputs.promise("C-1").until, abs=1e-3)
    assert b.e.engine.store.outbox_size() == 0   # billing hears of it from the gateway whose portal was used


def big_list(count: int) -> str:
    return "subscribers:\n" + "".join(f"  - {{id: C-{n}, addresses: [100.64.1.{n}], reason: overdue}}\n"
                                       for n in range(1, count + 1))


async def test_a_held_list_is_approved_once_for_the_fleet(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    update = ListUpdate(parse_list(big_list(12), "l.yaml"), "l.yaml", "2")
    await a.e.lists.on_list(update)
    assert a.e.lists.held is not None
    result = await a.e.lists.approve("root", "the new export is right")
    assert isinstance(result, Outcome), result
    assert a.mode("C-12") is Mode.WALLED_GARDEN
    # B reads the same list (its own fetch, another order) after the fleet approved it: applied, not held
    reordered = ListUpdate(list(reversed(parse_list(big_list(12), "l.yaml"))), "l.yaml", "other-fingerprint")
    await until(lambda: b.e.lists.verdicts != {})
    await b.e.lists.on_list(reordered)
    assert b.e.lists.held is None and b.mode("C-12") is Mode.WALLED_GARDEN
    rows = b.e.queries.audit("(list)", None, 5)
    assert len(rows) == 1 and rows[0]["new"] == "approved" and "root via gw-a" in rows[0]["cause"], rows


async def test_a_malformed_message_changes_nothing_and_the_next_applies(
        fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    assert a.e.fleet is not None and a.e.fleet.link.js is not None
    js = a.e.fleet.link.js
    for junk in (b"not json", b'{"v":1,"kind":"event","gateway":"x","at":1,"body":{"id":"e","type":'
                 b'"subscriber.restricted","timestamp":1,"subscriber_id":"C-2","subscriber":null}}',
                 b'{"v":1,"kind":"exempt","gateway":"x","at":1,"body":{"subscriber":"C-2"}}'):
        await js.publish(subject("WG_TEST"), junk, stream="WG_TEST")
    result = await a.event(PAYMENT, "C-2", "evt-after-junk")
    assert isinstance(result, Outcome) and result.body["mode"] == "free", result
    await until(lambda: b.mode("C-2") is Mode.FREE)
    for gw in (a, b):
        assert gw.e.metrics.fleet_applied.labels("-", "malformed")._value.get() == 3
        assert "C-2" not in gw.e.engine.inputs.exemptions


async def test_a_kernel_failure_holds_the_order_until_it_succeeds(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    fake = b.e.engine.reconciler.dataplane
    assert isinstance(fake, FakeDataplane)
    fake.fail_next = "injected: netlink busy"
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-k1"), Outcome)
    assert isinstance(await a.event(PAYMENT, "C-2", "evt-k2"), Outcome)
    await until(lambda: b.mode("C-1") is Mode.FREE and b.mode("C-2") is Mode.FREE, 10)
    assert b.e.metrics.fleet_apply_retries._value.get() >= 1
    assert b.e.fleet is not None and a.e.fleet is not None
    # the position moves once the applied batch's bookkeeping is done, a moment after the kernel
    await until(lambda: b.e.fleet is not None and a.e.fleet is not None
                and b.e.fleet.applier.applied == a.e.fleet.applier.applied == 2, 10)


async def test_a_gateway_joining_later_rebuilds_from_the_stream(
        fleet: tuple[NatsServer, Gateway, Gateway], tmp_path: Path) -> None:
    server, a, _ = fleet
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-before-c"), Outcome)
    assert isinstance(await a.e.operator.exempt("root", "C-2", "outage", time.time() + 3600, "storm"), Outcome)
    c = Gateway(tmp_path, "gw-c", server.url)
    try:
        await c.start()
        assert c.mode("C-1") is Mode.FREE and c.mode("C-2") is Mode.FREE
        assert c.e.references.code("C-1") == a.e.references.code("C-1")   # the fleet's key
    finally:
        await c.close()


async def test_metrics_carry_the_gateway_label(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    from prometheus_client import generate_latest

    from enforcer.api.scrape import Labelled

    _, a, _ = fleet
    text = generate_latest(Labelled(a.e.metrics.registry, a.e.metrics.constant_labels)).decode()  # type: ignore[arg-type]
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all('gateway="gw-a"' in line for line in samples), samples[:5]
    assert any(line.startswith("walled_garden_fleet_applied_sequence{") for line in samples)


def lease(key: str, mac: str = "02:00:00:00:00:03") -> Session:
    return Session("dnsmasq", key, Match(mac=mac), (ip_network(key),))


def walled(gw: Gateway, address: str) -> bool:
    decision = gw.e.engine.decisions.get("C-3")
    return decision is not None and decision.restricted and ip_network(address) in decision.subscriber.addresses


async def test_sessions_of_one_gateway_reach_the_other(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    await a.e.session_sink.replace("dnsmasq", [lease("100.64.3.1"), lease("100.64.3.2", "02:00:00:00:00:99")])
    assert walled(a, "100.64.3.1")
    await until(lambda: walled(b, "100.64.3.1"))
    assert set(b.e.engine.inputs.sessions.of_source("gw-a/dnsmasq")) == {"100.64.3.1", "100.64.3.2"}
    published = a.e.metrics.fleet_published.labels("accepted")._value.get()
    await a.e.session_sink.replace("dnsmasq", [lease("100.64.3.1"), lease("100.64.3.2", "02:00:00:00:00:99")])
    assert a.e.metrics.fleet_published.labels("accepted")._value.get() == published   # the same set: nothing
    await a.e.session_sink.replace("dnsmasq", [lease("100.64.3.5"), lease("100.64.3.2", "02:00:00:00:00:99")])
    assert a.e.metrics.fleet_published.labels("accepted")._value.get() == published + 1   # only the difference
    assert a.e.metrics.session_changes.labels("gw-a/dnsmasq", "started")._value.get() == 3
    await until(lambda: walled(b, "100.64.3.5") and not walled(b, "100.64.3.1"))
    # B's own dnsmasq never ends A's leases: sources are named by gateway
    await b.e.session_sink.replace("dnsmasq", [])
    await until(lambda: a.e.engine.inputs.sessions.of_source("gw-a/dnsmasq") != {} and walled(a, "100.64.3.5"))
    assert set(a.e.engine.inputs.sessions.of_source("gw-a/dnsmasq")) == {"100.64.3.5", "100.64.3.2"}


async def test_a_session_from_the_cli_travels(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    event = Event("cli-1", SESSION_STARTED, time.time(), "", match=Match(mac="02:00:00:00:00:03"),
                  addresses=(ip_network("100.64.3.9/32"),))
    result = await a.e.session_sink.handle_event(event, CLI_SOURCE)
    assert isinstance(result, Outcome), result
    await until(lambda: walled(b, "100.64.3.9"))
    assert "100.64.3.9" in b.e.engine.inputs.sessions.of_source("gw-a/cli")


async def test_sessions_cannot_be_published_without_nats(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    server, a, _ = fleet
    server.stop()
    with pytest.raises(SessionChangeFailed):
        await a.e.session_sink.update("radius", [lease("100.64.3.7")])
    assert not walled(a, "100.64.3.7")


async def test_an_operator_restriction_uses_each_gateways_own_list(
        fleet: tuple[NatsServer, Gateway, Gateway], tmp_path: Path) -> None:
    """Behind gateway B, C-1 has another address: an operator's restrict on A walls it there."""
    _, a, b = fleet
    other = LIST.replace("100.64.0.10", "100.64.9.10")
    await b.e.lists.on_list(ListUpdate(parse_list(other, "l.yaml"), "l.yaml", "b"))
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-free-1"), Outcome)
    await until(lambda: b.mode("C-1") is Mode.FREE)
    result = await a.e.operator.change("root", "C-1", True, "fraud check")
    assert isinstance(result, Outcome) and result.body["mode"] == "walled-garden", result
    await until(lambda: b.mode("C-1") is Mode.WALLED_GARDEN)
    held = b.e.engine.decisions["C-1"].subscriber
    assert held is not None and [str(n) for n in held.addresses] == ["100.64.9.10/32"]
    assert any("operator root via gw-a" in row["cause"] for row in b.e.queries.audit("C-1", None, 10))


async def test_an_event_this_gateway_refuses_is_never_published(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, _ = fleet
    bad = Event("evt-outside", SESSION_STARTED, time.time(), "C-1", addresses=(ip_network("0.0.0.0/0"),))
    result = await asyncio.wait_for(a.e.sink.submit(bad, time.perf_counter()), 10)
    assert isinstance(result, Refusal) and result.kind is Refused.INVALID, result
    assert a.e.metrics.fleet_published.labels("accepted")._value.get() == 0


async def test_two_gateways_sharing_a_name_are_told(fleet: tuple[NatsServer, Gateway, Gateway],
                                                     tmp_path: Path) -> None:
    server, a, _ = fleet
    twin = Gateway(tmp_path / "twin", "gw-a", server.url)
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / "l.yaml").write_text(LIST)
    try:
        await twin.start(wait=False)
        await until(lambda: "two gateways share a name" in (twin.e.queries.status()["fleet"]["error"] or "")
                    and "two gateways share a name" in (a.e.queries.status()["fleet"]["error"] or ""), 12)
    finally:
        await twin.close()


async def test_start_goes_on_at_once_when_nats_is_unreachable(tmp_path: Path) -> None:
    """Safety rule 6: the unit starts before the network; it must not wait for NATS."""
    (tmp_path / "l.yaml").write_text(LIST)
    gw = Gateway(tmp_path, "gw-alone", "nats://127.0.0.1:9")   # the discard port: nothing listens
    try:
        await gw.start(wait=False)
        assert gw.e.fleet is not None
        started = time.monotonic()
        assert await gw.e.fleet.caught_up(20) is False
        assert time.monotonic() - started < 8
        assert "cannot connect" in gw.e.queries.status()["fleet"]["error"]
        assert gw.mode("C-1") is Mode.WALLED_GARDEN   # enforcing what it has
    finally:
        await gw.close()


async def test_a_stream_of_that_name_for_other_subjects_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "l.yaml").write_text(LIST)
    server = NatsServer(tmp_path / "nats")
    server.start()
    gw = Gateway(tmp_path, "gw-a", server.url)
    try:
        import nats

        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(name="WG_TEST", subjects=["someone.else"])
        await nc.close()
        await gw.start(wait=False)
        assert gw.e.fleet is not None and await gw.e.fleet.caught_up(5) is False
        await until(lambda: "not a walled-garden stream" in (gw.e.queries.status()["fleet"]["error"] or ""))
    finally:
        try:
            await gw.close()
        finally:
            server.stop()


async def test_list_verdicts_are_audited(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    await a.e.lists.on_list(ListUpdate(parse_list(big_list(12), "l.yaml"), "l.yaml", "2"))
    await b.e.lists.on_list(ListUpdate(parse_list(big_list(12), "l.yaml"), "l.yaml", "2"))
    assert isinstance(await b.e.lists.reject("root", "export looks wrong"), Outcome)
    await until(lambda: a.e.lists.held is None)
    for gw in (a, b):
        rows = gw.e.queries.audit("(list)", None, 5)
        assert len(rows) == 1 and rows[0]["new"] == "rejected" and "root via gw-b" in rows[0]["cause"], rows


# -- regressions found by review -------------------------------------------------------------------
async def test_a_retry_of_an_old_sequence_is_weighed_by_the_fleet_not_here_alone(
        fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    """C-9's restriction conflicts with C-1's address; A restarts (its answers gone); C-1 pays;
    billing retries C-9 with the same id: every gateway weighs the retry again, alike."""
    _, a, b = fleet
    entry = Subscriber("C-9", (ip_network("100.64.0.10/32"),))
    first = await a.event(RESTRICTED, "C-9", "evt-c9", subscriber=entry)
    assert isinstance(first, Refusal) and first.kind is Refused.CONFLICT, first
    await a.close()
    await a.start()
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-pay-c1"), Outcome)
    await until(lambda: b.mode("C-1") is Mode.FREE)
    retry = await a.event(RESTRICTED, "C-9", "evt-c9", subscriber=entry)
    await until(lambda: a.e.fleet is not None and b.e.fleet is not None
                and a.e.fleet.applier.applied == b.e.fleet.applier.applied)
    assert a.mode("C-9") == b.mode("C-9"), (retry, a.mode("C-9"), b.mode("C-9"))


async def test_a_stream_created_anew_is_followed_from_its_start(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    server, a, b = fleet
    for n in range(3):
        assert isinstance(await a.event(PAYMENT, "C-2", f"evt-w{n}"), Outcome)
    await until(lambda: b.e.fleet is not None and b.e.fleet.applier.applied == 3)
    server.stop()
    shutil.rmtree(server.workdir / "store")   # the NATS store lost: the stream comes back empty
    server.start()
    deadline, result = time.monotonic() + 40, None
    while time.monotonic() < deadline:
        result = await a.event(PAYMENT, "C-1", "evt-after-wipe")
        if isinstance(result, Outcome):
            break
        await asyncio.sleep(0.5)
    assert isinstance(result, Outcome) and result.body["id"] == "evt-after-wipe", result
    await until(lambda: a.mode("C-1") is Mode.FREE and b.mode("C-1") is Mode.FREE, 15)
    assert a.e.metrics.fleet_applied.labels("-", "stream_replaced")._value.get() == 1


async def test_a_consumer_deleted_under_a_gateway_is_made_again(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    import nats

    server, a, b = fleet
    nc = await nats.connect(server.url)
    await nc.jetstream().delete_consumer("WG_TEST", "gw-b")   # `nats consumer rm`, or a twin's start
    await nc.close()
    assert isinstance(await a.event(PAYMENT, "C-1", "evt-after-del"), Outcome)
    await until(lambda: b.mode("C-1") is Mode.FREE, 20)


async def test_instants_out_of_range_never_stall_the_fleet(fleet: tuple[NatsServer, Gateway, Gateway]) -> None:
    _, a, b = fleet
    assert a.e.fleet is not None and a.e.fleet.link.js is not None
    js = a.e.fleet.link.js
    for junk in (b'{"v":1,"kind":"exempt","gateway":"x","at":1,"body":{"actor":"r","subscriber":"C-2",'
                 b'"category":"other","until":1e20,"note":""}}',
                 b'{"v":1,"kind":"event","gateway":"x","at":1,"body":{"id":"e9","type":"payment.received",'
                 b'"timestamp":NaN,"subscriber_id":"C-2"}}'):
        await js.publish(subject("WG_TEST"), junk, stream="WG_TEST")
    assert isinstance(await a.event(PAYMENT, "C-2", "evt-after-poison"), Outcome)
    await until(lambda: b.mode("C-2") is Mode.FREE)
    assert "C-2" not in b.e.engine.inputs.exemptions
