"""Sessions in: lease files, RADIUS accounting, session events and the CLI, merged and enforced.

Implements ``SessionSink`` for the sources. Changes arriving together are committed
together (one kernel transaction, one SQLite commit, like billing's events): the book
changes, the subscribers whose match keys the change touched are decided again, the kernel
applies the diff (a new address restricted, an old one freed and its connections flushed),
and the sessions are saved with the enforcement record in one commit. Only then do
``replace``/``update`` return, so a RADIUS Accounting-Response or a 200 to a BNG script means
the change is in the kernel and survives a restart. If it cannot be made durable, the book
and the kernel go back to how they were and the source is told (``SessionChangeFailed``).

A session's addresses that belong to another subscriber's fixed list addresses are not taken
from them: that subscriber keeps its restriction, the conflict is reported in ``status``
(``conflicts``) and retried, and everyone else's change applies.
"""

from __future__ import annotations

import asyncio
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

log = logging.getLogger("walled_garden.sessions")

#: Sources of the daemon's own doors: signed webhook events and the control socket (CLI).
EVENT_SOURCE, CLI_SOURCE = "event", "cli"
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
        self.batcher: Batcher[Request] = Batcher(self._commit_batch)
        self.state: dict[str, SourceState] = {}
        engine.duties.append(self)
        engine.reports["sessions"] = self.status
        self._counted()

    # -- SessionSink ------------------------------------------------------------------------
    async def replace(self, source: str, sessions: Sequence[Session], *, complete: bool = True,
                      observed: float | None = None) -> None:
        await self._submit(Request(source, sessions, (), True, complete, observed or self.engine.clock(),
                                   asyncio.get_running_loop().create_future()))

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None) -> None:
        await self._submit(Request(source, started, stopped, False, True, observed or self.engine.clock(),
                                   asyncio.get_running_loop().create_future()))

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
            log.warning("event=session_source_problem source=%s kind=%s detail=%r (nothing else changed)",
                        source, kind, detail)

    def address_problem(self, network: Network) -> str | None:
        return self.engine.space.problem(network)

    async def close(self) -> None:
        await self.batcher.close()

    async def _submit(self, request: Request) -> None:
        self.batcher.submit(request)
        await asyncio.shield(request.done)

    # -- session events and the CLI ------------------------------------------------------------
    async def handle_event(self, event: Event, source: str = EVENT_SOURCE) -> Result:
        """A ``session.started``/``session.stopped`` (webhook or CLI): one session per address,
        keyed by the address; a stop without addresses ends all of that source's sessions
        carrying those keys. Answers once committed; a retried webhook id gets the same answer."""
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
        request = Request(source, sessions if event.type == SESSION_STARTED else (),
                          [s.key for s in sessions] if event.type != SESSION_STARTED else (), False, True,
                          event.timestamp if source == CLI_SOURCE else self.engine.clock(),
                          asyncio.get_running_loop().create_future())
        if event.type != SESSION_STARTED and not event.addresses:
            request.stop_matching = [Session(source, "", event.match, (), event.subscriber_id)]
        try:
            await self._submit(request)
        except SessionChangeFailed as exc:
            return Refusal(Refused.UNAVAILABLE, f"{exc}; retry later")
        answer = {"result": "applied", "type": event.type, "sessions": [s.key for s in sessions] or "all matching",
                  "subscribers": sorted({o for s in sessions
                                         if (o := self.engine.inputs.session_owner(s)) is not None})}
        if source == EVENT_SOURCE:
            try:
                await asyncio.to_thread(self.engine.store.record_events, [(event.id, answer, None)], None)
            except (StoreError, sqlite3.Error) as exc:   # applied; a retry applies it again (idempotent)
                log.error("event=session_answer_not_saved id=%s error=%r", event.id, str(exc))
        return Outcome(answer)

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
            before: dict[SessionId, Session | None] = {}
            change = Change()
            for request in batch:
                change.merge(self._change(request, before, now))
            touched = engine.inputs.subscribers_of(change.touched)
            decisions = engine.decide(touched, now)
            held_before = {sid: held(d) for sid in touched if (d := engine.decisions.get(sid)) is not None}
            writes: list[EnforcedWrite] = []
            cause = "sessions: " + ", ".join(sorted({r.source for r in batch}))
            try:
                result = await engine.apply_resolving(decisions, cause, cause, deferred=writes)
            except DataplaneError as exc:
                self._put_back(before)
                self._fail(batch, f"the kernel change failed: {exc}")
                return
            writes.append(EnforcedWrite(audit=self._moves(held_before, touched, now)))
            saved = [s for i in before if (s := book.sessions.get(i)) is not None]
            gone = [i for i in before if i not in book.sessions]
            try:
                await asyncio.to_thread(engine.store.record_state, writes, sessions=(saved, gone))
            except (StoreError, sqlite3.Error) as exc:   # not durable, so not done: back as it was
                log.error("event=sessions_not_saved changes=%d error=%r (kernel change undone)", len(before), str(exc))
                self._put_back(before)
                try:   # the book as it was gives the decisions as they were
                    await engine.apply_resolving(engine.decide(touched, now), "undo", deferred=[])
                except DataplaneError:
                    engine.reconciler.needs_full = True
                    engine.changed.set()
                self._fail(batch, f"the session state could not be saved: {exc}")
                return
            engine.changed.set()
        await engine.flusher.flush(result.changed, cause)
        committed = engine.clock()
        self._counted(change)
        for request in batch:
            state = self.state.setdefault(request.source, SourceState())
            state.changes += len(request.started) + len(request.stopped)
            state.last_change, state.last_lag = committed, max(committed - request.observed, 0.0)
            self.metrics.session_lag.labels(request.source).observe(state.last_lag)
            if not request.done.done():
                request.done.set_result(None)

    def _change(self, request: Request, before: dict[SessionId, Session | None], now: float) -> Change:
        """Apply one request to the book, remembering what each session it touches was. Only
        what differs from the book is stamped and started: a lease file re-read after one
        lease changed touches that lease, not the thousands around it."""
        book = self.engine.inputs.sessions
        live = [s for s in request.started if s.expires is None or s.expires > now]
        stamp = self.engine.receipts.stamp()
        started = [s.stamped(stamp) for s in live if book.sessions.get(s.id) != s]
        stopped: list[SessionId] = [(request.source, key) for key in request.stopped]
        for pattern in request.stop_matching:
            stopped += [s.id for s in book.matching(pattern.pairs()) if s.source == request.source]
        if request.replace and request.complete:
            keep = {s.key for s in live}
            stopped += [(request.source, k) for k in book.of_source(request.source) if k not in keep]
        for sid in [s.id for s in started] + stopped:
            before.setdefault(sid, book.sessions.get(sid))
        change = book.start(started)
        change.merge(book.stop(stopped))
        return change

    def _moves(self, held_before: dict[str, tuple[Network, ...]], touched: set[str], now: float) -> list[Row]:
        """Audit rows for restricted subscribers whose enforced addresses a session moved (a
        mode change has its own row): the audit log says which session gave which address."""
        rows: list[Row] = []
        for sid in touched:
            decision = self.engine.decisions.get(sid)
            if decision is None or not decision.restricted or sid in self.engine.conflicts:
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

    def _put_back(self, before: dict[SessionId, Session | None]) -> None:
        book = self.engine.inputs.sessions
        book.stop([i for i in before if i in book.sessions])
        book.start([s for s in before.values() if s is not None])

    def _fail(self, batch: list[Request], why: str) -> None:
        for request in batch:
            self.problem(request.source, "commit_failed", why)
            if not request.done.done():
                request.done.set_exception(SessionChangeFailed(why))

    def _counted(self, change: Change | None = None) -> None:
        counts = self.engine.inputs.sessions.counts()
        for source in {*counts, *self.state, *(s.name for s in self.sources)}:
            self.metrics.sessions.labels(source).set(counts.get(source, 0))
        if change is not None:
            for session in change.started:
                self.metrics.session_changes.labels(session.source, "started").inc()
            for session in change.stopped:
                self.metrics.session_changes.labels(session.source, "stopped").inc()

    # -- leases that run out (a timer duty) -------------------------------------------------------
    def due(self) -> float | None:
        expiry = self.engine.inputs.sessions.next_expiry()
        return None if expiry is None else max(expiry - self.engine.clock(), 0.0)

    async def run(self) -> None:
        book = self.engine.inputs.sessions
        now = self.engine.clock()
        ended = [s for s in book.sessions.values() if s.expires is not None and s.expires <= now]
        by_source: dict[str, list[str]] = {}
        for session in ended:
            by_source.setdefault(session.source, []).append(session.key)
        for source, keys in by_source.items():
            log.info("event=sessions_expired source=%s count=%d", source, len(keys))
            try:
                await self.update(source, stopped=keys)
            except SessionChangeFailed:
                pass   # reported; the timer tries again

    # -- what people read ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counts = self.engine.inputs.sessions.counts()
        names = [s.name for s in self.sources] + sorted(set(counts) | set(self.state)
                                                       - {s.name for s in self.sources})
        own = {s.name: s.status() for s in self.sources}
        out: dict[str, Any] = {}
        for name in names:
            state = self.state.get(name, SourceState())
            out[name] = {**own.get(name, {}), "sessions": counts.get(name, 0), "changes": state.changes,
                         "last_change": state.last_change, "last_lag_seconds": state.last_lag,
                         "problems": dict(state.problems), "last_problem": state.last_problem}
        return out

    def explain(self, subscriber_id: str) -> list[dict[str, Any]]:
        """The sessions that give this subscriber addresses, and which addresses each holds."""
        book = self.engine.inputs.sessions
        return [{"source": s.source, "key": s.key, "match": s.match.to_json(), "subscriber": s.subscriber or None,
                 "addresses": [str(a) for a in s.addresses], "holds": [str(a) for a in book.held(s)],
                 "expires": s.expires, "seen": s.seen, "detail": s.detail}
                for s in self.engine.inputs.sessions_of(subscriber_id)]
