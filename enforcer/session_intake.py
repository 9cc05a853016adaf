"""Sessions in: lease files, RADIUS accounting, session events and the CLI, merged and enforced.

Implements ``SessionSink`` for the sources. Changes arriving together are committed
together (one kernel transaction, one SQLite commit, like billing's events): the book
changes, the subscribers whose match keys the change touched are decided again, the kernel
applies the diff (a new address restricted, an old one freed and its connections flushed),
and the sessions are saved with the enforcement record in one commit. Only then do
``replace``/``update`` return, so a RADIUS Accounting-Response or a 200 to a BNG script means
the change is in the kernel and survives a restart. If it cannot be made durable, the book
and the kernel go back to how they were and the source is told (``SessionChangeFailed``).

A session's address that another subscriber holds (a fixed list address, say) is not taken
from them: it is held back, reported in ``status`` (``conflicts``) and retried, and the rest of
the change applies, this subscriber's other addresses included (``Engine.apply_resolving``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import Row
from .audit import state as audit_state
from .batcher import Batcher
from .dataplane.backend import DataplaneError
from .enforced import held
from .engine import Engine
from .events import SESSION_STARTED, Event
from .metrics import Metrics
from .model import Network
from .outcome import Outcome, Refusal, Refused, Result
from .sessions.book import Change
from .sessions.session import Session, SessionId, address_key
from .sessions.source import PROBLEMS, SessionChangeFailed, SessionSource
from .store import EnforcedWrite, StoreError
from .subscribers import Key, breadth_problem

log = logging.getLogger("walled_garden.sessions")

#: Sources of the daemon's own doors: signed webhook events and the control socket (CLI).
EVENT_SOURCE, CLI_SOURCE = "event", "cli"
#: Session events are ordered per address in ``billing_order`` under this name and stream.
ORDER_PREFIX, ORDER_STREAM = "session:", "session"
#: A batch that starts this many sessions (a lease file read at start) is moved out of the
#: collector's sight afterwards, as the list is (``Engine.sync_all``).
FREEZE_AFTER = 10_000
#: Seconds the expiry duty waits after a commit that failed (the store may be full).
EXPIRY_RETRY_SECONDS = 2.0
#: Problems logged per source and kind before they are only counted (a broken file repeats).
LOGGED_PROBLEMS = 20


@dataclass
class Request:
    """One source's change, waiting for its batch."""

    source: str
    started: Sequence[Session]
    stopped: Sequence[str]
    replace: bool
    complete: bool
    observed: float
    done: asyncio.Future[None]
    stop_matching: Sequence[Session] = ()   # session events: stop this source's sessions of these keys
    expiring: bool = False                  # the expiry duty: stop only what is still expired
    event: Event | None = None              # a webhook's session event: ordered by its timestamp
    kind: str = ""                          # session.started/stopped (events and the CLI): answered
    answer: dict[str, Any] = field(default_factory=dict)   # its answer, saved with the change
    at: float | None = None                 # in a fleet: when the accepting gateway received it


@dataclass
class Undo:
    """What a batch replaced: the sessions it touched and the event order it moved."""

    sessions: dict[SessionId, Session | None] = field(default_factory=dict)
    order: dict[str, dict[str, float] | None] = field(default_factory=dict)


@dataclass
class SourceState:
    """What ``status`` shows per source besides the source's own report."""

    changes: int = 0
    last_change: float | None = None
    last_lag: float | None = None
    problems: Counter[str] = field(default_factory=Counter)
    last_problem: str = ""


class SessionIntake:
    def __init__(self, engine: Engine, metrics: Metrics, sources: Sequence[SessionSource] = ()) -> None:
        self.engine, self.metrics, self.sources = engine, metrics, list(sources)
        self._prefix = ""
        self.batcher: Batcher[Request] = Batcher(self._commit_batch)
        self._retry_at = 0.0   # the expiry duty waits until then after a failed commit
        self.state: dict[str, SourceState] = {}
        engine.duties.append(self)
        engine.reports["sessions"] = self.status
        self._counted()
        self._expect_problems()

    @property
    def prefix(self) -> str:
        """In a fleet "<gateway>/": what this gateway's sources are called in every book (set by
        ``fleet.sessions.FleetSessions`` after this is built)."""
        return self._prefix

    @prefix.setter
    def prefix(self, prefix: str) -> None:
        if prefix == self._prefix:
            return
        counts = self.engine.inputs.sessions.counts()
        for source in self._own():   # counted under the new names from now on
            for kind in PROBLEMS:
                self.metrics.session_errors.remove(source, kind)
            if source not in counts:   # the gauge made at start under the old name would stay 0 for good
                with contextlib.suppress(KeyError):
                    self.metrics.sessions.remove(source)
        self._prefix = prefix
        self._expect_problems()
        self._counted()

    def _expect_problems(self) -> None:
        """Each of this gateway's sources has its ``session_source_errors_total`` series (at 0)
        from the start, under the name its problems are counted under: rate() never counts a
        series' first sample, so a first problem that created it would go unseen."""
        for source in self._own():
            for kind in PROBLEMS:
                self.metrics.session_errors.labels(source, kind)

    # -- SessionSink ------------------------------------------------------------------------
    async def replace(self, source: str, sessions: Sequence[Session], *, complete: bool = True,
                      observed: float | None = None) -> None:
        await self._submit(Request(source, sessions, (), True, complete, observed or self.engine.clock(),
                                   asyncio.get_running_loop().create_future()))

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None, at: float | None = None) -> None:
        """``at``: in a fleet, when the gateway whose source it is received it (the sessions'
        receipt instant, as for every input from the stream)."""
        await self._submit(Request(source, started, stopped, False, True, observed or self.engine.clock(),
                                   asyncio.get_running_loop().create_future(), at=at))

    def keys(self, source: str) -> list[str]:
        return list(self.engine.inputs.sessions.of_source(source))

    def problem(self, source: str, kind: str, detail: str) -> None:
        if kind not in PROBLEMS:
            log.error("event=session_problem_unknown_kind source=%s kind=%s", source, kind)
        state = self.state.setdefault(source, SourceState())
        state.problems[kind] += 1
        state.last_problem = f"{kind}: {detail}"[:500]
        self.metrics.session_errors.labels(source, kind).inc()
        if state.problems[kind] <= LOGGED_PROBLEMS:
            log.warning("event=session_source_problem source=%s kind=%s detail=%s",
                        source, kind, detail)

    def address_problem(self, network: Network) -> str | None:
        """Why a session may not hold ``network``: too broad for one subscriber (a /33 lease
        would wall half a /32 pool), or outside the address space."""
        return breadth_problem(network) or self.engine.space.problem(network)

    async def close(self) -> None:
        await self.batcher.close()

    async def _submit(self, request: Request) -> None:
        self.batcher.submit(request)
        await request.done   # its own future: a cancelled caller cancels only its own wait

    # -- session events and the CLI ------------------------------------------------------------
    async def handle_event(self, event: Event, source: str = EVENT_SOURCE, at: float | None = None) -> Result:
        """A ``session.started``/``session.stopped`` (webhook or CLI): one session per address,
        keyed by the address; a stop without addresses ends all of that source's sessions
        carrying those keys. Answers once committed. A webhook's answer is saved with the change
        (a retry of its id gets it again and acts once), and its timestamp orders it against
        the other events about the same address: a late retry of an older start never walls an
        address a newer event gave to someone else."""
        if source == EVENT_SOURCE:
            prior = await asyncio.to_thread(self.engine.store.event_answer, event.id)
            if prior is not None:
                return Outcome(prior)
        for network in event.addresses:
            problem = self.address_problem(network)
            if problem:
                return Refusal(Refused.INVALID, f"data.addresses: {network}: {problem}")
        sessions = [Session(source, address_key(a), event.match, (a,), event.subscriber_id,
                            detail=f"{event.type} {event.id}" if source == EVENT_SOURCE else event.note)
                    for a in event.addresses]
        start = event.type == SESSION_STARTED
        request = Request(source, sessions if start else (), [s.key for s in sessions] if not start else (), False,
                          True, self.engine.clock(), asyncio.get_running_loop().create_future(),
                          event=event if source == EVENT_SOURCE else None, kind=event.type, at=at)
        if not start and not event.addresses:
            request.stop_matching = [Session(source, "", event.match, (), event.subscriber_id)]
        try:
            await self._submit(request)
        except SessionChangeFailed as exc:
            return Refusal(Refused.UNAVAILABLE, f"{exc}; retry later")
        return Outcome(request.answer if source == EVENT_SOURCE else self._answered(request))

    # -- the commit ----------------------------------------------------------------------------
    async def _commit_batch(self, batch: list[Request]) -> None:
        """Commit a batch; whatever goes wrong, no source is left waiting."""
        try:
            await self._commit(batch)
        except Exception as exc:
            log.exception("event=session_batch_failed size=%d", len(batch))
            for request in batch:
                if not request.done.done():
                    request.done.set_exception(SessionChangeFailed(f"internal error: {exc}"))

    async def _commit(self, batch: list[Request]) -> None:
        engine = self.engine
        book = engine.inputs.sessions
        async with engine.lock:
            now = engine.now()
            undo = Undo()
            before = undo.sessions
            change = Change()
            for request in batch:
                change.merge(self._change(request, undo, now))
            touched = engine.inputs.subscribers_of(change.touched)
            decisions = engine.decide(touched, now)
            held_before = {sid: held(d) for sid in touched if (d := engine.decisions.get(sid)) is not None}
            writes: list[EnforcedWrite] = []
            cause = "sessions: " + ", ".join(sorted({r.source for r in batch}))
            try:
                result = await engine.apply_resolving(decisions, cause, cause, deferred=writes)
            except DataplaneError as exc:
                self._put_back(undo)
                await self._reapply(touched, now)   # some subscribers may have been applied one by one
                self._fail(batch, f"the kernel change failed: {exc}")
                return
            in_kernel = engine.clock()   # what the lag measures (counted once it is saved too)
            writes.append(EnforcedWrite(audit=self._moves(held_before, touched, now)))
            saved = [s for i in before if (s := book.sessions.get(i)) is not None]
            gone = [i for i in before if i not in book.sessions]
            answers = [(r.event.id, self._answered(r), None) for r in batch if r.event is not None]
            try:
                await asyncio.to_thread(engine.store.record_state, writes, sessions=(saved, gone), events=answers,
                                        billing_order=engine.billing_order.rows(undo.order))
            except (StoreError, sqlite3.Error) as exc:   # not durable, so not done: back as it was
                log.error("event=sessions_not_saved changes=%d error=%s kernel_change=undone", len(before), str(exc))
                self._put_back(undo)
                await self._reapply(touched, now)
                self._fail(batch, f"the session state could not be saved: {exc}")
                return
            engine.changed.set()
            if len(change.started) >= FREEZE_AFTER:
                gc.freeze()   # a lease file's worth of sessions lives on: see Engine.sync_all
            self._counted(change)
            lags: dict[str, Any] = {}
            for request in batch:
                state = self.state.setdefault(request.source, SourceState())
                state.changes += len(request.started) + len(request.stopped)
                state.last_change, state.last_lag = in_kernel, max(in_kernel - request.observed, 0.0)
                lag = lags.get(request.source) or lags.setdefault(request.source,
                                                                  self.metrics.session_lag.labels(request.source))
                lag.observe(state.last_lag)
        # The next batch may start meanwhile (its own flush follows this one's): the flush
        # only removes stale connections of addresses whose state already changed.
        engine.spawn(self._finish(batch, result.changed, cause), "answers")

    async def _finish(self, batch: list[Request], changed: list[Key], cause: str) -> None:
        """After the commit: flush the changed addresses' connections, then answer."""
        try:
            await self.engine.flusher.flush(changed, cause)   # conntrack merges passes 50 ms apart
        finally:
            for request in batch:
                if not request.done.done():
                    request.done.set_result(None)

    def _change(self, request: Request, undo: Undo, now: float) -> Change:
        """Apply one request to the book, remembering in ``undo`` what it replaced. Only what
        differs from the book is stamped and started: a lease file re-read after one lease
        changed touches that lease, not the thousands around it."""
        book = self.engine.inputs.sessions
        live = [s for s in request.started if s.expires is None or s.expires > now]
        starting = [s for s in live if book.sessions.get(s.id) != s]
        # An instant only for sessions that start: one taken for nothing (a re-read that changed
        # nothing, the expiry duty) would move the receipt floor to now (``receipt_clock``).
        stamp = self.engine.receipts.stamp(request.at) if starting else 0.0
        started = [s.stamped(stamp) for s in starting]
        stopped: list[SessionId] = [(request.source, key) for key in request.stopped]
        if request.expiring:   # a renewal committed since the duty looked keeps its session
            stopped = [i for i in stopped if (s := book.sessions.get(i)) is not None
                       and s.expires is not None and s.expires <= now]
        for pattern in request.stop_matching:
            stopped += [s.id for s in book.matching(pattern.pairs()) if s.source == request.source]
        if request.replace and request.complete:
            keep = {s.key for s in live}
            stopped += [(request.source, k) for k in book.of_source(request.source) if k not in keep]
        ignored: list[str] = []
        if request.event is not None:
            started, stopped, ignored = self._in_order(request, started, stopped, undo)
        if request.kind:
            request.answer = {"type": request.kind, "result": "ignored" if ignored and not (started or stopped)
                              else "applied", "sessions": sorted({s.key for s in started} | {k for _, k in stopped})}
            if ignored:
                request.answer |= {"ignored": ignored,
                                   "detail": "older than the last session event for these addresses; not applied"}
            inputs = self.engine.inputs
            request.answer["subscribers"] = sorted({o for i in stopped if (s := book.sessions.get(i)) is not None
                                                    and (o := inputs.session_owner(s)) is not None})
        for sid in [s.id for s in started] + stopped:
            undo.sessions.setdefault(sid, book.sessions.get(sid))
        change = book.start(started)
        change.merge(book.stop(stopped))
        return change

    def _in_order(self, request: Request, started: list[Session], stopped: list[SessionId],
                  undo: Undo) -> tuple[list[Session], list[SessionId], list[str]]:
        """A session event acts only on addresses no newer event has spoken of (by the
        sender's timestamps, like billing's ``billing_order``); the rest is answered ignored."""
        assert request.event is not None
        order, at = self.engine.billing_order, request.event.timestamp

        def fresh(key: str) -> bool:
            newest = order.newest.get(ORDER_PREFIX + key, {}).get(ORDER_STREAM)
            return newest is None or at >= newest

        keys = [s.key for s in started] + [key for _, key in stopped] + [s.key for s in request.started
                                                                          if s not in started]
        ignored = sorted({key for key in keys if not fresh(key)})
        started = [s for s in started if fresh(s.key)]
        stopped = [i for i in stopped if fresh(i[1])]
        for key in {s.key for s in request.started} | {key for _, key in stopped}:
            if fresh(key):
                name = ORDER_PREFIX + key
                undo.order.setdefault(name, order.snapshot(name))
                order.newest.setdefault(name, {})[ORDER_STREAM] = at
        return started, stopped, ignored

    def _answered(self, request: Request) -> dict[str, Any]:
        """The event's answer, completed with whose sessions they are now."""
        inputs = self.engine.inputs
        if request.event is not None:
            request.answer["id"] = request.event.id
        owners = {o for key in request.answer.get("sessions", ())
                  if (s := inputs.sessions.sessions.get((request.source, key))) is not None
                  and (o := inputs.session_owner(s)) is not None}
        request.answer["subscribers"] = sorted(owners | set(request.answer.get("subscribers", ())))
        return request.answer

    def _moves(self, held_before: dict[str, tuple[Network, ...]], touched: set[str], now: float) -> list[Row]:
        """Audit rows for restricted subscribers whose enforced addresses a session moved (a
        mode change has its own row): the audit log says which session gave which address."""
        rows: list[Row] = []
        for sid in touched:
            decision = self.engine.decisions.get(sid)
            if decision is None or not decision.restricted:
                continue
            old, new = set(held_before.get(sid, ())), set(held(decision))
            if old == new or sid not in held_before:
                continue
            mode = audit_state(decision)
            change = "; ".join(part for part in (
                f"gained {', '.join(sorted(map(str, new - old)))}" if new - old else "",
                f"freed {', '.join(sorted(map(str, old - new)))}" if old - new else "") if part)
            rows.append((now, sid, mode, mode, f"session addresses {change}; now: {decision.cause}"))
        return rows

    async def _reapply(self, touched: set[str], now: float) -> None:
        """After ``_put_back``: the kernel as the book was (the decisions as they were); if the
        kernel refuses, the timer's repair does a full sync."""
        engine = self.engine
        try:
            await engine.apply_resolving(engine.decide(touched, now), "undo", deferred=[])
        except DataplaneError:
            engine.reconciler.needs_full = True
            engine.changed.set()

    def _put_back(self, undo: Undo) -> None:
        book = self.engine.inputs.sessions
        book.stop([i for i in undo.sessions if i in book.sessions])
        book.start([s for s in undo.sessions.values() if s is not None])
        for name, saved in undo.order.items():
            self.engine.billing_order.restore(name, saved)

    def _fail(self, batch: list[Request], why: str) -> None:
        for request in batch:
            self.problem(request.source, "commit_failed", why)
            if not request.done.done():
                request.done.set_exception(SessionChangeFailed(why))

    def _own(self) -> list[str]:
        return [self.prefix + s.name for s in self.sources]

    def _counted(self, change: Change | None = None) -> None:
        counts = self.engine.inputs.sessions.counts()
        for source in {*counts, *self.state, *self._own()}:
            self.metrics.sessions.labels(source).set(counts.get(source, 0))
        if change is not None:   # one increment per source and kind, not per session
            counted = Counter((s.source, "started") for s in change.started)
            counted.update((s.source, "stopped") for s in change.stopped)
            for (source, kind), n in counted.items():
                self.metrics.session_changes.labels(source, kind).inc(n)

    # -- leases that run out (a timer duty) -------------------------------------------------------
    def due(self) -> float | None:
        expiry = self.engine.inputs.sessions.next_expiry()
        if expiry is None:
            return None
        return max(expiry - self.engine.clock(), self._retry_at - self.engine.clock(), 0.0)

    async def run(self) -> None:
        book = self.engine.inputs.sessions
        now = self.engine.clock()
        ended = [s for s in book.sessions.values() if s.expires is not None and s.expires <= now]
        by_source: dict[str, list[str]] = {}
        for session in ended:
            by_source.setdefault(session.source, []).append(session.key)
        for source, keys in by_source.items():
            log.info("event=sessions_expired source=%s count=%d", source, len(keys))
            request = Request(source, (), keys, False, True, now, asyncio.get_running_loop().create_future(),
                              expiring=True)
            try:
                await self._submit(request)
            except SessionChangeFailed:   # reported; tried again after a pause, not in a loop
                self._retry_at = self.engine.clock() + EXPIRY_RETRY_SECONDS

    # -- what people read ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counts = self.engine.inputs.sessions.counts()
        names = self._own() + sorted(set(counts) | set(self.state) - set(self._own()))
        own = {self.prefix + s.name: s.status() for s in self.sources}
        out: dict[str, Any] = {}
        for name in names:
            state = self.state.get(name, SourceState())
            out[name] = {**own.get(name, {}), "sessions": counts.get(name, 0), "changes": state.changes,
                         "last_change": state.last_change, "last_lag_seconds": state.last_lag,
                         "problems": dict(state.problems), "last_problem": state.last_problem}
        return out
