"""Session changes in a fleet: what this gateway's session sources (lease files, RADIUS) and the
``session`` CLI report goes through the stream, so every gateway knows where each subscriber is
(an active/standby pair takes over with the sessions already in place).

Each gateway's sources are named ``<gateway>/<source>`` in every book, so two gateways reading
their own dnsmasq never end each other's leases. A source hands over its whole set (a lease file
re-read) as usual; only the difference from what the stream has applied for it is published,
in chunks, so a re-read that changed one lease publishes one session, and a restart re-reads
the file and publishes only what changed while it was down. Session webhooks are events and
travel as events. Problems (a malformed lease line) stay local: they change nothing anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from ..events import Event, event_to_wire
from ..match import Match, parse_match
from ..model import Network
from ..outcome import Outcome, Refusal, Refused, Result
from ..session_intake import CLI_SOURCE, SessionIntake
from ..sessions.session import Session
from ..sessions.source import SessionChangeFailed
from .messages import MessageError
from .relay import FleetRelay

log = logging.getLogger("walled_garden.enforcer")
#: Sessions per stream message (NATS's default message limit is 1 MB; a session is ~200 bytes).
CHUNK = 1000
SESSIONS, SESSION_EVENT = "sessions", "session_event"


class FleetSessions:
    """The ``SessionSink`` of a fleet gateway's session sources, and the CLI's door."""

    def __init__(self, relay: FleetRelay, intake: SessionIntake) -> None:
        self.relay, self.intake = relay, intake
        intake.prefix = f"{relay.gateway}/"

    def qualified(self, source: str) -> str:
        return f"{self.relay.gateway}/{source}"

    # -- SessionSink, for this gateway's sources ------------------------------------------------
    async def replace(self, source: str, sessions: Sequence[Session], *, complete: bool = True,
                      observed: float | None = None) -> None:
        name, now = self.qualified(source), self.intake.engine.clock()
        held = self.intake.engine.inputs.sessions.of_source(name)
        live = [_named(s, name) for s in sessions if s.expires is None or s.expires > now]   # as the book keeps them
        started = [s for s in live if held.get(s.key) != s]
        stopped = [key for key in held if key not in {s.key for s in live}] if complete else []
        await self._publish(name, started, stopped)

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None) -> None:
        await self._publish(self.qualified(source), list(started), list(stopped))

    def keys(self, source: str) -> Collection[str]:
        return self.intake.keys(self.qualified(source))

    def problem(self, source: str, kind: str, detail: str) -> None:
        self.intake.problem(self.qualified(source), kind, detail)   # counted under the name its sessions have

    def address_problem(self, network: Network) -> str | None:
        return self.intake.address_problem(network)

    async def _publish(self, source: str, started: list[Session], stopped: list[str]) -> None:
        for at in range(0, max(len(started), len(stopped)), CHUNK):
            body = {"source": source, "started": [s.to_json() for s in started[at:at + CHUNK]],
                    "stopped": stopped[at:at + CHUNK]}
            result = await self.relay.send(SESSIONS, body)
            if isinstance(result, Refusal):
                raise SessionChangeFailed(result.error)

    # -- the CLI (``walled-garden session start|stop``) -------------------------------------------
    async def handle_event(self, event: Event, source: str) -> Result:
        if source != CLI_SOURCE:
            return await self.intake.handle_event(event, source)
        return await self.relay.send(SESSION_EVENT, {**event_to_wire(event), "source": self.qualified(source)})


def _named(session: Session, source: str) -> Session:
    """``session`` under its fleet-wide source name (``seen``, the book's own stamp, compares equal)."""
    return Session(source, session.key, session.match, session.addresses, session.subscriber, session.expires,
                   detail=session.detail)


async def apply_sessions(intake: SessionIntake, body: dict[str, Any], at: float) -> Result:
    """A ``sessions`` message, applied here: addresses outside this gateway's subscriber
    prefixes are dropped and counted, like a local source drops them."""
    source = body.get("source")
    started_raw, stopped = body.get("started"), body.get("stopped")
    if not (isinstance(source, str) and "/" in source and isinstance(started_raw, list)
            and isinstance(stopped, list) and all(isinstance(k, str) and k for k in stopped)):
        raise MessageError("body: expected source (gateway/name), started (sessions) and stopped (keys)")
    started: list[Session] = []
    for raw in started_raw:
        try:
            session = Session.from_json({**raw, "source": source, "seen": 0.0})
            match = parse_match(raw["match"]) if raw.get("match") else Match()
            if match != session.match or not isinstance(raw.get("key"), str):
                raise ValueError("match keys or key not in their normal form")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MessageError(f"body.started: not a session ({type(exc).__name__}: {exc})") from None
        if not session.key or not (session.match or session.subscriber):
            raise MessageError("body.started: a session has a key and match keys or a subscriber")
        kept = tuple(a for a in session.addresses if not intake.address_problem(a))
        if len(kept) != len(session.addresses):
            intake.problem(source, "outside_prefixes", f"{session.describe()}: addresses outside this gateway's "
                                                       "subscriber prefixes dropped")
        if kept:
            started.append(Session(source, session.key, session.match, kept, session.subscriber, session.expires,
                                   detail=session.detail))
        else:
            stopped.append(session.key)
    try:
        await intake.update(source, started, stopped, observed=at, at=at)
    except SessionChangeFailed as exc:
        return Refusal(Refused.UNAVAILABLE, f"{exc}; retried")
    return Outcome({"source": source, "started": len(started), "stopped": len(stopped)})
