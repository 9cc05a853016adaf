"""Billing's events (and operators' restrict/lift): batched, applied, answered.

Events arriving together are committed together: policy per event, one kernel transaction,
one SQLite commit, one connection-flush round, so 2,000 events/s cost a few hundred commits.
Each event's answer is decided at the commit and saved with the state before anyone hears
it: a 200 is a promise that a restart or a retry of the same webhook id cannot undo. If the
batch cannot be made durable, the kernel change is undone and every event in it is refused
as "retry later"; billing retries.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .batcher import Batcher
from .claims import Conflict
from .dataplane.backend import DataplaneError
from .enforced import held
from .engine import Engine, Undo
from .event_inputs import EventRules, apply_event
from .events import PAYMENT, RELEASED, RESTRICTED, SESSION_TYPES, Event
from .metrics import Metrics
from .model import Mode, Network
from .outcome import Outcome, Refusal, Refused, Result
from .policy import Decision
from .reconciler import AddressConflict, SyncResult
from .store import EnforcedWrite, StoreError
from .subscribers import Subscriber, network_key


class SessionEvents(Protocol):
    """Where ``session.started``/``session.stopped`` go (``session_intake.SessionIntake``)."""

    async def handle_event(self, event: Event, source: str = ..., at: float | None = None) -> Result: ...

log = logging.getLogger("walled_garden.enforcer")
#: In a refusal's ``extra``: a bug, not a kernel or SQLite failure (a fleet retries it only a few times).
INTERNAL = "internal"


@dataclass
class Pending:
    """A verified event waiting for its batch; ``answer`` resolves after commit and flush."""

    event: Event
    received: float
    answer: asyncio.Future[Result]
    at: float | None = None   # in a fleet: when the accepting gateway received it
    committed: asyncio.Future[Result] | None = None   # in a fleet: resolves at the commit, before the flush


@dataclass(frozen=True)
class Applied:
    index: int           # the event's place in its batch
    sid: str
    undo: Undo


Answers = dict[int, Result]


def ignored(result: Result) -> bool:
    return isinstance(result, Outcome) and result.body.get("result") == "ignored"


class EventIntake:
    """Implements ``EventSink`` for the webhook app."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._inflight: dict[str, asyncio.Future[Result]] = {}
        self.batcher: Batcher[Pending] = Batcher(self._commit_batch)
        self.sessions: SessionEvents | None = None   # where session events go (wired by the daemon)
        self._pending: Pending | None = None          # the one ``submit`` queued last
        for kind in (PAYMENT, RESTRICTED, RELEASED):   # samples from the start, not only after the first event
            metrics.events.labels(kind, "applied")

    def rules(self) -> EventRules:
        policy = self.engine.config.policy
        return EventRules(policy.payment_grace, policy.exemption_default)

    def count(self, event_type: str, result: str, by: int = 1) -> None:
        self.metrics.events.labels(event_type, result).inc(by)

    async def handle(self, event: Event, received: float) -> Result:
        """Apply one verified event; answers only after the kernel commit and the flush."""
        return await asyncio.shield(self.submit(event, received))

    def submit_committed(self, event: Event, received: float, at: float | None = None
                         ) -> tuple[asyncio.Future[Result], asyncio.Future[Result]]:
        """``submit``, plus a future that resolves at the commit (durable and in the kernel),
        before the connection flush: the fleet's applier goes on to the next inputs then, while
        the flush runs, as batches do on a lone gateway."""
        answer = self.submit(event, received, at)
        if self._pending is not None and self._pending.answer is answer:
            committed: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending.committed = committed
            return committed, answer
        return answer, answer   # a retry in flight, or a session event: its answer is its commit

    def submit(self, event: Event, received: float, at: float | None = None) -> asyncio.Future[Result]:
        """Queue one verified event; the future resolves after the commit and the flush.

        A retry of an id still being processed gets the first one's future (and answer).
        No task per event: at 2,000 events/s the webhook worker's bridge only adds a callback.
        ``at``: the receipt instant another gateway of the fleet gave it (default: now).
        """
        inflight = self._inflight.get(event.id)
        if inflight is not None:
            self.count(event.type, "duplicate")
            return inflight
        if event.type in SESSION_TYPES:
            return self._session_event(event, at)
        pending = self._pending = Pending(event, received, asyncio.get_running_loop().create_future(), at)
        self._inflight[event.id] = pending.answer

        def done(future: asyncio.Future[Any], event_id: str = event.id) -> None:
            if self._inflight.get(event_id) is future:
                del self._inflight[event_id]

        pending.answer.add_done_callback(done)
        self.batcher.submit(pending)
        return pending.answer

    def _session_event(self, event: Event, at: float | None) -> asyncio.Future[Result]:
        """``session.started``/``session.stopped``: the session intake commits them."""
        if self.sessions is None:
            answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            answer.set_result(Refusal(Refused.INVALID, "sessions are not enabled on this gateway"))
            return answer
        task = asyncio.ensure_future(self.sessions.handle_event(event, at=at))
        self._inflight[event.id] = task

        def done(future: asyncio.Future[Result], event_id: str = event.id) -> None:
            if self._inflight.get(event_id) is future:
                del self._inflight[event_id]
            if not future.cancelled() and future.exception() is None:
                result = future.result()
                self.count(event.type, "applied" if isinstance(result, Outcome)
                           else "invalid" if result.kind is Refused.INVALID else "error")

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        await self.batcher.close()

    async def _commit_batch(self, batch: list[Pending]) -> None:
        """Commit a batch; whatever goes wrong, no webhook request is left waiting."""
        try:
            await self._commit(batch)
        except Exception as exc:
            log.exception("event=batch_failed size=%d", len(batch))
            for item in batch:
                if not item.answer.done():
                    item.answer.set_result(Refusal(Refused.UNAVAILABLE, f"internal error, retry later: {exc}",
                                                   {"id": item.event.id, INTERNAL: True}))
            _committed(batch, {})

    def _judge(self, item: Pending, now: float, prior: Result | None) -> Result | Decision:
        """An event's answer when it is not to be applied, or its decision (inputs changed)."""
        engine, event, sid = self.engine, item.event, item.event.subscriber_id
        if prior is not None:
            self.count(event.type, "duplicate")
            return prior
        outside = self._outside(event.subscriber)
        if outside:
            self.count(event.type, "invalid")
            return Refusal(Refused.INVALID, outside, {"id": event.id})
        stale = engine.billing_order.stale(event)
        if stale:
            self.count(event.type, "stale")
            return Outcome({"id": event.id, "result": "ignored", "detail": stale})
        engine.billing_order.record(event)
        if apply_event(engine.inputs, event, engine.receipts.stamp(item.at), now, self.rules()):
            self.metrics.promises.labels("kept").inc()
        return engine.inputs.decide(sid, now, engine.decisions.get(sid))

    async def _commit(self, batch: list[Pending]) -> None:
        """Apply a burst of events: policy per event, one kernel transaction, one flush round."""
        engine = self.engine
        answers: Answers = {}
        applied: list[Applied] = []
        touched: dict[str, Decision] = {}
        claimed: list[tuple[str, Any]] = []   # what the batch's claims replaced
        listed_before: list[tuple[str, Any]] = []   # and its changes to ``engine.free_listed``
        result: SyncResult | None = None
        writes: list[EnforcedWrite] = []
        async with engine.lock:
            now = engine.now()
            known = engine.store.event_answers(item.event.id for item in batch)
            for index, item in enumerate(batch):
                sid = item.event.subscriber_id
                stored = known.get(item.event.id)
                undo = engine.save(sid)
                judged = self._judge(item, now, Outcome(stored) if stored is not None else None)
                if not isinstance(judged, Decision):
                    answers[index] = judged
                    continue
                conflict = engine.claims.conflict(sid, held(judged))
                listed = None if conflict is not None else engine.free_listed.conflict(
                    sid, _new_to(engine, sid, held(judged)))
                if conflict is not None or listed is not None:
                    engine.undo(sid, undo)
                    self.count(item.event.type, "conflict")
                    why = str(conflict) if conflict is not None else _listed_for(listed)
                    answers[index] = Refusal(Refused.CONFLICT, why, {"id": item.event.id})
                    continue
                touched[sid] = judged
                claimed.append((sid, engine.claims.claim(sid, held(judged))))
                # at once, as claims: a later event of this batch must meet what this one left
                # (a payment frees a listed subscriber whose address the next event claims)
                listed_before.append((sid, engine.note_free_listed(sid, judged)))
                applied.append(Applied(index, sid, undo))
            if touched:
                before = {sid: engine.decisions.get(sid) or Decision(sid, Mode.FREE, "not enforced") for sid in touched}
                try:
                    result = await engine.apply(touched, deferred=writes)
                except (DataplaneError, AddressConflict) as exc:  # nothing of the batch was applied
                    for sid, previous in reversed(claimed):
                        engine.claims.claim(sid, previous)
                    for sid, previous in reversed(listed_before):
                        engine.free_listed.claim(sid, previous)
                    self._refuse(batch, applied, answers, f"kernel change failed, retry later: {exc}")
                    applied = []
                    self._unjudge(answers, str(exc))
                committed = time.perf_counter()
                records = self._answers(batch, applied, touched, answers)
                if applied:   # before any answer: a restart must not undo what billing was told
                    try:
                        engine.store.record_state(writes, engine.inputs, touched, events=records,
                                                  billing_order=engine.billing_order.rows(a.sid for a in applied))
                    except (StoreError, sqlite3.Error) as exc:
                        await self._unapply(batch, applied, before, answers, exc)
                        applied, result = [], None
                for done in applied:
                    self.metrics.event_to_enforce.observe(committed - batch[done.index].received)
                engine.changed.set()
            elif any(ignored(answer) for answer in answers.values()):   # only "ignored" ones to remember
                try:
                    engine.store.record_events(self._answers(batch, [], {}, answers), None)
                except (StoreError, sqlite3.Error) as exc:
                    log.warning("event=answers_not_saved error=%r (a retry is weighed again)", str(exc))
        _committed(batch, answers)
        engine.spawn(self._finish(batch, answers, applied, result), "answers")

    def _refuse(self, batch: list[Pending], applied: list[Applied], answers: Answers, why: str) -> None:
        """Put back the inputs of the applied events (newest first) and refuse them: retry later."""
        for done in reversed(applied):
            self.engine.undo(done.sid, done.undo)
            event = batch[done.index].event
            self.count(event.type, "error")
            answers[done.index] = Refusal(Refused.UNAVAILABLE, why, {"id": event.id})

    def _answers(self, batch: list[Pending], applied: list[Applied], touched: dict[str, Decision],
                 answers: Answers) -> list[tuple[str, dict[str, Any], str | None]]:
        """The answers of a batch, made at its commit and saved with its state: what a retry
        of the same webhook-id gets. ``connections_flushed`` is filled in after the flush (and
        the saved copy with it; should that write fail, a replay says null)."""
        records: list[tuple[str, dict[str, Any], str | None]] = []
        for done in applied:
            event, decision = batch[done.index].event, touched[done.sid]
            body: dict[str, Any] = {"id": event.id, "result": "applied", "subscriber": done.sid,
                                    "mode": decision.mode.value, "cause": decision.cause, "connections_flushed": None}
            if decision.until:
                body["until"] = decision.until
            answers[done.index] = Outcome(body)
            records.append((event.id, body, done.sid))
        records += [(batch[i].event.id, answer.body, None) for i, answer in answers.items()
                    if ignored(answer)]
        return records

    @staticmethod
    def _unjudge(answers: Answers, why: str) -> None:
        """The batch was not applied: an event it judged stale may have been judged so by a
        sibling that is now undone, so it is refused too and weighed again on its retry."""
        for index, answer in list(answers.items()):
            if ignored(answer):
                answers[index] = Refusal(Refused.UNAVAILABLE, f"the batch could not be applied, retry later: {why}",
                                         {"id": answer.body.get("id")})

    async def _unapply(self, batch: list[Pending], applied: list[Applied], before: dict[str, Decision],
                       answers: Answers, exc: Exception) -> None:
        """The batch is in the kernel but could not be saved: not durable, so not done. Its
        inputs are put back and the kernel returns to what it enforced before (caller holds the
        lock); billing is told to retry. Should the kernel refuse the way back, the timer's
        full sync (from the restored inputs) repairs it."""
        log.error("event=batch_not_saved size=%d error=%r (kernel change undone; billing retries)", len(applied),
                  str(exc))
        self._refuse(batch, applied, answers, f"state could not be saved, retry later: {exc}")
        self._unjudge(answers, str(exc))
        try:
            await self.engine.apply(before, deferred=[])
        except (DataplaneError, AddressConflict):
            self.engine.reconciler.needs_full = True
        self.engine.changed.set()

    async def _finish(self, batch: list[Pending], answers: Answers, applied: list[Applied],
                      result: SyncResult | None) -> None:
        """After the commit: flush connections once for the batch, record answers, reply."""
        try:
            flushed = await self.engine.flusher.flush(result.changed, f"{len(applied)} event(s)") if result else 0
            for done in applied:
                event, answer = batch[done.index].event, answers[done.index]
                assert isinstance(answer, Outcome)
                answer.body["connections_flushed"] = flushed
                self.count(event.type, "applied")
                log.info("event=billing_event id=%s type=%s subscriber=%s mode=%s", event.id, event.type, done.sid,
                         answer.body["mode"])
            if applied:   # the saved answers gain the flush count, so a replay gets the very same answer
                await self._record_flushed(batch, applied, answers)
        except Exception as exc:  # answer every waiter whatever went wrong
            log.exception("event=batch_finish_failed")
            for index in range(len(batch)):
                answers.setdefault(index, Refusal(Refused.UNAVAILABLE, f"internal error: {exc}", {INTERNAL: True}))
        for index, item in enumerate(batch):
            if not item.answer.done():
                item.answer.set_result(answers.get(index, Refusal(Refused.UNAVAILABLE, "not processed")))
        _committed(batch, answers)

    async def _record_flushed(self, batch: list[Pending], applied: list[Applied], answers: Answers) -> None:
        try:
            async with self.engine.lock:
                self.engine.store.record_events([(batch[d.index].event.id, answers[d.index].body, None)
                                                 for d in applied], None)
        except (StoreError, sqlite3.Error) as exc:   # the saved answer stands: answer the same
            log.warning("event=answers_not_updated error=%r (connections_flushed stays null)", str(exc))
            for done in applied:
                answers[done.index].body["connections_flushed"] = None

    def refusal(self, event: Event) -> Refusal | None:
        """Why this gateway refuses ``event`` whatever its state (an address outside its address
        space), or None: a fleet gateway asks before publishing, so the stream never carries an
        input its own gateway refuses as invalid."""
        outside = self._outside(event.subscriber)
        for network in event.addresses:
            problem = self.engine.space.problem(network)
            outside = outside or (f"data.addresses: {network}: {problem}" if problem else "")
        return Refusal(Refused.INVALID, outside, {"id": event.id}) if outside else None

    def _outside(self, subscriber: Subscriber | None) -> str:
        """Why an event's or operator's addresses may not be enforced here (safety rules), or ''."""
        for network in subscriber.addresses if subscriber is not None else ():
            problem = self.engine.space.problem(network)
            if problem:
                return problem if problem.startswith(str(network)) else f"{network} is {problem}"
        return ""


def _committed(batch: list[Pending], answers: Answers) -> None:
    """Resolve the commit futures of a batch with its answers as committed."""
    for index, item in enumerate(batch):
        if item.committed is None or item.committed.done():
            continue
        result = answers.get(index)
        if result is None and item.answer.done() and not item.answer.cancelled():
            result = item.answer.result()
        item.committed.set_result(result or Refusal(Refused.UNAVAILABLE, "not processed"))


def _new_to(engine: Engine, sid: str, networks: Iterable[Network]) -> list[Network]:
    """``networks`` but those ``sid`` holds in the kernel already: a holder keeps what it holds
    (a clash with the list waits in ``conflicts``), so only a new claim meets the list."""
    kept = set(engine.claims.held.get(sid, ()))
    return [network for network in networks if network_key(network) not in kept]


def _listed_for(conflict: Conflict | None) -> str:
    """A clash with a listed subscriber the kernel holds free (``Engine.free_listed``)."""
    assert conflict is not None
    return (f"{conflict.network} overlaps {conflict.theirs}, listed for subscriber {conflict.holder} (free now: "
            "a payment grace, an exemption or a promise); the list must give the address to another first")
