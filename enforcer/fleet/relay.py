"""The fleet's door for inputs accepted here: publish to the stream, then answer with this
gateway's own result once it applied that sequence (``applier.Applier.result``).

A 200 therefore means what it means on a lone gateway (durable here, in this kernel) and, on
top, that JetStream stored the input for every other gateway. NATS unreachable, or this
gateway slower than ``fleet.answer_timeout``: "retry later" (503); billing's retry carries the
same webhook-id, which JetStream (and, later, every gateway's saved answers) turns into one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ..config import FleetConfig
from ..event_sink import EventSink
from ..events import Event
from ..metrics import Metrics
from ..outcome import Refusal, Refused, Result
from .applier import Applier
from .link import Link, Unavailable
from .messages import EVENT, Message, event_body

log = logging.getLogger("walled_garden.enforcer")


class FleetRelay:
    """Implements ``relay.Relay`` for the components (exemptions, promises, approvals)."""

    def __init__(self, config: FleetConfig, link: Link, applier: Applier, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.link, self.applier, self.metrics, self.clock = config, link, applier, metrics, clock

    @property
    def gateway(self) -> str:
        return self.config.gateway

    async def send(self, kind: str, body: dict[str, Any], message_id: str | None = None) -> Result:
        sent = await self.publish(kind, body, message_id)
        if isinstance(sent, Refusal):
            return sent
        seq, started = sent
        result = await self.answer(seq, started)
        return result if result is not None else Refusal(
            Refused.UNAVAILABLE, f"sequence {seq} was applied too long ago to recall its answer")

    async def answer(self, seq: int, started: float) -> Result | None:
        """This gateway's result for ``seq``, waited for within what is left of answer_timeout."""
        remaining = max(self.config.answer_timeout - (time.monotonic() - started), 0.1)
        return await self.applier.result(seq, remaining)

    async def publish(self, kind: str, body: dict[str, Any], message_id: str | None) -> tuple[int, float] | Refusal:
        started = time.monotonic()
        message = Message(kind, self.config.gateway, self.clock(), body)
        try:
            seq, duplicate = await self.link.publish(message.encode(), message_id or f"{kind}:{secrets.token_hex(12)}",
                                                     self.config.answer_timeout)
        except Unavailable as exc:
            self.metrics.fleet_published.labels("unavailable").inc()
            log.warning("event=fleet_publish_failed kind=%s error=%r (answered retry later)", kind, str(exc))
            after_all = ("retry with the same webhook-id: if the stream got it after all, it applies once"
                         if kind == EVENT else "it may still reach the stream and apply; repeating it changes nothing "
                                               "more (it sets a state)")
            return Refusal(Refused.UNAVAILABLE, f"the fleet's stream did not confirm it, retry later ({after_all}): "
                                                f"{exc}")
        self.metrics.fleet_published.labels("duplicate" if duplicate else "accepted").inc()
        return seq, started


class FleetEvents:
    """The ``EventSink`` of a fleet gateway: billing's webhooks and operators' restrict/lift go
    to the stream; their answer is this gateway's result for them."""

    def __init__(self, relay: FleetRelay, local: EventSink, refusal: Callable[[Event], Refusal | None]) -> None:
        self.relay, self.local, self.refusal = relay, local, refusal
        self._inflight: dict[str, asyncio.Future[Result]] = {}

    def count(self, event_type: str, result: str, by: int = 1) -> None:
        self.local.count(event_type, result, by)

    def submit(self, event: Event, received: float, at: float | None = None) -> asyncio.Future[Result]:
        inflight = self._inflight.get(event.id)
        if inflight is not None:
            return inflight
        future = asyncio.ensure_future(self._send(event, received))
        self._inflight[event.id] = future
        future.add_done_callback(lambda _: self._inflight.pop(event.id, None))
        return future

    async def _send(self, event: Event, received: float) -> Result:
        refused = self.refusal(event)
        if refused is not None:
            self.local.count(event.type, "invalid")
            return refused
        message_id = f"event:{event.id}"
        for _ in range(2):
            sent = await self.relay.publish(EVENT, event_body(event), message_id)
            if isinstance(sent, Refusal):
                self.local.count(event.type, "unavailable")
                return Refusal(sent.kind, sent.error, {"id": event.id})
            seq, started = sent
            result = await self.relay.answer(seq, started)
            if result is not None:
                return _checked(result, event.id)
            # A retry of an id the stream took long ago (before a restart here, or answers since
            # evicted): weighed again by every gateway through the stream, never here alone (saved
            # answers make an applied one answer the same and act once).
            message_id = f"event:{event.id}@{seq}"
        return Refusal(Refused.UNAVAILABLE, "the fleet's stream took it before; its answer is gone, retry later",
                       {"id": event.id})


def _checked(result: Result, event_id: str) -> Result:
    """An answer carries the id it answers (never another input's: e.g. a stream re-created under
    positions saved for the old one)."""
    if isinstance(result, Refusal) or result.body.get("id") in (None, event_id):
        return result
    log.error("event=fleet_answer_mismatch id=%s answer_id=%s", event_id, result.body.get("id"))
    return Refusal(Refused.UNAVAILABLE, "the fleet's answer was for another input; retry later", {"id": event_id})
