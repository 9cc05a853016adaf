"""``Fleet``: a gateway's part in a fleet, wired to its components.

What it adds to a lone gateway: a ``relay`` the components publish through, an ``EventSink``
for the webhook worker and the operators' restrict/lift, the applier that feeds the stream back
into the same components (``_start``: one input kind, one ``apply_*`` method), heartbeats for
``fleet status``, and the reference-code key shared through a KV bucket so the portal page shows
the same code on every gateway. ``run`` keeps all of it going across NATS outages; the local
state goes on enforcing meanwhile (safety rule 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

import nats.js.errors

from ..config import FleetConfig
from ..engine import Engine
from ..event_intake import EventIntake
from ..list_intake import ListIntake
from ..metrics import Metrics
from ..operator_actions import OperatorActions
from ..outcome import Result
from ..portal_actions import PortalActions
from ..references import References
from ..session_intake import SessionIntake
from .applier import Applier, Started
from .gateways import BEAT, Gateways
from .link import NATS_ERRORS, Link, Unavailable
from .messages import EVENT, Message, event_of
from .relay import FleetEvents, FleetRelay
from .sessions import SESSION_EVENT, SESSIONS, FleetSessions, apply_sessions

log = logging.getLogger("walled_garden.enforcer")
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0
REFERENCE_KEY = "reference_key"
#: How long ending the follower may take (a NATS request in flight ends within its own timeout).
HALT_TIMEOUT = 6.0
#: A promise this gateway accepted tells billing when applied within this long (a gateway rebuilt
#: from the stream under the same name does not tell billing of old promises again).
NOTIFY_WINDOW = 600.0
#: A heartbeat goes out as soon as this gateway has applied more of the stream (so ``fleet status``
#: on every gateway shows the new position within a moment, not up to ``BEAT`` later), but never
#: sooner than this after the previous one: a burst of inputs costs NATS at most four a second.
BEAT_GAP = 0.25


class Fleet:
    def __init__(self, config: FleetConfig, engine: Engine, intake: EventIntake, operator: OperatorActions,
                 portal: PortalActions, lists: ListIntake, sessions: SessionIntake, references: References,
                 metrics: Metrics) -> None:
        self.config, self.engine, self.metrics = config, engine, metrics
        self.intake, self.operator, self.portal, self.lists = intake, operator, portal, lists
        self.references = references
        self.link = Link(config, self._connected)
        self.applier = Applier(self.link, engine.store, self._start, metrics, engine.clock)
        self.relay = FleetRelay(config, self.link, self.applier, metrics, engine.clock)
        self.events = FleetEvents(self.relay, intake, intake.refusal)
        self.sessions = FleetSessions(self.relay, sessions)
        self.gateways = Gateways(self.link, config.gateway, metrics, engine.clock)
        self.error = ""
        self.beaten: float | None = None     # when this process last wrote its heartbeat (engine clock)
        self.unreachable = asyncio.Event()   # the last attempt to connect failed
        self.wake = asyncio.Event()          # nats-py reconnected
        metrics.fleet_connected.set(0)
        engine.reports["fleet"] = self.report

    def _connected(self, connected: bool) -> None:
        self.metrics.fleet_connected.set(1 if connected else 0)
        if connected:
            self.wake.set()   # follow again at once, not after the back-off

    def _start(self, message: Message) -> Started:
        """Start applying one input from the stream here; events are queued at once, in order."""
        if message.kind == EVENT:
            committed, answered = self.intake.submit_committed(event_of(message), time.perf_counter(), message.at)
            return Started(committed, answered)
        return Started(self._apply(message))

    def _apply(self, message: Message) -> Awaitable[Result]:
        body, at, via = message.body, message.at, message.gateway
        kind = message.kind
        if kind == "operator":
            return self.operator.apply_change(body["actor"], body["subscriber"], body["restrict"], body["note"],
                                              body["mode"], body["addresses"], body["id"], via, at)
        if kind == "exempt":
            return self.operator.apply_exempt(body["actor"], body["subscriber"], body["category"], float(body["until"]),
                                              body["note"], at, via)
        if kind == "unexempt":
            return self.operator.apply_unexempt(body["actor"], body["subscriber"], body["category"], body["note"], at,
                                                via)
        if kind == "promise":
            ours = via == self.config.gateway and self.engine.clock() - at < NOTIFY_WINDOW
            return self.portal.apply_promise(body["subscriber"], body["address"], at, via, notify=ours)
        if kind == "acknowledge":
            return self.portal.apply_acknowledge(body["subscriber"], body["address"], via, at)
        if kind == SESSIONS:
            return apply_sessions(self.sessions.intake, body, at)
        if kind == SESSION_EVENT:
            return self.sessions.intake.handle_event(event_of(message), body["source"], at)
        if kind == "list_approve":
            return self.lists.apply_approve(body["actor"], body["note"], body["digest"], via, at)
        return self.lists.apply_reject(body["actor"], body["note"], body["digest"], via, at)

    async def caught_up(self, timeout: float) -> bool:
        """Wait (bounded) until everything the stream held when we connected is applied here;
        False at once when NATS cannot be reached (start-up then goes on with the local state:
        the unit starts before the network, which must not wait for NATS)."""
        await _either(self.applier.caught_up, self.unreachable, timeout)
        return self.applier.caught_up.is_set()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, follow the stream and beat until ``stop``; NATS failures are waited out."""
        delay = RECONNECT_FIRST
        while not stop.is_set():
            try:
                try:
                    await self._connect()
                except Unavailable:
                    self.unreachable.set()
                    raise
                self.unreachable.clear()
                self.error = ""
                delay = RECONNECT_FIRST
                await self._follow(stop)
            except Unavailable as exc:
                if str(exc) != self.error:
                    log.warning("event=fleet_unavailable error=%r retry_in=%.0fs (enforcing the local state)",
                                str(exc), delay)
                self.error = str(exc)
            self.wake.clear()
            await _either(stop, self.wake, delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _connect(self) -> None:
        link = self.link
        if link.nc is not None and link.nc.is_closed:
            link.nc = link.js = None
        if link.nc is None:
            await link.connect()
            log.info("event=fleet_connected gateway=%s stream=%s", self.config.gateway, self.config.stream)
        elif not link.connected:
            raise Unavailable("NATS connection lost; reconnecting")
        await link.ensure_stream()
        await self._share_reference_key()
        await self.gateways.open()

    async def _follow(self, stop: asyncio.Event) -> None:
        """The applier and the heartbeat together, until either fails or ``stop``. nats-py may
        turn a cancellation into its own timeout, so both loops also watch ``halt``."""
        halt = asyncio.Event()
        follow = asyncio.create_task(self.applier.follow(halt), name="fleet_follow")
        beat = asyncio.create_task(self._beat(halt), name="fleet_beat")
        stopped = asyncio.create_task(stop.wait(), name="fleet_stop")
        try:
            done, _ = await asyncio.wait({follow, beat, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped:
                    task.result()   # Unavailable (or a bug) goes to ``run``/the supervisor
        finally:
            halt.set()   # the follower ends after the run it is applying (cut in half, an input is lost here)
            beat.cancel()
            stopped.cancel()
            await asyncio.wait({follow}, timeout=HALT_TIMEOUT)
            follow.cancel()   # still waiting: in a retry's sleep, or on NATS (nothing half-applied)
            await asyncio.wait({follow, beat, stopped}, timeout=HALT_TIMEOUT)

    async def _beat(self, halt: asyncio.Event) -> None:
        """Write this gateway's heartbeat every ``BEAT`` seconds and right after it applies more
        of the stream (at most one per ``BEAT_GAP``); read everyone's every ``BEAT`` seconds (for
        the metrics and the name check: the reads need not follow each input)."""
        loop = asyncio.get_running_loop()
        read_at = -BEAT
        while not halt.is_set():
            sent = self.applier.applied
            await self.gateways.beat(sent, self.applier.lag(self.engine.clock()))
            self.beaten, beaten = self.engine.clock(), loop.time()
            if beaten - read_at >= BEAT - BEAT_GAP:   # a timer may fire a hair early
                read_at = beaten
                with contextlib.suppress(Unavailable):
                    rows = await self.gateways.read(self.applier.stream_last)
                    self.applier.clocks.retain(row["gateway"] for row in rows)   # gateways gone from the fleet
            await self._until_applied(sent, beaten + BEAT, halt)
            await asyncio.sleep(max(beaten + BEAT_GAP - loop.time(), 0.0))

    async def _until_applied(self, sent: int, deadline: float, halt: asyncio.Event) -> None:
        """Wait until the applier has gone past ``sent`` (the position last beaten), ``halt``, or
        the loop's clock reaches ``deadline``."""
        loop, advanced = asyncio.get_running_loop(), self.applier.advanced
        while self.applier.applied == sent and not halt.is_set():
            advanced.clear()   # checked just before with no await between: no advance is missed
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await _either(advanced, halt, remaining)

    async def _share_reference_key(self) -> None:
        """The first gateway's reference key becomes the fleet's; the others adopt it."""
        kv = await self.link.bucket(f"{self.config.stream}_fleet")
        try:
            try:
                await kv.create(REFERENCE_KEY, self.references.key_hex.encode())
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                entry = await kv.get(REFERENCE_KEY)
        except NATS_ERRORS as exc:
            raise Unavailable(f"reference key: {exc or type(exc).__name__}") from None
        shared = (entry.value or b"").decode(errors="replace")
        if shared != self.references.key_hex:
            if self.references.adopt(shared):
                log.warning("event=fleet_reference_key_adopted (portal reference codes are now the fleet's)")
            else:
                log.error("event=fleet_reference_key_unusable (kept this gateway's; codes differ across the fleet)")

    def report(self) -> dict[str, Any]:
        """``status``'s ``fleet`` section (no NATS round trip)."""
        applier = self.applier
        return {"gateway": self.config.gateway, "stream": self.config.stream, "connected": self.link.connected,
                "applied_sequence": applier.applied, "stream_last_sequence": applier.stream_last,
                "lag_seconds": round(applier.lag(self.engine.clock()), 3), "caught_up": applier.caught_up.is_set(),
                "error": self.gateways.conflict or self.error or None, "clock_offsets": applier.clocks.view()}

    async def status(self) -> dict[str, Any]:
        """``walled-garden fleet status``: this gateway and every gateway's last heartbeat; this
        gateway's own row is its live position (a heartbeat is up to ``BEAT_GAP`` old, and just
        after an input was applied it named the sequence before). Each row also carries the
        gateway's clock offset against NATS as estimated here (``clocks``; None: not measured)."""
        view = self.report()
        try:
            _, last, _ = await self.link.stream_bounds()
            view["stream_last_sequence"] = last
            rows = await self.gateways.read(last)
        except Unavailable as exc:
            rows = self.gateways.last
            view["error"] = f"{exc} (gateways as last read)"
        offsets = view["clock_offsets"]
        view["gateways"] = [{**row, "clock_offset_seconds": offsets.get(row["gateway"], {}).get("offset_seconds")}
                            for row in self._with_own_row(rows, view["stream_last_sequence"])]
        return view

    def _with_own_row(self, rows: list[dict[str, Any]], stream_last: int) -> list[dict[str, Any]]:
        """``rows`` with this gateway's row from the applier itself (applied, behind, lag) and
        from its own last heartbeat written (last seen), by name as ``Gateways.read`` sorts them;
        a gateway that has written no heartbeat and has none in the bucket is not listed."""
        name, applier, now = self.config.gateway, self.applier, self.engine.clock()
        others = [row for row in rows if row["gateway"] != name]
        read = next((row for row in rows if row["gateway"] == name), None)
        if read is None and self.beaten is None:
            return others
        own: dict[str, Any] = dict(read or {})
        if self.beaten is not None:
            ago = round(max(now - self.beaten, 0.0), 1)
            own |= {"last_seen": self.beaten, "seen_seconds_ago": ago, "connected": self.link.connected and
                    ago < 3 * BEAT}
        own |= {"gateway": name, "applied_sequence": applier.applied,
                "behind": max(stream_last - applier.applied, 0), "lag_seconds": round(applier.lag(now), 3)}
        return sorted([*others, own], key=lambda row: str(row["gateway"]))

    async def close(self) -> None:
        await self.link.close()


async def _either(first: asyncio.Event, second: asyncio.Event, timeout: float) -> None:
    """Wait until either event is set, at most ``timeout`` seconds."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
