"""Which subscriber an address belongs to in the kernel, and what the portal may tell them.

The answer comes from the reconciler's mirror of the kernel sets (longest prefix first), not
from the list: the portal must describe what is enforced, and an address the kernel does not
restrict is free whatever the inputs say. Shared by ``queries`` (operators) and
``portal_actions`` (the portal, for its caller only).
"""

from __future__ import annotations

import ipaddress

from .control_protocol import NOT_RESTRICTED, Lookup, PromiseOffer
from .dataplane.layout import mode_map
from .engine import Engine
from .model import Mode
from .promises import Eligibility, eligibility
from .references import References


def promise_eligibility(engine: Engine, sid: str, at: float | None = None) -> Eligibility:
    """May ``sid`` promise to pay now, or at ``at`` (a promise from the fleet's stream is judged
    at the instant its gateway received it, also on a gateway catching up hours later: judged
    at the replay, an earlier promise no longer active or a limit window passed since would let
    this gateway alone accept what the others refused)."""
    now = engine.clock()
    decision = engine.decisions.get(sid)
    override = engine.inputs.overrides.get(sid)
    mode = decision.mode if decision else Mode.FREE
    reason = decision.subscriber.reason if decision and decision.subscriber else ""
    ordered = bool(override and override.restrict and override.operator)
    return eligibility(engine.config.policy.promise_to_pay, engine.inputs.promises.get(sid, []), mode, reason,
                       ordered, now if at is None else min(at, now))


def lookup(engine: Engine, references: References, address: str) -> Lookup:
    """Is this address restricted, in which mode, and why (category only)? ``ValueError`` when
    ``address`` is not an address a subscriber can have."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ValueError(f"{address!r}: a scoped address is never a subscriber's")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    layout = engine.reconciler.layout
    prefixes = sorted((p for p in (layout.prefixes if layout else ()) if p[0] == ip.version), key=lambda p: -p[1])
    for version, plen in prefixes:
        key = str(ipaddress.ip_network(f"{ip}/{plen}", strict=False).network_address)
        sid = engine.reconciler.owner_of(mode_map(version, plen), key)
        decision = engine.decisions.get(sid) if sid else None
        if sid and decision is not None and decision.restricted and decision.subscriber is not None:
            until = engine.acknowledged.get(sid)
            verdict = promise_eligibility(engine, sid)
            return Lookup(str(ip), True, decision.mode.value, decision.subscriber.reason, references.code(sid), sid,
                          until if until and until > engine.clock() else None,
                          PromiseOffer(verdict.eligible, verdict.why, verdict.term or None))
    return Lookup(str(ip), False, Mode.FREE.value, "", "", promise=PromiseOffer(False, NOT_RESTRICTED))
