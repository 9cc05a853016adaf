"""A model-based chaos test of the whole enforcer (docs/reference.md, Safety rules).

Random sequences of list edits (valid and invalid), billing events of every type with billing's
clock skewed up to ±300 s, retries and late deliveries, operator actions, clocks passing and
stepping, restarts (a clean stop, a SIGKILL, a reboot), kernel transaction failures, SQLite
write failures and the table deleted by another tool drive the real ``Enforcer``. After every
step the safety invariants are checked:

1. the kernel holds exactly what the policy decides from the *persisted* inputs (a fresh
   ``Store`` over the state directory), except for what ``status`` reports (address
   conflicts) and what the daemon knows it must repair (``reconciler.needs_full``: the next
   timer round repairs it, so the check runs that round and looks again);
2. every payment answered 200 "applied" keeps its subscriber free until its grace ends, as
   lived (not as the wall clock says), unless an operator restricted them afterwards or
   billing sent a restriction stamped strictly later that was applied afterwards;
3. nothing raises out of the daemon, and the timer round keeps working.

The machine is backend-neutral: ``Backend`` makes the dataplane, reads what it enforces,
deletes the table behind the daemon's back and makes the next transaction fail. The unit
test drives it over ``FakeDataplane``; the kernel test over nftables in a private namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from daemon_helpers import exempt, handle_event, operator_change, submit_event, unexempt
from enforcer.config import Config, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.layout import MODE_PREFIX, MODE_VERDICTS, SENTINELS, mode_map, with_mode_view
from enforcer.dataplane.state import TableState
from enforcer.engine import policy_rules
from enforcer.events import PAYMENT, RELEASED, RESTRICTED, Event
from enforcer.policy import Decision
from enforcer.receipt_clock import STEP_THRESHOLD
from enforcer.sources import ListUpdate, SourceFailure
from enforcer.store import Store
from enforcer.subscribers import ListError, Mode, parse_list

#: Billing's clock runs up to this far from true time (the signature tolerance).
SKEW = 300.0
GRACE = 600.0
START = 1_795_000_000.0   # 2026-11-18
SIDS = ("C-1", "C-2", "C-3", "C-4", "C-5")
MODES = (Mode.WALLED_GARDEN, Mode.NOTICE, Mode.THROTTLE)
_SENTINEL_KEYS = frozenset(SENTINELS.values())




def addresses(sid: str, moved_to: str | None = None) -> list[str]:
    """A subscriber's own IPv4 address and IPv6 /64; ``moved_to`` takes another's IPv4 address
    instead (billing reassigned it: the daemon must refuse or hold the overlap, never wall both)."""
    n = int(sid.split("-")[1])
    return [f"100.64.0.{int(moved_to.split('-')[1]) if moved_to else n}", f"2001:db8:0:{n}::/64"]


class Backend(Protocol):
    """What the machine needs from a dataplane under test."""

    def make(self) -> Any: ...                         # a fresh dataplane (a boot)
    def read(self, dataplane: Any) -> TableState | None: ...
    def drop_table(self, dataplane: Any) -> None: ...  # another tool deletes our table
    def fail_next(self, dataplane: Any, message: str) -> None: ...


class SigKill(BaseException):
    """The process dies here (raised from ``Store.write_fault``; nothing catches it)."""


class NoConntrack:
    async def flush(self, networks: Any, keep_mark: int = 0) -> int:
        return 0


@dataclass
class Clocks:
    """True time (as lived), the gateway's wall clock (true + steps) and its monotonic clock
    (reset by a reboot)."""

    true: float = START
    offset: float = 0.0
    mono: float = 1000.0

    @property
    def wall(self) -> float:
        return self.true + self.offset

    def pass_(self, seconds: float) -> None:
        self.true += seconds
        self.mono += seconds


@dataclass
class Sent:
    """An event billing (or an operator) sent, with what it was answered."""

    event: Event
    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Paid:
    """A payment answered 200 applied: free until ``until`` (true time) unless ``voided``."""

    sid: str
    ts: float          # billing's timestamp
    until: float       # true time
    answered: dict[str, Any] = field(default_factory=dict)
    voided: str = ""


def kernel_modes(state: TableState | None) -> dict[tuple[str, str], str]:
    """(mode map, key) → verdict of every subscriber element the table holds."""
    view = with_mode_view(state)
    if view is None:
        return {}
    return {(name, key): verdict for name, items in view.elements.items() if name.startswith(MODE_PREFIX)
            for key, verdict in items.items() if key not in _SENTINEL_KEYS}


def expected_modes(decisions: dict[str, Decision]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for decision in decisions.values():
        if decision.restricted and decision.subscriber is not None:
            for net in decision.subscriber.addresses:
                out[(mode_map(net.version, net.prefixlen), str(net.network_address))] = MODE_VERDICTS[decision.mode]
    return out


def owners(decisions: dict[str, Decision]) -> dict[tuple[str, str], str]:
    out = {}
    for sid, decision in decisions.items():
        if decision.restricted and decision.subscriber is not None:
            for net in decision.subscriber.addresses:
                out[(mode_map(net.version, net.prefixlen), str(net.network_address))] = sid
    return out


def list_text(entries: dict[str, tuple[Mode, str | None]]) -> str:
    return json.dumps({"subscribers": [{"id": sid, "addresses": addresses(sid, moved), "mode": mode.value,
                                        "reason": "overdue"} for sid, (mode, moved) in sorted(entries.items())]})


#: Lists the source refuses whole (the daemon must keep the list in force and change nothing).
INVALID_LISTS = (
    "",                                                     # a truncated export
    '{"subscribers": [{"id": "C-1", "addresses": ["127.0.0.1"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"]}, {"id": "C-1", "addresses": ["100.64.0.2"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.0/24"]}, {"id": "C-2", "addresses": ["100.64.0.2"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"], "exempt_until": "9999-12-31"}]}',
    "[" * 100_000,
    "subscribers:\n  - id: C-1\n    addresses: [100.64.0.1\n",
)


def make_config(tmp: Path) -> Config:
    return parse_config(
        f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/list.json}}\n"
        f"gateway: {{subscriber_prefixes: ['100.64.0.0/10', '2001:db8::/32']}}\n"
        f"policy: {{payment_grace: {int(GRACE)}}}\n", str(tmp / "config.yaml"))


class ChaosMachine(RuleBasedStateMachine):
    """Subclasses set ``backend`` and ``tmp_factory``."""

    backend: Backend
    tmp_factory: Callable[[], Path]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = self.tmp_factory()
        self.config = make_config(self.tmp)
        self.clocks = Clocks()
        self.dataplane = self.backend.make()
        self.enforcer: Enforcer | None = None
        self.entries: dict[str, tuple[Mode, str | None]] = {}
        self.source_text = ""           # what the list file holds now (maybe invalid)
        self.sent: list[Sent] = []
        self.delayed: list[Event] = []  # sent by billing, not delivered yet
        self.paid: list[Paid] = []
        self.serial = 0
        self.log: list[str] = []        # the steps, for a failure report
        self.store_fault_armed = False
        self.unsaved: set[str] = set()       # sids whose batch was answered 503 "state could not be saved"
        self.task_failures: list[str] = []   # what the supervisor would have restarted a task for

    # -- plumbing -----------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def note(self, text: str) -> None:
        self.log.append(f"[true+{self.clocks.true - START:.0f} wall{self.clocks.offset:+.0f}] {text}")

    def new_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"

    @property
    def e(self) -> Enforcer:
        assert self.enforcer is not None
        return self.enforcer

    def start(self) -> None:
        self.enforcer = Enforcer(self.config, dataplane=self.dataplane, conntrack=NoConntrack(),  # type: ignore[arg-type]
                                 clock=lambda: self.clocks.wall, monotonic=lambda: self.clocks.mono)

        async def restore() -> None:
            for _ in range(5):   # the service retries a failed restore every 2 s
                try:
                    await self.e.engine.restore()
                    return
                except DataplaneError:
                    self.clocks.pass_(2.0)
            raise AssertionError("restore kept failing")
        self.run(restore())
        if self.source_text:
            self.run(self.deliver_source())   # the file source reads the list at start

    async def deliver_source(self) -> None:
        """What ``FileSource`` does with the file's text: parse, then on_list or on_source_failure."""
        try:
            subscribers = parse_list(self.source_text, "list.json", space=None)
        except ListError as exc:
            await self.e.lists.on_source_failure(SourceFailure("list.json", "invalid", str(exc)))
            return
        try:
            await self.e.lists.on_list(ListUpdate(subscribers, "list.json", str(self.serial)))
        except Exception as exc:  # noqa: BLE001 - as sources._hand_over does: reported, recorded, the source goes on
            self.task_failures.append(f"on_list: {type(exc).__name__}: {exc}")
            self.note(f"  on_list raised (the source reports it): {exc}")
            return
        while self.e.lists.unsaved is not None and not self.store_fault_armed:
            # the timer's retry
            await self.e.lists.on_list(self.e.lists.unsaved, approved_by=self.e.lists.unsaved_approval)

    def kill(self) -> None:
        """SIGKILL: nothing of the old process runs any more (its database connection goes
        first, so a cancelled task cannot write), the kernel keeps what it was sent."""
        e = self.e
        self.enforcer = None
        e.engine.store.close()
        for task in list(e.engine._background):
            task.cancel()
        if e.events.batcher._worker is not None:
            e.events.batcher._worker.cancel()
        e.engine._kernel_thread.shutdown(wait=True)

        async def unwind() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
        self.run(unwind())

    def teardown(self) -> None:
        try:
            if self.enforcer is not None:
                self.run(self.enforcer.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- sending --------------------------------------------------------------------------------
    async def deliver(self, event: Event) -> tuple[int, dict[str, Any]]:
        answer = await handle_event(self.e, event, 0.0)
        sent = next((s for s in self.sent if s.event.id == event.id), None)
        if sent is None:
            sent = Sent(event)
            self.sent.append(sent)
        self.note(f"deliver {event.type} {event.id} sid={event.subscriber_id} ts={event.timestamp - START:+.0f} "
                  f"-> {answer[0]} {answer[1].get('result') or answer[1].get('error')} {answer[1].get('mode', '')}")
        self.account(event, answer, first=not any(a[0] == 200 for a in sent.answers))
        self.check_payment_answers()
        first_ok = next((a for a in sent.answers if a[0] == 200), None)
        if first_ok is not None and answer[0] == 200:
            assert answer[1] == first_ok[1], f"a retry of {event.id} got another answer: {first_ok} then {answer}"
        sent.answers.append(answer)
        return answer

    def account(self, event: Event, answer: tuple[int, dict[str, Any]], first: bool) -> None:
        """Update the obligations (invariant 2) with one answer."""
        status, body = answer
        applied = status == 200 and body.get("result") == "applied"
        assert status in (200, 409, 503), f"unexpected answer {answer} to {event}"
        if status == 503 and "could not be saved" in str(body.get("error")):
            self.unsaved.add(event.subscriber_id)
        if not applied or not first:   # a retry answered from the record is no new payment
            return
        sid = event.subscriber_id
        if event.type == PAYMENT and not event.actor:
            self.paid.append(Paid(sid, event.timestamp, self.clocks.true + GRACE, answered=body))
        elif event.type == RESTRICTED:
            for paid in self.paid:
                if paid.sid != sid or paid.voided:
                    continue
                if event.actor:
                    paid.voided = f"operator restriction {event.id}"
                elif event.timestamp > paid.ts:
                    paid.voided = f"billing restriction {event.id} stamped later"

    def check_payment_answers(self) -> None:
        """A payment applied says "free", unless a later restriction in the same batch voided it."""
        for paid in self.paid:
            if paid.answered and not paid.voided:
                assert paid.answered.get("mode") == Mode.FREE.value, f"payment applied but answered {paid.answered}"
                paid.answered = {}

    def timer(self) -> None:
        """One round of ``Enforcer.timers`` under the service's supervisor: a DataplaneError is
        retried after RESYNC_SECONDS, anything else restarts the task (counted), an unsaved
        list is saved again."""
        for _attempt in range(4):
            try:
                self.run(self.e.timers.tick())
            except DataplaneError:
                self.clocks.pass_(2.0)
                continue
            except Exception as exc:  # noqa: BLE001 - as the supervisor does: logged, counted, task restarted
                self.task_failures.append(f"{type(exc).__name__}: {exc}")
                self.note(f"  timers task failed (supervisor restarts it): {exc}")
                self.clocks.pass_(1.0)
                continue
            self.e.engine.changed.clear()
            if self.e.lists.unsaved is not None:
                try:
                    self.run(self.e.lists.on_list(self.e.lists.unsaved, approved_by=self.e.lists.unsaved_approval))
                except Exception as exc:  # noqa: BLE001 - as the supervisor does: recorded, the task goes on
                    self.task_failures.append(f"timers/on_list: {type(exc).__name__}: {exc}")
                    self.note(f"  timers task failed (supervisor restarts it): {exc}")
            if not self.e.engine.reconciler.needs_full:
                return

    def billing_ts(self, skew: float) -> float:
        return self.clocks.true + skew

    # -- rules ----------------------------------------------------------------------------------
    @initialize(listed=st.lists(st.sampled_from(SIDS), max_size=3, unique=True))
    def boot(self, listed: list[str]) -> None:
        """A gateway always has a list source; the first list names a few subscribers."""
        self.entries = {sid: (Mode.WALLED_GARDEN, None) for sid in listed}
        self.source_text = list_text(self.entries)
        self.note(f"boot with list {sorted(listed)}")
        self.start()

    @rule(edits=st.lists(st.tuples(st.sampled_from(SIDS), st.sampled_from((None, *MODES)),
                                   st.sampled_from((None, None, None, *SIDS))), min_size=1, max_size=3))
    def edit_list(self, edits: list[tuple[str, Mode | None, str | None]]) -> None:
        entries = dict(self.entries)
        for sid, mode, moved in edits:
            if mode is None:
                entries.pop(sid, None)
            else:
                entries[sid] = (mode, moved if moved != sid else None)
        text = list_text(entries)
        try:
            parse_list(text, "list.json")
            self.entries = entries
        except ListError:
            pass   # an overlap made it invalid: delivered anyway, must change nothing
        self.source_text = text
        self.note(f"list {sorted(entries.items())}")
        self.run(self.deliver_source())

    @rule(which=st.integers(0, len(INVALID_LISTS) - 1))
    def invalid_list(self, which: int) -> None:
        self.source_text = INVALID_LISTS[which]
        self.note(f"invalid list #{which}")
        self.run(self.deliver_source())

    @rule(kind=st.sampled_from((PAYMENT, PAYMENT, RESTRICTED, RESTRICTED, RELEASED, "dispute.opened",
                                "dispute.closed")),
          sid=st.sampled_from(SIDS), skew=st.floats(-SKEW, SKEW).map(round),
          mode=st.sampled_from(MODES), moved=st.sampled_from((None, None, None, *SIDS)), now=st.booleans())
    def billing_event(self, kind: str, sid: str, skew: float, mode: Mode, moved: str | None, now: bool) -> None:
        subscriber = None
        if kind == RESTRICTED:
            raw = {"id": sid, "addresses": addresses(sid, moved if moved != sid else None), "mode": mode.value,
                   "reason": "overdue"}
            subscriber = parse_list(json.dumps({"subscribers": [raw]}), "event")[0]
        event = Event(self.new_id("evt"), kind, self.billing_ts(skew), sid, subscriber)
        if now:
            self.run(self.deliver(event))
        else:
            self.note(f"billing sends {kind} {event.id} sid={sid} ts={event.timestamp - START:+.0f} (delayed)")
            self.delayed.append(event)

    @precondition(lambda self: self.delayed)
    @rule(data=st.data())
    def deliver_late(self, data: st.DataObject) -> None:
        event = self.delayed.pop(data.draw(st.integers(0, len(self.delayed) - 1)))
        self.run(self.deliver(event))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        sent = self.sent[data.draw(st.integers(0, len(self.sent) - 1))]
        if sent.event.actor:
            return   # the CLI does not retry; an operator acts again
        self.run(self.deliver(sent.event))

    @rule(kinds=st.lists(st.sampled_from((PAYMENT, RESTRICTED, RELEASED)), min_size=2, max_size=4),
          sid=st.sampled_from(SIDS), skews=st.lists(st.integers(-int(SKEW), int(SKEW)), min_size=4, max_size=4))
    def burst(self, kinds: list[str], sid: str, skews: list[int]) -> None:
        """Several events for one subscriber in one batch (billing's retry queue draining)."""
        events = []
        for kind, skew in zip(kinds, skews, strict=False):   # skews: one per possible event
            subscriber = (parse_list(json.dumps({"subscribers": [{"id": sid, "addresses": addresses(sid)}]}),
                                     "event")[0] if kind == RESTRICTED else None)
            events.append(Event(self.new_id("evt"), kind, self.billing_ts(skew), sid, subscriber))

        async def send() -> list[tuple[int, dict[str, Any]]]:
            futures = [submit_event(self.e, ev, 0.0) for ev in events]
            return list(await asyncio.gather(*futures))
        answers = self.run(send())
        for event, answer in zip(events, answers, strict=True):
            self.note(f"burst {event.type} {event.id} sid={sid} ts={event.timestamp - START:+.0f} -> {answer[0]} "
                      f"{answer[1].get('result') or answer[1].get('error')} {answer[1].get('mode', '')}")
            self.sent.append(Sent(event, [answer]))
            self.account(event, answer, first=True)
        self.check_payment_answers()

    @rule(sid=st.sampled_from(SIDS), restrict=st.booleans(), mode=st.sampled_from(MODES))
    def operator(self, sid: str, restrict: bool, mode: Mode) -> None:
        async def act() -> tuple[int, dict[str, Any]]:
            return await operator_change(self.e, "noc", sid, restrict, "chaos", mode=mode.value,
                                                addresses=addresses(sid) if restrict else None)
        status, body = self.run(act())
        self.note(f"operator {'restrict' if restrict else 'lift'} {sid} -> {status} "
                  f"{body.get('result') or body.get('error')}")
        event = Event("op", RESTRICTED if restrict else RELEASED, self.clocks.wall, sid, actor="noc")
        self.account(event, (status, body), first=True)

    @rule(sid=st.sampled_from(SIDS), end=st.booleans(), seconds=st.sampled_from((60.0, 900.0, 7200.0)))
    def exemption(self, sid: str, end: bool, seconds: float) -> None:
        if end:
            status, body = self.run(unexempt(self.e, "noc", sid, None, "chaos"))
        else:
            status, body = self.run(exempt(self.e, "noc", sid, "outage", self.clocks.wall + seconds, "chaos"))
        action = "unexempt" if end else f"exempt {seconds:.0f}s"
        self.note(f"operator {action} {sid} -> {status} {body.get('error', '')}")
        assert status in (200, 404, 409, 503), (status, body)

    @rule(seconds=st.sampled_from((1.0, 30.0, 299.0, 601.0, 3600.0)))
    def time_passes(self, seconds: float) -> None:
        self.clocks.pass_(seconds)
        self.note(f"{seconds:.0f}s pass")
        self.timer()   # the timer wakes at the due instants in between

    @rule(seconds=st.sampled_from((-600.0, -60.0, 120.0, 3600.0, 86400.0)))
    def clock_step(self, seconds: float) -> None:
        self.clocks.offset += seconds
        self.note(f"wall clock steps {seconds:+.0f}s")

    @rule()
    def timer_round(self) -> None:
        self.note("timer round")
        self.timer()

    @rule(how=st.sampled_from(("close", "kill", "reboot")), down=st.sampled_from((0.0, 5.0, 120.0)))
    def restart(self, how: str, down: float) -> None:
        self.note(f"restart: {how}, down {down:.0f}s")
        if how == "close":
            self.run(self.e.close())
            self.enforcer = None
        else:
            self.kill()
        self.clocks.pass_(down)
        if how == "reboot":
            self.dataplane = self.backend.make()
            self.clocks.mono = 10.0
        self.start()

    @rule(kind=st.sampled_from((PAYMENT, RESTRICTED, RELEASED)), sid=st.sampled_from(SIDS),
          skew=st.integers(-int(SKEW), int(SKEW)),
          point=st.sampled_from(("record_state", "save_billing_order", "record_events")))
    def kill_mid_event(self, kind: str, sid: str, skew: int, point: str) -> None:
        """SIGKILL while an event is processed, just before the SQLite write ``point`` (after
        the kernel commit): billing got no answer and retries later."""
        subscriber = (parse_list(json.dumps({"subscribers": [{"id": sid, "addresses": addresses(sid)}]}),
                                 "event")[0] if kind == RESTRICTED else None)
        event = Event(self.new_id("evt"), kind, self.billing_ts(skew), sid, subscriber)
        self.note(f"send {kind} {event.id} sid={sid} ts={skew:+d}, SIGKILL before the write {point}")
        killed: list[str] = []

        def die(name: str) -> None:
            if name == point:
                killed.append(name)
                raise SigKill(name)
        self.e.engine.store.write_fault = die

        async def go() -> asyncio.Future[Any]:
            future = submit_event(self.e, event, 0.0)
            for _ in range(2000):
                if future.done() or killed:
                    break
                await asyncio.sleep(0.001)
            return future
        future = self.run(go())
        if killed and point != "record_state" and kind == RESTRICTED:   # committed, just not answered
            self.account(event, (200, {"result": "applied", "mode": "?"}), first=True)
        if future.done() and not killed:
            self.sent.append(Sent(event, [future.result()]))
            self.account(event, future.result(), first=True)
            self.note(f"  answered before the kill: {future.result()[0]} {future.result()[1].get('result')}")
        else:
            self.delayed.append(event)   # billing retries it later
        self.kill()
        self.start()

    @rule()
    def kernel_failure(self) -> None:
        self.note("the next kernel transaction fails")
        self.backend.fail_next(self.dataplane, "injected: netlink ENOBUFS")

    @rule(op=st.sampled_from(("record_state", "save_list", "save_subscribers", "record_events", "any")))
    def store_failure(self, op: str) -> None:
        self.note(f"the next SQLite write ({op}) fails")
        store = self.e.engine.store

        def fault(name: str) -> None:
            if op in (name, "any"):
                store.write_fault = None
                raise sqlite3.OperationalError("injected: disk I/O error")
        store.write_fault = fault

    @rule()
    def table_deleted(self) -> None:
        self.note("another tool deletes the table")
        self.backend.drop_table(self.dataplane)
        self.run(self.e.health.verify())   # the table check sees it within seconds

    # -- invariants -----------------------------------------------------------------------------
    def unseen_step(self) -> float:
        """How far the wall clock stepped forward since the daemon last looked (``ReceiptClock.step``)."""
        then_wall, then_mono = self.e.engine.receipts._anchor
        return (self.clocks.wall - then_wall) - (self.clocks.mono - then_mono)

    def report(self) -> str:
        return "steps:\n  " + "\n  ".join(self.log[-40:])

    @invariant()
    def kernel_matches_persisted_policy(self) -> None:
        if self.enforcer is None:
            return
        e = self.e
        if e.engine.rebuilding is not None:   # documented: the table is kept as it is until a list arrives
            assert e.queries.status()["rebuilding_from_kernel"]
            return
        if e.engine.changed.is_set():   # an input woke the timers task: it runs a round now
            self.timer()
        if e.engine.reconciler.needs_full:   # the daemon knows; its timer repairs within RESYNC_SECONDS
            self.timer()
        assert not e.engine.reconciler.needs_full, "the repair round did not repair the table\n" + self.report()
        # The instant the daemon decides at: a forward step not yet seen by the daemon has not
        # moved any grace yet (it will, on the next input or timer round).
        jump = self.unseen_step()
        now = self.clocks.wall - jump if jump > STEP_THRESHOLD else self.clocks.wall
        store = Store(str(self.config.state_dir))
        try:
            persisted = store.load_inputs()
        finally:
            store.close()
        persisted.rules = policy_rules(self.config)
        decisions = persisted.decide_all(now)
        in_memory = e.engine.inputs.decide_all(now)
        for sid in e.engine.conflicts:           # reported: the kernel keeps what it enforced
            decisions[sid] = e.engine.reconciler.owned.get(sid) or Decision(sid, Mode.FREE, "")
            in_memory[sid] = decisions[sid]
        kernel = kernel_modes(self.backend.read(self.dataplane))
        want = expected_modes(decisions)
        if kernel != want:
            memory = expected_modes(in_memory)
            who = owners(decisions) | owners(in_memory)
            diff = {k: (kernel.get(k), want.get(k), memory.get(k), who.get(k)) for k in kernel.keys() | want.keys()
                    if kernel.get(k) != want.get(k)}
            raise AssertionError("kernel != policy(persisted inputs); key: (kernel, persisted, in memory, who): "
                                 f"{diff}\nconflicts={e.engine.conflicts}\n" + self.report())

    @invariant()
    def payments_keep_subscribers_free(self) -> None:
        if self.enforcer is None:
            return
        kernel = kernel_modes(self.backend.read(self.dataplane))
        for paid in self.paid:
            if paid.voided or self.clocks.true >= paid.until:
                continue
            held = [k for k in kernel if self._belongs(paid.sid, k)]
            assert not held, (f"{paid.sid} paid (ts {paid.ts - START:+.0f}, answered 200 applied), grace until "
                              f"true+{paid.until - START:.0f}, yet the kernel holds {held}\n" + self.report())

    def _belongs(self, sid: str, key: tuple[str, str]) -> bool:
        """Is this kernel key one of ``sid``'s own addresses (v4 or v6 /64)?"""
        own = {ipaddress.ip_network(a) for a in addresses(sid)}
        name, address = key
        plen = int(name.rsplit("_", 1)[1])
        return (ipaddress.ip_network(f"{address}/{plen}") in own
                and self.e.engine.reconciler.owner_of(name, address) == sid)


def machine_settings() -> dict[str, Any]:
    """Bounded for CI; ``WG_CHAOS_EXAMPLES`` runs longer by hand."""
    return {"max_examples": int(os.environ.get("WG_CHAOS_EXAMPLES", "0")) or None,
            "shrink": not os.environ.get("WG_CHAOS_NO_SHRINK")}
