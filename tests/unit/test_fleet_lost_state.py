"""A gateway of a fleet whose state was lost while its table stayed in the kernel (state_dir wiped,
or the database quarantined): the rebuild from the kernel and the list, then the stream's replay,
must leave it deciding what the fleet decides (SPEC §11: "every gateway decides the same").

The rebuild's graces stand for inputs the lost state knew, received at some unknown earlier time:
they must neither make the replayed inputs count as received now (an old payment's grace, an old
promise's term starting again, so the subscriber is free here while every other gateway walls
them) nor outweigh what the replay brings (a restriction the stream still holds). A gateway
joining with no table at all is the control: what it applies from the stream is as old as it is.

Two gateways (the daemon's parts, fake dataplanes that outlive a restart as the kernel's table
does, one clock the test moves on) and one real nats-server on loopback (``two_gateways``' kind).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from enforcer.config import Config, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, RESTRICTED, Event
from enforcer.match import Match
from enforcer.model import Mode
from enforcer.outcome import Outcome, Result
from enforcer.policy import when
from enforcer.portal_actions import ACKNOWLEDGED, promise_message_id
from enforcer.receipt_clock import ReceiptClock
from enforcer.sessions.session import Session
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address, parse_list
from tests.daemon_helpers import NoConntrack, handle_event
from tests.nats_server import NatsServer, pair_on_nats
from tests.unit.test_fleet_inputs import LIST, until

DAY = 86400.0
GRACE = 3 * DAY          # the default payment grace, written out
TERM = 120.0             # a promise's term: ends well within fleet.NOTIFY_WINDOW (10 minutes)
ACK_FOR = 3600.0         # portal.notice_ack_for
#: The fleet's list: LIST and a notice subscriber (who may press "Continue").
LOST_LIST = LIST + "  - {id: C-4, addresses: [100.64.0.40], mode: notice, reason: overdue}\n"


class Clock:
    """The gateways' wall clock: real time moved on by the test (time passing, not a step: it is
    also each engine's monotonic clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def config(tmp: Path, name: str, url: str) -> Config:
    secret = tmp / "outbox.secret"
    return parse_config(
        f"state_dir: {tmp}/{name}\n"
        f"subscribers: {{source: {tmp}/l.yaml}}\n"
        f"policy: {{payment_grace: {GRACE:.0f}s, promise_to_pay: {{enabled: true, term: {TERM:.0f}s, "
        f"webhook_url: 'http://192.0.2.1/billing', webhook_secret_file: {secret}}}}}\n"
        f"portal: {{notice_ack_for: {ACK_FOR:.0f}s}}\n"
        f"fleet: {{gateway: {name}, nats: {{url: '{url}'}}, stream: WG_LOST, catch_up_timeout: 5s, "
        f"answer_timeout: 3s}}\n", str(tmp / f"{name}.yaml"))


class Gateway:
    """A gateway whose dataplane (the kernel's table) outlives its daemon; ``wipe`` loses its state."""

    def __init__(self, tmp: Path, name: str, url: str, clock: Clock) -> None:
        self.tmp, self.name, self.url, self.clock = tmp, name, url, clock
        self.kernel = FakeDataplane()
        self.enforcer: Enforcer | None = None
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def e(self) -> Enforcer:
        assert self.enforcer is not None
        return self.enforcer

    async def start(self, before_catch_up: Callable[[Gateway], Awaitable[None]] | None = None) -> None:
        """What ``walled-garden run`` does, in its order: restore, the first list (a rebuild when
        the state was lost), ``before_catch_up`` (what the session sources and the timers, started
        before it, may do), then the fleet's catch-up."""
        self.enforcer = Enforcer(config(self.tmp, self.name, self.url), dataplane=self.kernel,
                                 conntrack=NoConntrack(), clock=self.clock)
        await self.e.engine.restore()
        await self.e.lists.on_list(ListUpdate(parse_list(LOST_LIST, "l.yaml"), "l.yaml", "1"))
        if before_catch_up is not None:
            await before_catch_up(self)
        self.stop = asyncio.Event()
        assert self.e.fleet is not None
        self.task = asyncio.create_task(self.e.fleet.run(self.stop))
        assert await self.e.fleet.caught_up(10), self.e.fleet.error

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            done, _ = await asyncio.wait({self.task}, timeout=10)
            assert done, "fleet task did not end"
            self.task = None
        if self.enforcer is not None:
            await self.enforcer.close()
        self.enforcer = None

    def wipe(self) -> None:
        """The state directory gone (the table stays in ``kernel``)."""
        shutil.rmtree(self.tmp / self.name)

    def mode(self, sid: str) -> Mode:
        decision = self.e.engine.decisions.get(sid)
        return decision.mode if decision else Mode.FREE

    def walled(self) -> set[str]:
        """The IPv4 addresses the kernel walls in."""
        return set(self.kernel.view.get("mode4_32", ()))

    async def event(self, kind: str, sid: str, event_id: str, **kw: Any) -> Result:
        event = Event(event_id, kind, self.clock(), sid, **kw)
        return await asyncio.wait_for(self.e.sink.submit(event, time.perf_counter()), 10)

    async def tick(self) -> None:
        """A timer round (graces and promises that ended)."""
        await self.e.timers.tick()


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, Gateway, Gateway, Clock]]:
    """A nats-server of this test's own and gateways gw-a and gw-b on it, all stopped after."""
    (tmp_path / "l.yaml").write_text(LOST_LIST)
    (tmp_path / "outbox.secret").write_text("whsec_" + "a2V5LWZvci10aGUtcHJvbWlzZS1vdXRib3gtdGVzdHM=\n")
    (tmp_path / "outbox.secret").chmod(0o600)
    clock = Clock()
    async with pair_on_nats(tmp_path, lambda name, url: Gateway(tmp_path, name, url, clock)) as (server, a, b):
        yield server, a, b, clock


async def restart_wiped(gateway: Gateway, before_catch_up: Callable[[Gateway], Awaitable[None]] | None = None
                        ) -> None:
    """Stop ``gateway``, lose its state, start it again over the same kernel table: it rebuilds."""
    await gateway.close()
    gateway.wipe()
    await gateway.start(before_catch_up)
    assert gateway.e.engine.rebuilt is not None, "the rebuild from the kernel ran"


def lease(address: str, mac: str, expires: float | None = None, source: str = "dnsmasq") -> Session:
    return Session(source, address, Match(mac=mac), (ip_network(address),), expires=expires, detail=f"lease {address}")


async def test_a_wiped_gateway_does_not_give_an_old_payment_a_fresh_grace(tmp_path: Path) -> None:
    """The audit's repro: paid on A, the grace over, both wall again; B loses its state and
    rebuilds, then replays the payment: its grace is as old as it is on A (it walls, as A does),
    not given in full again from B's restart."""
    async with fleet(tmp_path) as (server, a, b, clock):
        assert isinstance(await a.event(PAYMENT, "C-1", "evt-old-pay"), Outcome)
        await until(lambda: b.mode("C-1") is Mode.FREE)
        paid_at = a.e.engine.inputs.graces["C-1"].paid_at
        clock.offset += GRACE + DAY                   # the grace is long over
        for gateway in (a, b):
            await gateway.tick()
            assert gateway.mode("C-1") is Mode.WALLED_GARDEN and "100.64.0.10" in gateway.walled(), gateway.name

        await restart_wiped(b)
        grace = b.e.engine.inputs.graces.get("C-1")
        assert grace is not None and abs(grace.paid_at - paid_at) < 1.0, (grace, paid_at, clock())
        assert b.mode("C-1") is Mode.WALLED_GARDEN, b.e.queries.explain("C-1")
        assert "100.64.0.10" in b.walled()
        await b.tick()
        assert b.mode("C-1") is Mode.WALLED_GARDEN and b.e.queries.explain("C-1")["mode"] == a.mode("C-1").value

        # The control: a gateway joining with no table at all replays the same stream the same way.
        c = Gateway(tmp_path, "gw-c", server.url, clock)
        try:
            await c.start()
            assert c.e.engine.rebuilt is None
            assert c.mode("C-1") is Mode.WALLED_GARDEN
            joined = c.e.engine.inputs.graces.get("C-1")
            assert joined is not None and grace is not None and joined.paid_at == grace.paid_at
        finally:
            await c.close()


async def test_a_wiped_gateway_does_not_restart_an_old_promise(tmp_path: Path) -> None:
    """A promise made on B's portal, its term over, B wiped within the ten minutes in which B
    still tells billing of a promise it replays: the replayed promise keeps its own instant (B
    walls, as A does), and whatever B sends billing again names that promise, not a new one."""
    async with fleet(tmp_path) as (_, a, b, clock):
        made = clock()
        result = await b.e.portal.promise("100.64.0.10")
        assert isinstance(result, Outcome) and result.body["promised"] is True, result
        await until(lambda: a.mode("C-1") is Mode.FREE)
        promise = b.e.engine.inputs.promise("C-1")
        assert promise is not None and abs(promise.made_at - made) < 2.0
        clock.offset += TERM + 60                      # over, and still within fleet.NOTIFY_WINDOW
        for gateway in (a, b):
            await gateway.tick()
            assert gateway.mode("C-1") is Mode.WALLED_GARDEN, gateway.name
        sent = {message for message, _, body, _ in b.e.engine.store.outbox_due(clock() + 1)
                if body["type"] == "promise.made"}
        assert len(sent) == 1, sent

        await restart_wiped(b)
        replayed = b.e.engine.inputs.promise("C-1")
        assert replayed is not None and replayed.made_at == promise.made_at and replayed.until == promise.until, \
            (replayed, promise)
        # B lost its outbox with its state: it may tell billing again, but of the promise made then.
        told = [body for _, _, body, _ in b.e.engine.store.outbox_due(clock() + 1) if body["type"] == "promise.made"]
        again = {message for message, _, body, _ in b.e.engine.store.outbox_due(clock() + 1)
                 if body["type"] == "promise.made"}
        assert again <= sent, ("billing must be able to tell the promise it has by its webhook-id", again, sent)
        assert all(body["timestamp"] == when(promise.made_at) and body["data"]["until"] == when(promise.until)
                   for body in told), (told, promise)
        assert b.mode("C-1") is Mode.WALLED_GARDEN and "100.64.0.10" in b.walled(), b.e.queries.explain("C-1")


async def test_a_restriction_the_stream_holds_outweighs_the_rebuilds_grace(tmp_path: Path) -> None:
    """The rebuild keeps free a listed subscriber the kernel held free (a grace for a reason the lost
    state knew); an input the stream holds about them is newer than that guess, whenever it was
    received: a billing restriction B missed while it was down walls them on B too."""
    async with fleet(tmp_path) as (_, a, b, _clock):
        assert isinstance(await a.e.operator.change("root", "C-2", False, "called support"), Outcome)
        await until(lambda: b.mode("C-2") is Mode.FREE)
        await b.close()                                 # B is down: the restriction reaches A only
        owes = Subscriber("C-2", (parse_address("100.64.0.20"),), Mode.WALLED_GARDEN, "overdue")
        assert isinstance(await a.event(RESTRICTED, "C-2", "evt-missed", subscriber=owes), Outcome)
        assert a.mode("C-2") is Mode.WALLED_GARDEN
        assert "100.64.0.20" not in b.walled()          # B's table: still free when it went down

        b.wipe()
        await b.start()
        assert b.e.engine.rebuilt is not None
        kept = b.e.engine.inputs.graces.get("C-2")
        assert kept is not None and kept.cause.startswith("rebuilt after the state was lost"), kept
        assert b.mode("C-2") is Mode.WALLED_GARDEN and "100.64.0.20" in b.walled(), b.e.queries.explain("C-2")


async def test_a_rebuild_takes_no_receipt_instant(tmp_path: Path) -> None:
    """Without a fleet: the rebuild's graces are ordered before any later input but leave the
    receipt floor where it was, so an input received later with an older instant (what a fleet's
    replay hands in) keeps it; its grace ends when it would have anyway."""
    now = 1_795_000_000.0
    clock = [now]
    kernel = FakeDataplane()
    conf = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        f"policy: {{payment_grace: {GRACE:.0f}s}}\n", str(tmp_path / "c.yaml"))
    listed = [Subscriber(sid, (parse_address(addr),), Mode.WALLED_GARDEN, "overdue")
              for sid, addr in (("C-1", "100.64.0.10"), ("C-2", "100.64.0.20"))]

    async def started() -> Enforcer:
        e = Enforcer(conf, dataplane=kernel, conntrack=NoConntrack(), clock=lambda: clock[0])
        await e.engine.restore()
        return e

    e = await started()
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    status, _ = await handle_event(e, Event("evt-c2", PAYMENT, now, "C-2"))   # free in the kernel
    assert status == 200
    await e.close()
    shutil.rmtree(tmp_path / "state")
    clock[0] = now + 4 * DAY
    e = await started()
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "3"))
    assert e.engine.rebuilt is not None and e.engine.rebuilt["at"] == now + 4 * DAY
    kept = e.engine.inputs.graces["C-2"]
    assert kept.until == now + 4 * DAY + GRACE and e.queries.explain("C-2")["mode"] == "free"
    # A payment received by another gateway four days ago, handed in now (a fleet's replay):
    paid = Event("evt-old", PAYMENT, now, "C-1")
    _, answer = e.events.submit_committed(paid, time.perf_counter(), now)
    assert isinstance(await asyncio.wait_for(answer, 10), Outcome)
    assert e.engine.inputs.graces["C-1"].paid_at == now and e.engine.inputs.graces["C-1"].until == now + GRACE
    assert e.queries.explain("C-1")["mode"] == "walled-garden"
    # A restriction handed in the same way outweighs the rebuild's grace, as any later input does.
    owes = Subscriber("C-2", (parse_address("100.64.0.20"),), Mode.WALLED_GARDEN, "overdue")
    _, answer = e.events.submit_committed(Event("evt-r", RESTRICTED, now + 1, "C-2", owes), time.perf_counter(),
                                          now + 1)
    assert isinstance(await asyncio.wait_for(answer, 10), Outcome)
    assert e.queries.explain("C-2")["mode"] == "walled-garden"
    await e.close()


def test_the_floor_is_read_without_taking_an_instant() -> None:
    """``floor``: every later stamp follows it, reading it moves nothing (``stamp`` does)."""
    receipts = ReceiptClock(lambda: 1000.0, floor=500.0, monotonic=lambda: 0.0)
    assert receipts.floor == 500.0 and receipts.floor == 500.0
    assert receipts.stamp(600.0) == 600.0 and receipts.floor == 600.0
    assert receipts.stamp(550.0) > 600.0   # never backwards: the floor's guarantee stays


# -- nothing taken "now" before or during the catch-up moves the replayed inputs' instants ----------

MAC_9 = "02:00:00:00:00:99"


async def test_a_lease_read_after_the_rebuild_takes_no_receipt_instant(tmp_path: Path) -> None:
    """The review's repro: after the rebuild, the lease file source (started before the fleet's
    catch-up) reads a file that changes nothing; that takes no receipt instant, so a payment of
    four days ago replayed after it keeps its own (its grace over: walled). A lease that does
    start takes one of this gateway's own (now); an old input replayed after it keeps its instant
    all the same (``receipt_clock``: local instants do not floor the stream's)."""
    now = 1_795_000_000.0
    clock = [now]
    kernel = FakeDataplane()
    conf = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        "gateway: {subscriber_prefixes: [100.64.0.0/16]}\n"
                        f"policy: {{payment_grace: {GRACE:.0f}s}}\n", str(tmp_path / "c.yaml"))
    listed = [Subscriber(sid, (parse_address(addr),), Mode.WALLED_GARDEN, "overdue")
              for sid, addr in (("C-1", "100.64.0.10"), ("C-2", "100.64.0.20"), ("C-3", "100.64.0.30"))]

    async def started() -> Enforcer:
        e = Enforcer(conf, dataplane=kernel, conntrack=NoConntrack(), clock=lambda: clock[0])
        await e.engine.restore()
        return e

    async def replayed(event: Event, at: float) -> None:
        _, answer = e.events.submit_committed(event, time.perf_counter(), at)
        assert isinstance(await asyncio.wait_for(answer, 10), Outcome)

    e = await started()
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    await e.close()
    shutil.rmtree(tmp_path / "state")
    clock[0] = now + 4 * DAY
    e = await started()
    try:
        await e.lists.on_list(ListUpdate(listed, "l.yaml", "3"))
        assert e.engine.rebuilt is not None
        receipts = e.engine.receipts
        floor = receipts.floor
        await e.sessions.replace("dnsmasq", [])          # a lease file with nothing new in it
        assert (receipts.floor, receipts.last) == (floor, floor), "a read that changed nothing took an instant"
        await replayed(Event("evt-old", PAYMENT, now, "C-1"), now)
        grace = e.engine.inputs.graces["C-1"]
        assert (grace.paid_at, grace.until) == (now, now + GRACE), grace
        assert e.queries.explain("C-1")["mode"] == "walled-garden"

        await e.sessions.replace("dnsmasq", [lease("100.64.0.99", MAC_9)])   # starts: an instant of its own
        assert receipts.last == now + 4 * DAY
        assert e.engine.inputs.sessions.sessions[("dnsmasq", "100.64.0.99")].seen == now + 4 * DAY
        await replayed(Event("evt-old-3", PAYMENT, now + 1, "C-3"), now + 1)
        grace = e.engine.inputs.graces["C-3"]
        assert (grace.paid_at, grace.until) == (now + 1, now + 1 + GRACE), grace
        assert e.queries.explain("C-3")["mode"] == "walled-garden"
        assert receipts.stamp() > now + 4 * DAY           # and this gateway's own next input follows all
    finally:
        await e.close()


async def test_the_lease_expiry_duty_takes_no_receipt_instant(tmp_path: Path) -> None:
    """The expiry duty (the timers run it before and during a fleet's catch-up) only stops
    sessions: it takes no receipt instant."""
    now = 1_795_000_000.0
    clock = [now]
    conf = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        "gateway: {subscriber_prefixes: [100.64.0.0/16]}\n", str(tmp_path / "c.yaml"))
    e = Enforcer(conf, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda: clock[0])
    try:
        await e.engine.restore()
        await e.lists.on_list(ListUpdate([], "l.yaml", "1"))
        await e.sessions.update("dnsmasq", [lease("100.64.0.99", MAC_9, expires=now + 60)])
        assert e.engine.receipts.last == now
        clock[0] = now + 120
        await e.timers.run_duties()
        assert not e.engine.inputs.sessions.sessions, "the lease ended"
        assert e.engine.receipts.last == now, "the expiry took an instant"
    finally:
        await e.close()


async def test_a_wiped_gateway_replays_an_old_promise_after_a_lease_read(tmp_path: Path) -> None:
    """The review's second repro: B wiped, and before its catch-up a lease read that changes
    nothing and one that starts a lease of its own (anything taken "now" before the replay). The
    replayed promise keeps its instant and term (B walls, as A does), and the promise.made B may
    send billing again carries the webhook-id billing already has."""
    async def lease_reads(gateway: Gateway) -> None:
        intake = gateway.e.sessions
        floor = gateway.e.engine.receipts.floor
        await intake.replace("dnsmasq", [])
        assert gateway.e.engine.receipts.last == floor
        await intake.replace("dnsmasq", [lease("100.64.0.99", MAC_9)])
        assert gateway.e.engine.receipts.last > gateway.clock() - 5, "the lease took an instant of its own: now"

    async with fleet(tmp_path) as (_, a, b, clock):
        result = await b.e.portal.promise("100.64.0.10")
        assert isinstance(result, Outcome) and result.body["promised"] is True, result
        await until(lambda: a.mode("C-1") is Mode.FREE)
        promise = b.e.engine.inputs.promise("C-1")
        assert promise is not None
        clock.offset += TERM + 60                      # over, and still within fleet.NOTIFY_WINDOW
        for gateway in (a, b):
            await gateway.tick()
            assert gateway.mode("C-1") is Mode.WALLED_GARDEN, gateway.name
        sent = {message for message, _, body, _ in b.e.engine.store.outbox_due(clock() + 1)
                if body["type"] == "promise.made"}
        assert sent == {promise_message_id("C-1", promise.made_at)}, sent

        await restart_wiped(b, lease_reads)
        replayed = b.e.engine.inputs.promise("C-1")
        assert replayed is not None and (replayed.made_at, replayed.until) == (promise.made_at, promise.until), \
            (replayed, promise)
        again = {message for message, _, body, _ in b.e.engine.store.outbox_due(clock() + 1)
                 if body["type"] == "promise.made"}
        assert again <= sent, ("billing is told of the promise it has, by its webhook-id", again, sent)
        assert b.mode("C-1") is Mode.WALLED_GARDEN and "100.64.0.10" in b.walled(), b.e.queries.explain("C-1")
        assert a.mode("C-1") is Mode.WALLED_GARDEN


async def test_a_gateway_back_from_down_replays_after_its_leases_expired(tmp_path: Path) -> None:
    """B down (its state kept) while A is paid; B's lease ran out meanwhile. At B's start the
    timers end the lease before the catch-up (service.py starts them first): that takes no
    instant, and the payment replayed after it keeps its own (its grace over: B walls, as A)."""
    async def expire(gateway: Gateway) -> None:
        floor = gateway.e.engine.receipts.last
        assert gateway.e.engine.inputs.sessions.sessions, "B's lease is in its book"
        await gateway.tick()
        await gateway.e.timers.run_duties()
        assert not gateway.e.engine.inputs.sessions.sessions, "the expiry duty ended the lease"
        assert gateway.e.engine.receipts.last == floor, "the expiry took an instant"

    async with fleet(tmp_path) as (_, a, b, clock):
        await b.e.session_sink.update("dnsmasq", [lease("100.64.0.99", MAC_9, expires=clock() + 60)])
        await until(lambda: bool(a.e.engine.inputs.sessions.sessions))
        await b.close()                                 # down; its state stays
        assert isinstance(await a.event(PAYMENT, "C-1", "evt-while-down"), Outcome)
        paid_at = a.e.engine.inputs.graces["C-1"].paid_at
        clock.offset += GRACE + DAY
        await a.tick()
        assert a.mode("C-1") is Mode.WALLED_GARDEN

        await b.start(expire)
        assert b.e.engine.rebuilt is None
        grace = b.e.engine.inputs.graces.get("C-1")
        assert grace is not None and grace.paid_at == paid_at, (grace, paid_at)
        assert b.mode("C-1") is Mode.WALLED_GARDEN and "100.64.0.10" in b.walled(), b.e.queries.explain("C-1")


async def test_an_acknowledgement_replayed_before_an_old_payment(tmp_path: Path) -> None:
    """A notice acknowledged on A's portal lasts until the same instant on every gateway (from
    the instant A received it); B, wiped and replaying it days later, lets nothing through for it
    (it is over, as on A) and the old payment after it keeps its instant (B walls, as A)."""
    acknowledged: list[int] = []

    async def watch_acks(gateway: Gateway) -> None:
        reconciler = gateway.e.engine.reconciler
        kernel_ack = reconciler.acknowledge

        def counted(decision: Any, seconds: int) -> None:
            acknowledged.append(seconds)
            kernel_ack(decision, seconds)

        reconciler.acknowledge = counted   # type: ignore[method-assign]

    async with fleet(tmp_path) as (_, a, b, clock):
        result = await a.e.portal.acknowledge("100.64.0.40")
        assert isinstance(result, Outcome) and result.body["acknowledged"] is True, result
        await until(lambda: "C-4" in b.e.engine.acknowledged)
        assert b.e.engine.acknowledged["C-4"] == a.e.engine.acknowledged["C-4"] == result.body["until"]
        assert isinstance(await a.event(PAYMENT, "C-1", "evt-after-ack"), Outcome)
        await until(lambda: b.mode("C-1") is Mode.FREE)
        paid_at = a.e.engine.inputs.graces["C-1"].paid_at
        clock.offset += GRACE + DAY
        for gateway in (a, b):
            await gateway.tick()
            assert gateway.mode("C-1") is Mode.WALLED_GARDEN, gateway.name

        await restart_wiped(b, watch_acks)
        assert acknowledged == [], "the replayed acknowledgement (over for days) let the subscriber through again"
        assert "C-4" not in b.e.engine.acknowledged
        assert "C-4" not in (b.e.engine.store.get_meta(ACKNOWLEDGED) or {})
        assert b.mode("C-4") is Mode.NOTICE
        grace = b.e.engine.inputs.graces.get("C-1")
        assert grace is not None and grace.paid_at == paid_at, (grace, paid_at)
        assert b.mode("C-1") is Mode.WALLED_GARDEN and "100.64.0.10" in b.walled(), b.e.queries.explain("C-1")
