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
   billing sent a restriction stamped strictly later that was applied afterwards (a forward
   clock step not yet saved when the gateway reboots is lost with the monotonic clock: the
   grace ends that much earlier, as docs/reference.md, Safety rules 3, allows: "on the same boot");
3. nothing raises out of the daemon, and the timer round keeps working;
4. sessions (lease files replaced whole or in part, RADIUS-like start/stop, ``session.*``
   webhook events, addresses handed from one MAC to another, leases running out) are durable
   exactly when their change returned: the persisted and in-memory books hold what the model
   recorded from the changes that returned, and a change that raised ``SessionChangeFailed``
   left the book and the kernel as they were;
5. a session address follows its newest session, the order the model saw the changes commit
   in (not the daemon's ``seen`` stamps): walled exactly when that session's subscriber is
   restricted, so an address re-leased to a MAC on no list (a paying subscriber) is never
   walled. Session addresses (``POOL``) are disjoint from every fixed list address, so no
   list conflict excuses this.

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
from dataclasses import dataclass, field, replace
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
from enforcer.engine import CLOCK_ANCHOR, policy_rules
from enforcer.events import PAYMENT, RELEASED, RESTRICTED, SESSION_STARTED, SESSION_STOPPED, Event, parse_event
from enforcer.match import Match
from enforcer.policy import Decision, PolicyInputs
from enforcer.receipt_clock import STEP_THRESHOLD
from enforcer.sessions.session import Session, SessionId, address_key
from enforcer.sessions.source import SessionChangeFailed
from enforcer.sources import ListUpdate, SourceFailure
from enforcer.store import Store
from enforcer.subscribers import ListError, Mode, parse_address, parse_list

#: Billing's clock runs up to this far from true time (the signature tolerance).
SKEW = 300.0
GRACE = 600.0
START = 1_795_000_000.0   # 2026-11-18
SIDS = ("C-1", "C-2", "C-3", "C-4", "C-5")
MODES = (Mode.WALLED_GARDEN, Mode.NOTICE, Mode.THROTTLE)
_SENTINEL_KEYS = frozenset(SENTINELS.values())
#: Listed by ``match: {mac: ...}`` only: their addresses come from sessions alone.
MAC_ONLY = ("C-4", "C-5")
#: Listed by fixed addresses and a MAC (both count).
WITH_MAC = ("C-3",)
#: MACs on no list: paying subscribers' devices.
PAYING_MACS = ("02:00:00:00:01:01", "02:00:00:00:01:02")
#: Addresses sessions hand out: disjoint from every fixed address (``addresses``: 100.64.0.N,
#: 2001:db8:0:N::/64), so a session address is never also a list address.
POOL = ("100.64.1.1", "100.64.1.2", "100.64.1.3", "2001:db8:1:1::/64", "2001:db8:1:2::/64")
#: Lease lifetimes (seconds from the wall clock; None: no end; negative: already ran out).
LIFETIMES = (None, None, 60.0, 900.0, -10.0)
#: The session sources the machine plays.
LEASES, RADIUS, EVENTS = "dnsmasq", "radius", "event"


def mac_of(sid: str) -> str:
    return f"02:00:00:00:00:0{sid.split('-')[1]}"


MACS = tuple(mac_of(sid) for sid in (*WITH_MAC, *MAC_ONLY)) + PAYING_MACS




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
    (reset by a reboot, which also gives a new boot id)."""

    true: float = START
    offset: float = 0.0
    mono: float = 1000.0
    boot: int = 0

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


def list_entry(sid: str, mode: Mode, moved: str | None) -> dict[str, Any]:
    """Fixed addresses, a MAC, or both (docs/reference.md, Restricted list: every MAC is one
    subscriber's, so match values stay unique)."""
    entry: dict[str, Any] = {"id": sid, "mode": mode.value, "reason": "overdue"}
    if sid not in MAC_ONLY:
        entry["addresses"] = addresses(sid, moved)
    if sid in MAC_ONLY or sid in WITH_MAC:
        entry["match"] = {"mac": mac_of(sid)}
    return entry


def list_text(entries: dict[str, tuple[Mode, str | None]]) -> str:
    return json.dumps({"subscribers": [list_entry(sid, mode, moved) for sid, (mode, moved) in sorted(entries.items())]})


def network_key(address: str) -> tuple[str, str]:
    """The kernel key (mode map, address) of a session address."""
    net = ipaddress.ip_network(address)
    return mode_map(net.version, net.prefixlen), str(net.network_address)


def book_of(sessions: Any) -> dict[SessionId, Session]:
    """A book's sessions by id (``Session`` equality leaves out ``seen`` and ``detail``)."""
    return dict(sessions.sessions)


#: Lists the source refuses whole (the daemon must keep the list in force and change nothing).
INVALID_LISTS = (
    "",                                                     # a truncated export
    '{"subscribers": [{"id": "C-1", "addresses": ["127.0.0.1"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"]}, {"id": "C-1", "addresses": ["100.64.0.2"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.0/24"]}, {"id": "C-2", "addresses": ["100.64.0.2"]}]}',
    '{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"], "exempt_until": "9999-12-31"}]}',
    "[" * 100_000,
    "subscribers:\n  - id: C-1\n    addresses: [100.64.0.1\n",
    '{"subscribers": [{"id": "C-4", "match": {"mac": "02:00:00:00:00:04"}}, '   # one MAC, two subscribers
    '{"id": "C-5", "match": {"mac": "02-00-00-00-00-04"}}]}',
    '{"subscribers": [{"id": "C-4", "match": {}}]}',                          # an export that lost its values
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
        self.committed: set[str] = set()   # events killed after their commit: applied, answered later from the record
        self.paid: list[Paid] = []
        self.serial = 0
        self.log: list[str] = []        # the steps, for a failure report
        self.store_fault_armed = False
        self.unsaved: set[str] = set()       # sids whose batch was answered 503 "state could not be saved"
        self.task_failures: list[str] = []   # what the supervisor would have restarted a task for
        # Sessions whose change returned, with the order the model saw them commit in (invariants 4, 5).
        self.sessions: dict[SessionId, tuple[Session, int]] = {}
        self.event_order: dict[str, float] = {}   # session event key → timestamp of the newest applied
        # Shifts a forward clock step may have applied to a recorded session's end (it is moved
        # when the daemon next reads the clock: either may be persisted).
        self.session_shifts: dict[SessionId, float] = {}

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
                                 clock=lambda: self.clocks.wall, monotonic=lambda: self.clocks.mono,
                                 boot=f"chaos-boot-{self.clocks.boot}")

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
        if self.e.timers._wait() <= 0:        # the timer task's first round, when something is due at once
            self.timer()

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
        for batcher in (e.events.batcher, e.sessions.batcher):
            if batcher._worker is not None:
                batcher._worker.cancel()
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
        self.account(event, answer, first=not any(a[0] == 200 for a in sent.answers) and event.id not in self.committed)
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
            try:   # the timers task's duties after its round: leases that ran out end
                self.run(self.e.timers.run_duties())
            except Exception as exc:  # noqa: BLE001 - as the supervisor does: logged, counted, task restarted
                self.task_failures.append(f"duties: {type(exc).__name__}: {exc}")
                self.note(f"  timers task failed in a duty (supervisor restarts it): {exc}")
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
        if seconds > 0:
            # The daemon moves the ends of sessions still running by the forward step it sees when
            # it next reads the clock (steps in between add up, a step back included): by at most
            # all the forward steps since the session was recorded.
            for ident, (session, _) in self.sessions.items():
                if session.expires is not None:
                    self.session_shifts[ident] = self.session_shifts.get(ident, 0.0) + seconds
        self.clocks.offset += seconds
        self.note(f"wall clock steps {seconds:+.0f}s")

    @rule()
    def timer_round(self) -> None:
        self.note("timer round")
        self.timer()

    @rule(how=st.sampled_from(("close", "kill", "reboot")), down=st.sampled_from((0.0, 5.0, 120.0)))
    def restart(self, how: str, down: float) -> None:
        self.note(f"restart: {how}, down {down:.0f}s")
        if how == "reboot":
            self.step_lost_at_reboot()
        if how == "close":
            self.run(self.e.close())
            self.enforcer = None
        else:
            self.kill()
        self.clocks.pass_(down)
        if how == "reboot":
            self.dataplane = self.backend.make()
            self.clocks.mono = 10.0
            self.clocks.boot += 1
        self.start()

    def step_lost_at_reboot(self) -> None:
        """A forward step of the wall clock that the saved anchor does not account for yet (the
        daemon was idle since, or the save of the moved ends failed) is lost at a reboot: the
        monotonic clock starts again, so the new boot cannot tell the step from time that
        passed. docs/reference.md (Safety rules 3) promises graces across steps while the
        daemon is stopped "on the same boot" only; across a reboot a grace ends that much
        earlier, as lived (``Engine.__init__`` resumes an anchor of the same boot only)."""
        store = Store(str(self.config.state_dir))
        try:
            saved = store.get_meta(CLOCK_ANCHOR)
        finally:
            store.close()
        if not isinstance(saved, dict) or saved.get("boot") != f"chaos-boot-{self.clocks.boot}":
            return
        jump = (self.clocks.wall - float(saved["wall"])) - (self.clocks.mono - float(saved["mono"]))
        if jump <= STEP_THRESHOLD:
            return
        self.note(f"  a forward step of {jump:.0f}s not saved yet is lost at the reboot: graces end that much earlier")
        for paid in self.paid:
            paid.until -= jump

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
        # ``save_billing_order`` is the last write inside ``record_state``'s transaction: a kill there
        # commits nothing; one before ``record_events`` finds state and answer committed. A
        # restriction is counted either way (it only voids payments: the lenient side); a payment
        # only when committed, and then its retry, answered from the record, is no new payment.
        if killed and point != "record_state" and kind == RESTRICTED:
            self.account(event, (200, {"result": "applied", "mode": "?"}), first=True)
        if killed and point == "record_events" and kind == PAYMENT:
            self.committed.add(event.id)
            self.account(event, (200, {"result": "applied", "mode": "free"}), first=True)
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

    # -- sessions -------------------------------------------------------------------------------
    def expires(self, lifetime: float | None) -> float | None:
        return None if lifetime is None else self.clocks.wall + lifetime

    def session(self, source: str, key: str, mac: str, nets: list[str], lifetime: float | None = None,
                subscriber: str = "") -> Session:
        return Session(source, key, Match(mac=mac) if mac else Match(),
                       tuple(parse_address(a) for a in nets), subscriber, self.expires(lifetime))

    def change_sessions(self, what: str, call: Callable[[], Any], started: list[Session], stopped: list[SessionId],
                        replace_source: str | None = None) -> bool:
        """Make one session change the way a source does; record it when it returned (invariant
        4) and check that one which raised ``SessionChangeFailed`` changed nothing."""
        e = self.e
        book_before = book_of(e.engine.inputs.sessions)
        kernel_before = kernel_modes(self.backend.read(self.dataplane))
        try:
            self.run(call())
        except SessionChangeFailed as exc:
            self.note(f"{what} -> SessionChangeFailed: {exc}")
            assert self.same_book(book_of(e.engine.inputs.sessions), book_before), \
                "a failed session change left the book changed\n" + self.report()
            if not e.engine.reconciler.needs_full:   # else the daemon knows, and invariant 1 repairs it
                # Its own addresses are as before. Others may have changed with the clock the change
                # read (an exemption that ran out at a forward step is enforced by the repair that
                # follows the failure): invariant 1 checks those against the persisted policy.
                own = {network_key(str(a)) for s in started for a in s.addresses}
                own |= {network_key(str(a)) for i in stopped if (held := book_before.get(i)) for a in held.addresses}
                kernel = kernel_modes(self.backend.read(self.dataplane))
                changed = {k for k in kernel.keys() | kernel_before.keys() if kernel.get(k) != kernel_before.get(k)}
                assert not changed & own, (f"a failed session change left the kernel changed: {changed & own}\n"
                                           + self.report())
            return False
        self.note(f"{what} -> ok")
        self.record_sessions(started, stopped, replace_source)
        return True

    def record_sessions(self, started: list[Session], stopped: list[SessionId], replace_source: str | None) -> None:
        """What a committed change left (``SessionIntake._change``): a start equal to what is held
        changes nothing (keeps its order); a lease already run out is not started."""
        now = self.clocks.wall
        live = [s for s in started if s.expires is None or s.expires > now]
        gone = list(stopped)
        if replace_source is not None:
            keep = {s.key for s in live}
            gone += [i for i in self.sessions if i[0] == replace_source and i[1] not in keep]
        for session in live:
            held = self.sessions.get(session.id)
            if held is None or not self.same_session(session, held[0], session.id):
                self.serial += 1
                self.sessions[session.id] = (session, self.serial)
                self.session_shifts.pop(session.id, None)
        for ident in gone:
            if ident not in {s.id for s in live}:
                self.sessions.pop(ident, None)

    @rule(leases=st.lists(st.tuples(st.sampled_from(POOL), st.sampled_from(MACS), st.sampled_from(LIFETIMES)),
                          max_size=4, unique_by=lambda t: t[0]),
          complete=st.sampled_from((True, True, True, False)))
    def lease_file(self, leases: list[tuple[str, str, float | None]], complete: bool) -> None:
        """dnsmasq's lease file read: the whole set (or, with unreadable lines, only what was read)."""
        sessions = [self.session(LEASES, address_key(parse_address(a)), mac, [a], life) for a, mac, life in leases]
        shown = [(a, mac[-5:], life) for a, mac, life in leases]
        self.change_sessions(f"leases {'complete' if complete else 'partial'} {shown}",
                             lambda: self.e.sessions.replace(LEASES, sessions, complete=complete),
                             sessions, [], LEASES if complete else None)

    @rule(start=st.booleans(), n=st.integers(1, 3), mac=st.sampled_from(MACS),
          nets=st.lists(st.sampled_from(POOL), min_size=1, max_size=2, unique=True),
          life=st.sampled_from(LIFETIMES))
    def radius(self, start: bool, n: int, mac: str, nets: list[str], life: float | None) -> None:
        """A BNG's accounting: Start/Interim-Update (the session's current addresses) or Stop."""
        key = f"nas1/{n}"
        if start:
            session = self.session(RADIUS, key, mac, nets, life)
            self.change_sessions(f"radius start {key} {mac[-5:]} {nets} life={life}",
                                 lambda: self.e.sessions.update(RADIUS, [session]), [session], [])
        else:
            self.change_sessions(f"radius stop {key}", lambda: self.e.sessions.update(RADIUS, stopped=[key]),
                                 [], [(RADIUS, key)])

    @precondition(lambda self: any(s.match.mac not in PAYING_MACS for s, _ in self.sessions.values()))
    @rule(data=st.data(), mac=st.sampled_from(PAYING_MACS), how=st.sampled_from((LEASES, RADIUS, EVENTS)))
    def handoff(self, data: st.DataObject, mac: str, how: str) -> None:
        """A listed MAC's address is leased again to a MAC on no list (a paying subscriber): by
        the same lease file (the lease changes hands), or by another source while the old
        holder's session lingers (its Stop was lost)."""
        held = sorted((s for s, _ in self.sessions.values() if s.match.mac not in PAYING_MACS),
                      key=lambda s: s.id)
        old = data.draw(st.sampled_from(held))
        address = address_key(old.addresses[0])
        if how == LEASES:
            session = self.session(LEASES, address, mac, [address])
            self.change_sessions(f"handoff {address} from {old.describe()} to {mac[-5:]} by lease",
                                 lambda: self.e.sessions.replace(LEASES, [session], complete=False), [session], [])
        elif how == RADIUS:
            session = self.session(RADIUS, f"nas2/{self.new_id('acct')}", mac, [address])
            self.change_sessions(f"handoff {address} from {old.describe()} to {mac[-5:]} by radius",
                                 lambda: self.e.sessions.update(RADIUS, [session]), [session], [])
        else:
            self.session_event(start=True, mac=mac, sid=None, nets=[address])

    @rule(start=st.booleans(), mac=st.sampled_from((None, *MACS)), sid=st.sampled_from((None, None, *SIDS)),
          nets=st.lists(st.sampled_from(POOL), max_size=2, unique=True), skew=st.sampled_from((0, 0, -90, 90)))
    def session_event(self, start: bool, mac: str | None, sid: str | None, nets: list[str], skew: int = 0) -> None:
        """``session.started``/``session.stopped`` from a BNG script through the signed webhook,
        its clock ``skew`` seconds off: per address, an event older than the last one applied
        there is answered ignored and changes nothing (docs/reference.md, Session events)."""
        if not (mac or sid) or (start and not nets):
            return   # the webhook refuses it with 400 (tests/unit/test_events cover that)
        data: dict[str, Any] = {"addresses": nets}
        if mac:
            data["mac"] = mac
        if sid:
            data["subscriber"] = sid
        kind = SESSION_STARTED if start else SESSION_STOPPED
        event = parse_event(self.new_id("sess"), json.dumps({"type": kind, "timestamp": self.billing_ts(skew),
                                                                "data": data}))
        sessions = [Session(EVENTS, address_key(a), event.match, (a,), event.subscriber_id) for a in event.addresses]
        pattern = Session(EVENTS, "", event.match, (), event.subscriber_id)
        answers: list[tuple[int, dict[str, Any]]] = []

        async def send() -> None:
            answers.append(await handle_event(self.e, event, 0.0))
            if answers[0][0] == 503:
                raise SessionChangeFailed(str(answers[0][1]))
        if start:
            stopped: list[SessionId] = []
        elif sessions:
            stopped = [s.id for s in sessions]
        else:   # no addresses: every session of this source carrying those keys ends
            pairs = set(pattern.pairs())
            stopped = [i for i, (s, _) in self.sessions.items() if i[0] == EVENTS and pairs & set(s.pairs())]

        def fresh(key: str) -> bool:
            return event.timestamp >= self.event_order.get(key, event.timestamp)
        ignored = sorted({s.key for s in sessions if not fresh(s.key)} | {k for _, k in stopped if not fresh(k)})
        sessions = [s for s in sessions if fresh(s.key)]
        stopped = [i for i in stopped if fresh(i[1])]
        what = f"webhook {kind} {event.id} ts={skew:+d} mac={mac and mac[-5:]} subscriber={sid} {nets}"
        if self.change_sessions(what, send, sessions if start else [], stopped):
            assert answers[0][0] == 200, f"{what} answered {answers[0]}\n" + self.report()
            assert answers[0][1].get("ignored", []) == ignored, \
                f"{what} answered {answers[0]}, expected ignored {ignored}\n" + self.report()
            for key in {s.key for s in sessions} | {k for _, k in stopped}:
                self.event_order[key] = event.timestamp

    @precondition(lambda self: any(s.expires is not None for s, _ in self.sessions.values()))
    @rule()
    def leases_run_out(self) -> None:
        """Time passes to just after the next lease's end: the timer ends it."""
        ends = [s.expires for s, _ in self.sessions.values() if s.expires is not None]
        step = max(min(ends) - self.clocks.wall, 0.0) + 1.0
        self.clocks.pass_(step)
        self.note(f"{step:.0f}s pass (a lease runs out)")
        self.timer()

    @rule(leases=st.lists(st.tuples(st.sampled_from(POOL), st.sampled_from(MACS)), min_size=1, max_size=2,
                          unique_by=lambda t: t[0]))
    def kill_mid_session(self, leases: list[tuple[str, str]]) -> None:
        """SIGKILL while a lease file's change is committed, just before its SQLite write (after
        the kernel change): it never returned, so nothing of it may survive the restart."""
        sessions = [self.session(LEASES, address_key(parse_address(a)), mac, [a]) for a, mac in leases]
        self.note(f"leases (partial) {[(a, m[-5:]) for a, m in leases]}, SIGKILL before the write record_state")
        killed: list[str] = []

        def die(name: str) -> None:
            if name == "record_state":
                killed.append(name)
                raise SigKill(name)
        self.e.engine.store.write_fault = die

        async def go() -> asyncio.Task[None]:
            task = asyncio.ensure_future(self.e.sessions.replace(LEASES, sessions, complete=False))
            for _ in range(2000):
                if task.done() or killed:
                    break
                await asyncio.sleep(0.001)
            return task
        task = self.run(go())
        if task.done() and not killed and task.exception() is None:
            self.record_sessions(sessions, [], None)
            self.note("  committed before the kill")
        elif not task.done():
            task.cancel()
        self.kill()
        self.start()

    # -- invariants -----------------------------------------------------------------------------
    def unseen_step(self) -> float:
        """How far the wall clock stepped forward since the daemon last looked (``ReceiptClock.step``)."""
        then_wall, then_mono = self.e.engine.receipts._anchor
        return (self.clocks.wall - then_wall) - (self.clocks.mono - then_mono)

    def report(self) -> str:
        return "steps:\n  " + "\n  ".join(self.log[-40:])

    def persisted(self) -> PolicyInputs:
        """The inputs a restart would read (a fresh ``Store`` over the state directory)."""
        store = Store(str(self.config.state_dir))
        try:
            inputs = store.load_inputs()
        finally:
            store.close()
        inputs.rules = policy_rules(self.config)
        return inputs

    def deciding_at(self) -> float:
        """The instant the daemon decides at: a forward step not yet seen by the daemon has not
        moved any grace yet (it will, on the next input or timer round)."""
        jump = self.unseen_step()
        return self.clocks.wall - jump if jump > STEP_THRESHOLD else self.clocks.wall

    def settle(self) -> bool:
        """Run the round the daemon runs now (an input woke the timers task, or it knows the
        table needs repair); False while the table is rebuilt from the kernel (documented: kept
        as it is until a list arrives)."""
        e = self.e
        if e.engine.rebuilding is not None:
            assert e.queries.status()["rebuilding_from_kernel"]
            return False
        if e.engine.changed.is_set():
            self.timer()
        if e.engine.reconciler.needs_full:   # its timer repairs within RESYNC_SECONDS
            self.timer()
        assert not e.engine.reconciler.needs_full, "the repair round did not repair the table\n" + self.report()
        return True

    @invariant()
    def kernel_matches_persisted_policy(self) -> None:
        if self.enforcer is None:
            return
        e = self.e
        if not self.settle():
            return
        now = self.deciding_at()
        persisted = self.persisted()
        decisions = persisted.decide_all(now)
        in_memory = e.engine.inputs.decide_all(now)
        for sid in e.engine.conflicts:           # reported: the kernel keeps what it enforced
            decisions[sid] = e.engine.reconciler.owned.get(sid) or Decision(sid, Mode.FREE, "")
            in_memory[sid] = decisions[sid]
        kernel = kernel_modes(self.backend.read(self.dataplane))
        want = expected_modes(decisions)
        if kernel != want and e.engine.clock_unsaved and kernel == expected_modes(in_memory):
            # Graces or sessions a forward clock step moved, not saved yet (the write failed): the
            # daemon retries at its next round, and a restart before that moves the saved ends
            # again from the saved clock anchor (``Engine.now``). The kernel follows the moved ends.
            # Also an exemption, grace or promise that ended but whose save failed
            # (``Engine.save_later``): saved at the next operation's start, so after a clock step
            # back the persisted end (in the future again) differs from memory only until then.
            return
        if kernel != want:
            memory = expected_modes(in_memory)
            who = owners(decisions) | owners(in_memory)
            diff = {k: (kernel.get(k), want.get(k), memory.get(k), who.get(k)) for k in kernel.keys() | want.keys()
                    if kernel.get(k) != want.get(k)}
            raise AssertionError("kernel != policy(persisted inputs); key: (kernel, persisted, in memory, who): "
                                 f"{diff}\nconflicts={e.engine.conflicts}\n" + self.report())

    @invariant()
    def sessions_are_durable_exactly_when_answered(self) -> None:
        """Invariant 4: the persisted book and the daemon's book hold exactly the sessions of the
        changes that returned (a lease that ran out may have been ended by the daemon since)."""
        if self.enforcer is None:
            return
        persisted = book_of(self.persisted().sessions)
        memory = book_of(self.e.engine.inputs.sessions)
        same = memory == persisted or (self.e.engine.clock_unsaved and self.same_book(memory, persisted))
        assert same, (f"in memory but not saved: {set(memory.items()) - set(persisted.items())}; "
                                     f"saved but not in memory: {set(persisted.items()) - set(memory.items())}\n"
                                     + self.report())
        for ident, (session, _) in list(self.sessions.items()):
            if ident not in persisted and session.expires is not None and session.expires <= self.clocks.wall:
                del self.sessions[ident]   # it ran out (by the end the daemon saw) and the daemon ended it
                self.session_shifts.pop(ident, None)
        recorded = {i: s for i, (s, _) in self.sessions.items()}
        lost = {i: s.describe() for i, s in recorded.items() if not self.same_session(persisted.get(i), s, i)}
        unasked = {i: s.describe() for i, s in persisted.items() if not self.same_session(s, recorded.get(i), i)}
        assert not lost and not unasked, (f"sessions of changes that returned but not saved: {lost}; saved but "
                                          f"never returned (or changed): {unasked}\n" + self.report())

    def same_book(self, one: dict[SessionId, Session], other: dict[SessionId, Session]) -> bool:
        """The same sessions, their ends perhaps moved by a forward clock step (the daemon moves
        them when it next reads the clock, during a change or not, and saves them when it can)."""
        if one == other:
            return True
        if not any(self.session_shifts.values()):
            return False
        return ({i: replace(s, expires=None) for i, s in one.items()}
                == {i: replace(s, expires=None) for i, s in other.items()})

    def same_session(self, held: Session | None, recorded: Session | None, ident: SessionId) -> bool:
        """``held`` is ``recorded``, its end perhaps moved by a forward clock step."""
        if held is None or recorded is None:
            return held is recorded
        if held == recorded:
            return True
        if recorded.expires is None or held.expires is None:
            return False
        moved = held.expires - recorded.expires
        return (0 < moved <= self.session_shifts.get(ident, 0.0)
                and held == replace(recorded, expires=held.expires))

    @invariant()
    def session_addresses_follow_the_newest_session(self) -> None:
        """Invariant 5: each session address is walled exactly when the newest session naming it
        (in the order the changes committed) belongs to a restricted subscriber."""
        if self.enforcer is None or not self.settle():
            return
        inputs = self.persisted()
        decisions = inputs.decide_all(self.deciding_at())
        kernel = kernel_modes(self.backend.read(self.dataplane))
        for address in POOL:
            net = parse_address(address)
            naming = [s for s in inputs.sessions.sessions.values() if net in s.addresses]
            newest = max(naming, key=lambda s: self.sessions.get(s.id, (s, -1))[1], default=None)
            owner = inputs.session_owner(newest) if newest is not None else None
            if owner in self.e.engine.conflicts:
                continue   # reported in status; the kernel keeps what it enforced
            decision = decisions.get(owner) if owner is not None else None
            want = decision is not None and decision.restricted
            walled = network_key(address) in kernel
            if walled and not want:
                whose = ("nobody's" if newest is None else
                         f"{newest.describe()}, of {owner or 'a MAC on no list (a paying subscriber)'}")
                raise AssertionError(f"{address} is walled, yet its newest session is {whose}; sessions naming it "
                                     f"(oldest first): {self.naming(naming)}\n" + self.report())
            assert walled == want, (f"{address} is free, yet its newest session {newest and newest.describe()} "
                                    f"is restricted {owner}'s; sessions naming it: {self.naming(naming)}\n"
                                    + self.report())

    def naming(self, sessions: list[Session]) -> list[str]:
        ordered = sorted(sessions, key=lambda s: self.sessions.get(s.id, (s, -1))[1])
        return [f"{s.describe()} seen={s.seen - START:+.6f}" for s in ordered]

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
        """Is this kernel key one of ``sid``'s own addresses (v4 or v6 /64) or a session address
        the daemon holds for ``sid``?"""
        own = {ipaddress.ip_network(a) for a in (*addresses(sid), *POOL)}
        name, address = key
        plen = int(name.rsplit("_", 1)[1])
        return (ipaddress.ip_network(f"{address}/{plen}") in own
                and self.e.engine.reconciler.owner_of(name, address) == sid)


def machine_settings() -> dict[str, Any]:
    """Bounded for CI; ``WG_CHAOS_EXAMPLES`` runs longer by hand."""
    return {"max_examples": int(os.environ.get("WG_CHAOS_EXAMPLES", "0")) or None,
            "shrink": not os.environ.get("WG_CHAOS_NO_SHRINK")}
