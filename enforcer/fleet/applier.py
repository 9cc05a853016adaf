"""Applying the fleet's stream on this gateway: strictly in stream order, each input once.

The position is the last stream sequence applied here, saved in the local SQLite (meta
``fleet_applied``); the durable consumer is re-created from it at every (re)connection and after
any gap, so what this gateway applies never depends on what JetStream thinks was acknowledged.
A crash between a commit and saving the position re-applies a few inputs after the restart:
every kind is idempotent (events by their id's saved answer, exemptions and promises by their
state), so that costs nothing.

Inputs are applied through the same local code as on a lone gateway. A run of events about
different subscribers is handed to the event intake together, so it commits them as one batch
(the 2,000 events/s path); anything else is applied alone. The next run starts once the last
one is committed (durable, in the kernel), while its connection flush is still running; its
answers (with the flush count) reach the webhooks waiting for them when the flush is done.

An input refused "retry later" (the kernel or SQLite failed) is retried, 1 s doubling to
30 s, and nothing after it is applied meanwhile: the order is the truth. A malformed message
changes nothing; it is counted, logged and passed over.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from ..event_intake import INTERNAL
from ..events import SESSION_TYPES
from ..metrics import Metrics
from ..outcome import Refusal, Refused, Result
from ..store import Store, StoreError
from .clocks import ClockOffsets
from .link import NATS_ERRORS, Link, Unavailable
from .messages import EVENT, Message, MessageError, decode

log = logging.getLogger("walled_garden.enforcer")
BATCH = 512
FETCH_WAIT = 1.0
#: Idle fetches (of FETCH_WAIT each) between checks that nothing is being withheld.
IDLE_CHECKS = 5
#: An input whose apply failed with an internal error (a bug) is retried this often, then
#: passed over (loudly: it fails on every gateway alike, so skipping keeps them equal).
INTERNAL_RETRIES = 3
STREAM_IDENTITY = "fleet_stream"
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
#: Results kept for the publishers waiting on them (a webhook's answer is its own gateway's):
#: at most this many, for at most KEEP seconds (longer than any answer_timeout a publish waits).
KEPT_RESULTS = 100_000
KEEP = 120.0
POSITION = "fleet_applied"



@dataclass(frozen=True)
class Started:
    """An input handed to this gateway: ``committed`` resolves once it is durable and in the
    kernel (or refused), ``answered`` when its answer is final (after the flush)."""

    committed: Awaitable[Result]
    answered: Awaitable[Result] | None = None   # None: the committed result is the answer


Start = Callable[[Message], Started]


class Gap(Exception):
    """The consumer delivered past a sequence not yet applied: re-create it from the position."""


@dataclass
class Item:
    seq: int
    msg: Msg
    message: Message | None
    error: str = ""

    @property
    def subscriber(self) -> str | None:
        """The subscriber an event is about (events about the same one never share a run); None
        for anything applied alone (session events too: they go through their own intake, in the
        order their tasks reach it, so two in one run could swap)."""
        if self.message is None or self.message.kind != EVENT or self.message.event is None \
                or self.message.event.type in SESSION_TYPES:
            return None
        return self.message.event.subscriber_id


def transient(result: Result) -> bool:
    return isinstance(result, Refusal) and result.kind is Refused.UNAVAILABLE


def internal(result: Result) -> bool:
    return isinstance(result, Refusal) and bool(result.extra.get(INTERNAL))


class Applier:
    def __init__(self, link: Link, store: Store, start: Start, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.link, self.store, self.start, self.metrics, self.clock = link, store, start, metrics, clock
        saved = store.get_meta(POSITION)
        self.applied = saved if isinstance(saved, int) and saved >= 0 else 0
        self.stream_last = self.applied          # the newest sequence known to exist
        self.behind_since: float | None = None   # publish time of the oldest input known and not applied
        self.target: int | None = None           # the stream's last sequence when this connection began
        self.caught_up = asyncio.Event()
        self.advanced = asyncio.Event()   # set at each input applied: the heartbeat tells the fleet at once
        self.results: OrderedDict[int, Result] = OrderedDict()
        self.kept: dict[int, float] = {}   # when each result was recorded (monotonic)
        self.answers: dict[int, asyncio.Future[Result]] = {}   # committed, answer still to come (the flush)
        self.waiters: dict[int, list[asyncio.Future[Result]]] = {}
        self.clocks = ClockOffsets(link.config.gateway, metrics)   # each gateway's clock against NATS's
        metrics.fleet_applied_sequence.set_function(lambda: self.applied)
        metrics.fleet_stream_sequence.set_function(lambda: self.stream_last)
        metrics.fleet_lag_seconds.set_function(lambda: self.lag(self.clock()))

    def lag(self, now: float) -> float:
        """Seconds the oldest input not yet applied here has waited (0 when caught up)."""
        if self.applied >= self.stream_last or self.behind_since is None:
            return 0.0
        return max(now - self.behind_since, 0.0)

    async def result(self, seq: int, timeout: float) -> Result | None:
        """This gateway's result for ``seq`` once applied; None when it was applied so long ago
        that the result is gone; a refusal when it is not applied within ``timeout``."""
        if seq in self.results:
            return self.results[seq]
        if seq in self.answers:
            try:
                return await asyncio.wait_for(asyncio.shield(self.answers[seq]), timeout)
            except TimeoutError:
                return Refusal(Refused.UNAVAILABLE, f"sequence {seq} is applied; its answer is late, retry later")
        if seq <= self.applied:
            return None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(seq, []).append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return Refusal(Refused.UNAVAILABLE, f"the fleet's stream holds it (sequence {seq}) but this gateway has "
                                                "not applied it yet; retry later")
        finally:
            waiting = self.waiters.get(seq, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self.waiters.pop(seq, None)

    async def follow(self, halt: asyncio.Event) -> None:
        """Apply the stream until ``halt`` or NATS fails (``Unavailable``, for the caller to retry)."""
        first, last, identity = await self.link.stream_bounds()
        self._same_stream(identity, last)
        self.target = last
        self.stream_last = max(self.stream_last, last)
        start = self.applied + 1
        if first > start:
            log.error("event=fleet_history_lost applied=%d stream_first=%d (the stream no longer holds inputs %d-%d, "
                      "removed by its limits: this gateway goes on from what it holds; see docs/operations.md)",
                      self.applied, first, start, first - 1)
            self.metrics.fleet_applied.labels("-", "lost").inc(first - start)
            start = first
            self.applied = first - 1
        subscription = await self.link.consume_from(start)
        log.info("event=fleet_following from=%d stream_last=%d", start, last)
        idle = 0
        while not halt.is_set():
            if self.applied >= (self.target or 0):
                self.caught_up.set()
            waiting = subscription.pending_msgs == 0   # nothing received and not yet applied
            messages = await self.link.fetch(subscription, BATCH, FETCH_WAIT)
            if messages and waiting:
                self._live(messages[0], self.clock())
            if not messages:
                idle += 1
                if idle % IDLE_CHECKS == 0:
                    await self._check_idle()
                if self.applied >= self.stream_last:
                    self.behind_since = None
                continue
            idle = 0
            try:
                await self._apply(messages)
            except Gap as gap:   # from the top: the stream's bounds may have moved
                raise Unavailable(f"a gap in the stream ({gap}); re-reading from {self.applied + 1}") from None

    def _live(self, msg: Msg, now: float) -> None:
        """This gateway's own clock offset from ``msg``, received at ``now``, if it came live.

        Live is judged without this gateway's clock (the one in doubt): the message was stored
        after this connection began (past ``target``), everything before it is applied here,
        this gateway was waiting with nothing received, NATS had nothing after it to send
        (``num_pending``) and sends it the first time. A catch-up fails the first two; a
        backlog, the rest. What remains is delivery latency (milliseconds, or a stall of the
        consumer, which ``ClockOffsets`` outweighs with the other samples of the minute)."""
        meta = msg.metadata
        seq = meta.sequence.stream
        if meta.timestamp is None or meta.num_pending or meta.num_delivered != 1 \
                or seq != self.applied + 1 or seq <= (self.target or 0):
            return
        self.clocks.live(now, meta.timestamp.timestamp())

    def _same_stream(self, identity: str, last: int) -> None:
        """A stream deleted and created again (a NATS store lost, a cluster rebuilt) numbers its
        inputs from 1 again: positions and answers kept for the old one mean nothing there."""
        saved = self.store.get_meta(STREAM_IDENTITY)
        if saved == identity:
            return
        if saved is not None or self.applied > last:
            log.error("event=fleet_stream_replaced applied=%d stream_last=%d (the stream was created anew: its "
                      "history is not the one this gateway applied; following it from its start)", self.applied, last)
            self.metrics.fleet_applied.labels("-", "stream_replaced").inc()
            self.applied = self.stream_last = 0
            self.results.clear()
            self._save(0)
        try:
            self.store.set_meta(STREAM_IDENTITY, identity)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("event=fleet_identity_not_saved error=%r", str(exc))

    async def _check_idle(self) -> None:
        """Nothing came for a while: is there something we are not being sent (our consumer
        deleted, a delivery lost)? Then re-create the consumer from the position."""
        _, last, identity = await self.link.stream_bounds()
        self.stream_last = max(last, self.applied)
        if identity != self.store.get_meta(STREAM_IDENTITY) or last > self.applied:
            raise Unavailable(f"the stream holds up to {last} but nothing came after {self.applied}: re-reading")

    async def _apply(self, messages: list[Msg]) -> None:
        items: list[Item] = []
        gap = ""
        for msg in messages:
            seq = msg.metadata.sequence.stream
            if seq <= self.applied + len(items):
                continue   # applied before (a redelivery)
            if seq != self.applied + len(items) + 1:
                gap = f"expected {self.applied + len(items) + 1}, got {seq}"
                break
            self.stream_last = max(self.stream_last, seq + (msg.metadata.num_pending or 0))
            try:
                items.append(Item(seq, msg, decode(msg.data)))
            except MessageError as exc:
                items.append(Item(seq, msg, None, str(exc)))
        if items:
            stamp = items[0].msg.metadata.timestamp
            self.behind_since = stamp.timestamp() if stamp is not None else self.clock()
        for run in _runs(items):
            await self._apply_run(run)
        if gap:
            raise Gap(gap)
        if messages:
            await _ack(messages[-1])   # AckPolicy.ALL: everything up to it

    async def _apply_run(self, run: list[Item]) -> None:
        delay, begin, failures = RETRY_FIRST, 0, 0
        while True:
            started = [self._one(item) for item in run[begin:]]   # events queued at once, in order
            # shielded: a halt while they commit must not cut an input in half (see Fleet._follow)
            results = await asyncio.gather(*(asyncio.shield(s.committed) for s in started))
            stuck = next((i for i, r in enumerate(results) if transient(r)), None)
            if stuck is not None and internal(results[stuck]):
                failures += 1
                if failures > INTERNAL_RETRIES:   # a bug, the same on every gateway: pass it over, loudly
                    item = run[begin + stuck]
                    log.error("event=fleet_input_failed seq=%d kind=%s error=%r (passed over after %d attempts: it "
                              "changes nothing here)", item.seq, item.message.kind if item.message else "-",
                              getattr(results[stuck], "error", ""), failures)
                    failed = results[stuck]
                    assert isinstance(failed, Refusal)
                    results[stuck] = Refusal(Refused.INVALID, f"failed: {failed.error}",
                                             {**failed.extra, "failed": True})
                    stuck = next((i for i, r in enumerate(results) if transient(r)), None)
            done = len(results) if stuck is None else stuck
            for item, result, one in zip(run[begin:begin + done], results[:done], started[:done], strict=True):
                self._advance(item, result)
                self._answer(item, result, one.answered)
            for one in started[done:]:   # the stuck one and those behind it: applied again
                _forget(one)
            if stuck is None:
                break
            begin += stuck
            item = run[begin]
            self.metrics.fleet_apply_retries.inc()
            log.warning("event=fleet_apply_retry seq=%d kind=%s error=%r retry_in=%.0fs (nothing after it is applied "
                        "meanwhile)", item.seq, item.message.kind if item.message else "-",
                        getattr(results[stuck], "error", ""), delay)
            await _in_progress(item.msg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        self._save(run[-1].seq)

    def _one(self, item: Item) -> Started:
        if item.message is not None:
            try:
                started = self.start(item.message)
            except MessageError as exc:
                item.error = str(exc)
            else:
                if isinstance(started.committed, asyncio.Future):   # an event: queued, nothing more to raise
                    return started
                return Started(asyncio.ensure_future(_refusing(started.committed)), started.answered)
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        done.set_result(Refusal(Refused.INVALID, f"malformed fleet message: {item.error}"))
        return Started(done)

    def _answer(self, item: Item, committed: Result, answered: Awaitable[Result] | None) -> None:
        """Record ``item``'s answer: now, or when its flush is done."""
        if answered is None:
            self._record(item.seq, committed)
            return
        future = self.answers[item.seq] = asyncio.ensure_future(answered)

        def done(_: asyncio.Future[Result], seq: int = item.seq) -> None:
            self.answers.pop(seq, None)
            self._record(seq, committed if future.cancelled() or future.exception() else future.result())

        future.add_done_callback(done)

    def _advance(self, item: Item, result: Result) -> None:
        kind = item.message.kind if item.message else "-"
        stored = item.msg.metadata.timestamp
        if stored is not None:   # publish -> committed here (the figure a fleet's dashboard watches)
            stamp = stored.timestamp()
            self.metrics.fleet_commit_seconds.observe(max(self.clock() - stamp, 0.0))
            if item.message is not None:   # the accepting gateway's clock against NATS's
                self.clocks.accepted(item.message.gateway, item.message.at, stamp, item.seq <= (self.target or 0))
        if isinstance(result, Refusal) and result.extra.get("failed"):
            self.metrics.fleet_applied.labels(kind, "failed").inc()
        elif item.message is None or (isinstance(result, Refusal) and result.error.startswith("malformed")):
            log.error("event=fleet_message_malformed seq=%d error=%r (skipped: it changes nothing)", item.seq,
                      result.error if isinstance(result, Refusal) else "")
            self.metrics.fleet_applied.labels(kind, "malformed").inc()
        else:
            self.metrics.fleet_applied.labels(kind, "refused" if isinstance(result, Refusal) else "applied").inc()
        self.applied = item.seq
        self.advanced.set()

    def _record(self, seq: int, result: Result) -> None:
        """Kept for the publisher that may still ask (a webhook waits at most answer_timeout)."""
        now = time.monotonic()
        self.results[seq] = result
        self.kept[seq] = now
        while self.results and (len(self.results) > KEPT_RESULTS or self.kept[next(iter(self.results))] < now - KEEP):
            old, _ = self.results.popitem(last=False)
            self.kept.pop(old, None)
        for future in self.waiters.pop(seq, []):
            if not future.done():
                future.set_result(result)

    def _save(self, seq: int) -> None:
        """The position, saved after the inputs' own commits (a crash in between re-applies them)."""
        try:
            self.store.set_meta(POSITION, seq)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("event=fleet_position_not_saved seq=%d error=%r (a restart re-applies from the last saved "
                        "one; every input is idempotent)", seq, str(exc))


def _runs(items: list[Item]) -> list[list[Item]]:
    """Consecutive events about different subscribers together; anything else alone."""
    runs: list[list[Item]] = []
    current: list[Item] = []
    subscribers: set[str] = set()
    for item in items:
        sid = item.subscriber
        if sid is None or sid in subscribers or len(current) >= BATCH:
            if current:
                runs.append(current)
            current, subscribers = [], set()
        if sid is None:
            runs.append([item])
            continue
        current.append(item)
        subscribers.add(sid)
    if current:
        runs.append(current)
    return runs


async def _refusing(committed: Awaitable[Result]) -> Result:
    """A message whose body turns out malformed while being applied: refused, nothing changed;
    an exception (a bug): an internal error, retried a few times (``INTERNAL_RETRIES``)."""
    try:
        return await committed
    except MessageError as exc:
        return Refusal(Refused.INVALID, f"malformed fleet message: {exc}")
    except Exception as exc:   # one input's bug must not end the follower (it would die on it again)
        log.exception("event=fleet_input_error")
        return Refusal(Refused.UNAVAILABLE, f"internal error: {exc!r}", {INTERNAL: True})


def _forget(started: Started) -> None:
    """An input queued behind a stuck one: its outcome is taken again when the run is retried
    (an event by its saved answer), so nothing waits on it here."""
    for awaitable in (started.committed, started.answered):
        if isinstance(awaitable, asyncio.Future):
            awaitable.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack()
    except NATS_ERRORS as exc:  # the position is ours; a lost ack only means a redelivery we skip
        log.debug("event=fleet_ack_failed error=%r", str(exc))


async def _in_progress(msg: Msg) -> None:
    try:
        await msg.in_progress()
    except NATS_ERRORS as exc:
        log.debug("event=fleet_in_progress_failed error=%r", str(exc))


__all__ = ["Applier", "Gap", "Unavailable"]
