"""What an operator does on the control socket: restrict or lift one subscriber, and set or
end exemptions. Every action is attributed to the person (``SO_PEERCRED``) and audited.

``restrict``/``lift`` are overrides like billing's events and go the same way, through the
event sink (ordering, batching, answers), marked as a person's (``Origin.OPERATOR``), which
outranks exemptions and enforcement windows.

In a fleet, these actions travel through the fleet's stream (``relay``) and every gateway applies
them with ``apply_change``/``apply_exempt``/``apply_unexempt``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace
from typing import Any

from . import policy
from .engine import Engine
from .event_sink import EventSink
from .events import RELEASED, RESTRICTED, Event
from .exemptions import Exemption
from .input_change import change_inputs
from .outcome import Refusal, Refused, Result
from .relay import Relay
from .subscribers import ListIssue, Subscriber, validate_entry

log = logging.getLogger("walled_garden.enforcer")


class OperatorActions:
    def __init__(self, engine: Engine, events: EventSink) -> None:
        self.engine, self.events = engine, events
        self.relay: Relay | None = None   # the fleet's stream, when the gateway is one of a fleet

    async def change(self, actor: str, sid: str, restrict: bool, note: str, mode: str | None = None,
                     addresses: list[str] | None = None) -> Result:
        """``walled-garden restrict|lift``: an override like a billing event, attributed to a person.
        In a fleet each gateway builds it from its own list (a subscriber may have other addresses
        behind another gateway), so what travels is the operator's request, not this entry."""
        if self.relay is None:
            return await self.apply_change(actor, sid, restrict, note, mode, addresses)
        built = self._override(sid, restrict, mode, addresses)   # refused here first: no half-fleet action
        if isinstance(built, Refusal):
            return built
        return await self.relay.send("operator", {"id": f"op-{secrets.token_hex(8)}", "actor": actor,
                                                  "subscriber": sid, "restrict": restrict, "note": note,
                                                  "mode": mode, "addresses": addresses})

    async def apply_change(self, actor: str, sid: str, restrict: bool, note: str, mode: str | None = None,
                           addresses: list[str] | None = None, event_id: str = "", via: str = "",
                           at: float | None = None) -> Result:
        """The override, here (``event_id``, ``via``, ``at``: the fleet's id for it, where and when it
        was asked)."""
        engine = self.engine
        subscriber = self._override(sid, restrict, mode, addresses)
        if isinstance(subscriber, Refusal):
            return subscriber
        event = Event(event_id or f"op-{secrets.token_hex(8)}", RESTRICTED if restrict else RELEASED, engine.clock(),
                      sid, subscriber, actor=actor, note=note, via=via)
        log.warning("event=operator_action by=%s action=%s subscriber=%s reason=%s via=%s", actor,
                    "restrict" if restrict else "lift", sid, note, via or "-")
        return await asyncio.shield(self.events.submit(event, time.perf_counter(), at))

    def _override(self, sid: str, restrict: bool, mode: str | None, addresses: list[str] | None
                  ) -> Subscriber | Refusal | None:
        """A restriction's entry: this gateway's list entry, with the operator's mode/addresses."""
        engine = self.engine
        subscriber = None
        if restrict:
            decision = engine.decisions.get(sid)
            known = engine.inputs.listed.get(sid) or (decision.subscriber if decision else None)
            listed = [str(a) for a in known.addresses] if known else None
            raw: dict[str, Any] = {"id": sid, "addresses": addresses or listed or None,
                                   "mode": mode or (known.mode.value if known else None),
                                   "reason": known.reason if known else None}
            if known is not None and known.match:
                raw["match"] = known.match.to_json()   # the override keeps following their sessions
            issues: list[ListIssue] = []
            subscriber = validate_entry(raw, "request", issues)
            if subscriber is None:
                hint = "" if addresses or known else " (this subscriber is not on the list: give --address)"
                return Refusal(Refused.INVALID, "; ".join(i.message for i in issues) + hint)
        return subscriber

    async def exempt(self, actor: str, sid: str, category: str, until: float, note: str) -> Result:
        """``walled-garden exempt``: keep a subscriber free until ``until`` whatever the list says."""
        if self.relay is not None:
            return await self.relay.send("exempt", {"actor": actor, "subscriber": sid, "category": category,
                                                    "until": until, "note": note})
        return await self.apply_exempt(actor, sid, category, until, note)

    async def apply_exempt(self, actor: str, sid: str, category: str, until: float, note: str,
                           at: float | None = None, via: str = "") -> Result:
        """Set the exemption here (``at``, ``via``: when and where the fleet received it)."""
        engine = self.engine
        if sid not in engine.inputs.known_ids() and sid not in engine.decisions:
            log.info("event=exemption_for_unknown subscriber=%s kept=yes", sid)  # applies if they are listed later
        by = f"operator {actor} via {via}" if via else f"operator {actor}"
        exemption = Exemption(category, until, note, by, 0.0)   # set_at: its receipt
        log.warning("event=exemption_set by=%s subscriber=%s category=%s until=%s note=%s", actor, sid, category,
                    policy.when(until), note)
        return await change_inputs(
            engine, sid, lambda at: policy.record_exemption(engine.inputs, sid, replace(exemption, set_at=at)),
            f"exemption set by {by}: {category} until {policy.when(until)}: {note or 'no note'}", at)

    async def unexempt(self, actor: str, sid: str, category: str | None, note: str) -> Result:
        if self.relay is not None:
            return await self.relay.send("unexempt", {"actor": actor, "subscriber": sid, "category": category,
                                                      "note": note})
        return await self.apply_unexempt(actor, sid, category, note)

    async def apply_unexempt(self, actor: str, sid: str, category: str | None, note: str,
                             at: float | None = None, via: str = "") -> Result:
        engine = self.engine
        by = f"operator {actor} via {via}" if via else f"operator {actor}"
        current = engine.inputs.exemptions.get(sid, {})
        if not current or (category and category not in current):
            return Refusal(Refused.NOT_FOUND, f"{sid} has no {category + ' ' if category else ''}exemption")
        log.warning("event=exemption_ended by=%s subscriber=%s category=%s note=%s", actor, sid, category or "all",
                    note)
        return await change_inputs(engine, sid, lambda _: policy.clear_exemption(engine.inputs, sid, category),
                                   f"exemption ({category or 'all'}) ended by {by}: {note or 'no note'}", at)
