"""What the portal may ask for a customer: look up their own address, acknowledge a notice
("continue"), and promise to pay.

The portal acts only for an address the kernel saw connect to it recently (the table's
``portalcaller`` sets, read on a reader of its own): even a compromised portal process
cannot enumerate subscribers, lift anyone else, or promise in their name.

In a fleet, the gateway whose portal was used checks the caller and hands the acknowledgement or
promise, by subscriber id, to the fleet's stream (``relay``); every gateway then applies it with
``apply_acknowledge``/``apply_promise``, and only the accepting one tells billing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import sqlite3
from typing import Any

from . import policy
from .address_lookup import lookup, promise_eligibility
from .audit import state as audit_state
from .control_protocol import NOT_RESTRICTED, Acknowledged, Promised, not_a_recent_caller
from .dataplane.backend import DataplaneError
from .engine import ACKNOWLEDGED, Engine
from .input_change import change_inputs
from .metrics import Metrics
from .model import Mode
from .outcome import Outcome, Refusal, Refused, Result
from .promises import Promise
from .references import References
from .relay import Relay
from .store import StoreError

log = logging.getLogger("walled_garden.enforcer")
NOT_AVAILABLE = "a promise to pay is not available for this connection"



def promise_message_id(sid: str, made_at: float) -> str:
    """The ``webhook-id`` of a promise's ``promise.made``: the same for the same promise (its
    subscriber and the instant its fleet message carries, else the local one), so when a gateway
    rebuilt from the fleet's stream tells billing of a promise again (its outbox went with its
    state), billing sees the message it already has."""
    return "wg_promise_" + hashlib.blake2b(f"{sid}\0{made_at!r}".encode(), digest_size=12).hexdigest()

class _Ineligible(Exception):
    """Raised under the lock when a second press finds the promise no longer available."""




class PortalActions:
    def __init__(self, engine: Engine, references: References, metrics: Metrics) -> None:
        self.engine, self.references, self.metrics = engine, references, metrics
        self.outbox_wake = asyncio.Event()   # a new outgoing webhook is waiting
        self.relay: Relay | None = None      # the fleet's stream, when the gateway is one of a fleet
        engine.on_replaced.append(self._reacknowledge)
        # The kernel keeps an acknowledgement (a timeout element) across a restart; so must we,
        # or the portal and /api/captive call the subscriber captive again while HTTP passes,
        # and a later table replace would not put it back (``_reacknowledge``).
        saved = engine.store.get_meta(ACKNOWLEDGED)
        now = engine.clock()
        engine.acknowledged.update({sid: float(until) for sid, until in (saved or {}).items()
                                    if isinstance(sid, str) and isinstance(until, (int, float)) and until > now}
                                   if isinstance(saved, dict) else {})

    async def _not_a_caller(self, address: str, action: str) -> Refusal | None:
        """None when the kernel saw ``address`` connect to the portal recently."""
        try:
            seen = await asyncio.to_thread(self.engine.reconciler.dataplane.reader().recent_caller, address)
        except DataplaneError as exc:
            return Refusal(Refused.UNAVAILABLE, f"cannot check the caller in the kernel: {exc}")
        if seen:
            return None
        self.metrics.portal_refusals.labels(action).inc()
        log.warning("event=portal_action_refused action=%s address=%s why=not_a_recent_caller", action, address)
        wire = not_a_recent_caller()
        return Refusal(Refused.FORBIDDEN, wire.error, {"eligible": wire.eligible, "why": wire.why})

    async def lookup(self, address: str) -> Result:
        """``lookup`` for the portal: only of an address the kernel saw connect to the portal."""
        refused = await self._not_a_caller(address, "lookup")
        return refused if refused is not None else Outcome(lookup(self.engine, self.references, address).to_json())

    async def acknowledge(self, address: str) -> Result:
        """A notice/throttle subscriber pressed "continue": stop redirecting their HTTP for a while."""
        refused = await self._not_a_caller(address, "acknowledge")
        if refused is not None:
            return refused
        engine = self.engine
        found = lookup(engine, self.references, address)
        if not found.restricted:
            return Outcome(Acknowledged(False, mode=Mode.FREE).to_json())
        if found.mode == Mode.WALLED_GARDEN.value:
            return Refusal(Refused.CONFLICT, "this connection is in the walled garden; it cannot be acknowledged away")
        if self.relay is not None:
            return await self.relay.send("acknowledge", {"subscriber": found.subscriber, "address": found.address})
        return await self.apply_acknowledge(found.subscriber, found.address)

    async def apply_acknowledge(self, sid: str, address: str, via: str = "", at: float | None = None) -> Result:
        """Stop redirecting ``sid``'s HTTP for ``portal.notice_ack_for`` (``via``: the fleet gateway
        whose portal was used).

        ``at``: when that gateway received it. The acknowledgement runs from then (an ``at`` ahead
        of this clock counts as now, as for receipt instants): a gateway applying it hours later
        (catching up) lets the subscriber through only for what is left of it, nothing once it
        is over, as every other gateway does, instead of for a full term from its own catch-up."""
        engine = self.engine
        start = engine.clock() if at is None else min(at, engine.clock())
        until = start + float(engine.config.portal.notice_ack_for)
        async with engine.lock:
            now = engine.clock()
            if until <= now:   # over already: nothing to let through
                log.info("event=notice_acknowledgement_over subscriber=%s until=%d via=%s", sid, until, via or "-")
                return Outcome(Acknowledged(True, until).to_json())
            decision = engine.decisions.get(sid)
            if decision is None or decision.mode not in (Mode.NOTICE, Mode.THROTTLE):
                return Refusal(Refused.CONFLICT, "the restriction changed; reload the page")
            try:   # the kernel counts whole seconds: what is left, rounded up
                await engine.kernel(engine.reconciler.acknowledge, decision, max(math.ceil(until - now), 1))
            except DataplaneError as exc:
                return Refusal(Refused.UNAVAILABLE, f"kernel change failed: {exc}")
            engine.acknowledged[sid] = until
            now = engine.clock()
            try:   # kept for a restart; the kernel change stands either way (it expires)
                engine.store.set_meta(ACKNOWLEDGED, {s: u for s, u in engine.acknowledged.items() if u > now})
            except (StoreError, sqlite3.Error) as exc:
                log.error("event=acknowledgement_not_saved subscriber=%s error=%s", sid, str(exc))
            state = audit_state(decision)
            try:   # audited like every portal action; the kernel change stands either way (it expires)
                engine.store.append_audit([(engine.clock(), sid, state, state, f"notice acknowledged on the portal "
                                            f"{'of ' + via + ' ' if via else ''}from {address} until "
                                            f"{policy.when(until)}")])
            except (StoreError, sqlite3.Error) as exc:
                log.error("event=audit_not_saved subscriber=%s error=%s", sid, str(exc))
        log.info("event=notice_acknowledged subscriber=%s address=%s until=%d", sid, address, until)
        return Outcome(Acknowledged(True, until).to_json())

    async def promise(self, address: str) -> Result:
        """The portal's "I promise to pay" button: lift for the configured term, tell billing."""
        refused = await self._not_a_caller(address, "promise")
        if refused is not None:
            return refused
        engine = self.engine
        found = lookup(engine, self.references, address)
        sid = found.subscriber
        if not found.restricted or not sid:
            return Refusal(Refused.CONFLICT, "this connection is not restricted",
                           {"eligible": False, "why": NOT_RESTRICTED})
        verdict = promise_eligibility(engine, sid)
        if not verdict.eligible:
            self.metrics.promises.labels("refused").inc()
            return Refusal(Refused.FORBIDDEN, NOT_AVAILABLE, {"eligible": False, "why": verdict.why})
        if self.relay is not None:
            return await self.relay.send("promise", {"subscriber": sid, "address": found.address})
        return await self.apply_promise(sid, found.address)

    async def apply_promise(self, sid: str, address: str, at: float | None = None, via: str = "",
                            notify: bool = True) -> Result:
        """Record ``sid``'s promise made from ``address`` if it is still available; ``notify``: tell
        billing (in a fleet, only the gateway whose portal was used does)."""
        engine = self.engine
        verdict = promise_eligibility(engine, sid, at)
        if not verdict.eligible:
            self.metrics.promises.labels("refused").inc()
            return Refusal(Refused.FORBIDDEN, NOT_AVAILABLE, {"eligible": False, "why": verdict.why})
        made: dict[str, Any] = {}

        def record(now: float) -> None:
            # Again, under the lock: a second press (another address of theirs, a double click)
            # may have waited for the lock while the first one made its promise.
            again = promise_eligibility(engine, sid, now)
            if not again.eligible:
                raise _Ineligible(again.why)
            promise = Promise(sid, now, now + verdict.term, address=address)
            policy.record_promise(engine.inputs, promise)
            made.update(until=promise.until, made_at=now)
            if notify and engine.config.policy.promise_to_pay.webhook_url:
                # from the stream's own instant when there is one: ``now`` is this gateway's receipt
                # stamp, which a replay after a wipe may place elsewhere (review)
                message = made["message"] = promise_message_id(sid, now if at is None else at)
                engine.store.add_outbox(message, {"type": "promise.made", "timestamp": policy.when(now), "data": {
                    "subscriber": sid, "until": policy.when(promise.until), "reference": self.references.code(sid),
                    "address": address}}, now)
        try:
            result = await change_inputs(engine, sid, record, "promise to pay made on the portal"
                                         + (f" of {via}" if via else ""), at)
        except _Ineligible as exc:
            self.metrics.promises.labels("refused").inc()
            kind = Refused.CONFLICT if str(exc) == NOT_RESTRICTED else Refused.FORBIDDEN
            return Refusal(kind, NOT_AVAILABLE, {"eligible": False, "why": str(exc)})
        if isinstance(result, Refusal):
            if "message" in made:   # the kernel change failed and the promise was undone: billing must not hear of it
                await asyncio.to_thread(engine.store.outbox_delivered, made["message"])
            return result
        self.metrics.promises.labels("made").inc()
        self.outbox_wake.set()
        log.warning("event=promise_made subscriber=%s address=%s until=%s via=%s", sid, address,
                    policy.when(made["until"]), via or "-")
        return Outcome(Promised(True, made["until"], mode=result.body["mode"]).to_json())

    async def _reacknowledge(self) -> None:
        """After a table replace: notice acknowledgements still running go back in (lock held).
        Those over, or whose subscriber left notice and throttle, are forgotten (and saved so) as
        an element diff forgets them (``Engine.forget_acknowledgements``)."""
        engine = self.engine
        engine.forget_acknowledgements(list(engine.acknowledged))
        now = engine.clock()
        for sid, until in list(engine.acknowledged.items()):
            decision = engine.decisions[sid]
            try:
                await engine.kernel(engine.reconciler.acknowledge, decision, max(math.ceil(until - now), 1))
            except DataplaneError as exc:
                log.warning("event=acknowledgement_not_restored subscriber=%s error=%s", sid, str(exc))
