"""What operators ask (``status``, ``explain``, ``lookup``, ``audit``): read-only views of the
engine, answered without the lock from state that only changes on the event loop.

``explain`` lists every input that bears on a subscriber in the order the policy weighs them,
so support can answer "why am I cut off?" without reading code.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from . import policy
from .address_lookup import lookup, promise_eligibility
from .enforced import held
from .engine import Engine
from .model import Mode, Network
from .policy import Decision
from .references import References
from .sessions.session import Session


class Queries:
    def __init__(self, engine: Engine, references: References) -> None:
        self.engine, self.references = engine, references

    def lookup(self, address: str) -> dict[str, Any]:
        return lookup(self.engine, self.references, address).to_json()

    def audit(self, subscriber: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        return self.engine.store.audit(subscriber, since, limit)

    def status(self) -> dict[str, Any]:
        engine = self.engine
        inputs, counts, now = engine.inputs, engine.record.mode_counts, engine.clock()
        report = {key: section() for key, section in engine.reports.items()}
        report.setdefault("tasks", {})
        return report | {
            "modes": {m.value: counts.get(m, 0) for m in Mode.restricting()},
            "last_sync": engine.last_sync,
            "kernel_in_sync": not engine.reconciler.needs_full,
            "graces": len(inputs.graces),
            "overrides": len(inputs.overrides),
            "exemptions": sum(len(e) for e in inputs.exemptions.values()),
            "promises_active": sum(1 for h in inputs.promises.values() if h and h[-1].active(now)),
            "rebuilding_from_kernel": engine.rebuilding is not None,
            "table_repairs": engine.table_repairs,
            "waiting_for_window": len(engine.record.waiting),
            "address_conflicts": dict(sorted(engine.conflicts.items())[:20]),
            "address_conflicts_total": len(engine.conflicts),
            "windows": inputs.rules.windows.describe(),
            "outbox": engine.store.outbox_size(),
            "state": {"quarantined": engine.store.quarantined, "rows_quarantined": engine.store.skipped_count,
                      "skipped_rows": engine.store.skipped_rows[:20],
                      "kept_from_kernel": None if engine.rebuilding is None else {
                          "addresses": len(engine.rebuilding),
                          "why": "a first list was being saved when the daemon stopped" if engine.rebuild_unsaved
                          else "the state was lost"},
                      "rebuilt": engine.rebuilt},
        }

    def explain(self, query: str) -> dict[str, Any]:
        """Why a subscriber (by id, address or reference code) is or is not restricted."""
        engine, inputs = self.engine, self.engine.inputs
        query = query.strip()
        sid: str | None = None
        address = None
        giver: Session | None = None   # the session holding the address asked about
        if query in inputs.known_ids() or query in engine.decisions or query in inputs.exemptions:
            sid = query
        else:
            probe = _address_of(query)
            try:
                address = lookup(self.engine, self.references, probe)
                giver = self._session_at(probe)
                sid = address.subscriber or self._holder_of(probe, giver)
            except ValueError:
                sid = self.references.find(query, inputs.known_ids())
        given = {"session": self._session_json(giver)} if giver is not None else {}
        if sid is None:
            why = ("no restricted subscriber holds this address" if address else
                   "not a subscriber id, address or reference code this gateway knows")
            if giver is not None:
                why += f"; {giver.source} session {giver.key} holds it, a session of no listed subscriber (a paying " \
                       "customer)"
            return {"query": query, "found": False, "restricted": False, "why": why} | given
        now = engine.clock()
        enforced = engine.decisions.get(sid)
        decision = inputs.decide(sid, now, enforced)
        listed, override, grace = inputs.listed.get(sid), inputs.overrides.get(sid), inputs.graces.get(sid)
        return {
            "query": query, "found": True, "subscriber": sid, "reference": self.references.code(sid),
            "restricted": decision.restricted, "mode": decision.mode.value, "why": decision.cause,
            "until": decision.until, "pending": decision.pending.value if decision.pending else None,
            "chain": self._chain(sid, now, decision),
            "exemptions": [e.to_json() for e in inputs.exemptions.get(sid, {}).values()],
            "promises": [p.to_json() for p in inputs.promises.get(sid, [])],
            "promise_eligibility": promise_eligibility(engine, sid).why,
            "listed_since": inputs.listed_since.get(sid),
            "windows": inputs.rules.windows.describe(),
            "audit": engine.store.audit(sid, limit=10),
            "addresses": [str(a) for a in decision.subscriber.addresses] if decision.subscriber else [],
            "list": listed.to_json() if listed else None,
            "sessions": [{"source": s.source, "key": s.key, "match": s.match.to_json(),
                          "addresses": [str(a) for a in inputs.sessions.held(s)], "expires": s.expires,
                          "seen": s.seen, "detail": s.detail} for s in inputs.sessions_of(sid)],
            "override": ({"restrict": override.restrict, "at": override.at, "cause": override.cause}
                         if override else None),
            "payment_grace": {"paid_at": grace.paid_at, "until": grace.until, "cause": grace.cause} if grace else None,
            "enforced_in_kernel": (enforced.mode.value if enforced and enforced.restricted else Mode.FREE.value),
            "notice_acknowledged_until": engine.acknowledged.get(sid),
            "address_conflict": self._clash(sid, decision),
        } | given

    def _clash(self, sid: str, decision: Decision) -> dict[str, Any] | None:
        """Why a restriction the policy wants is not in the kernel: another subscriber holds one
        of its addresses (``status``'s ``address_conflicts`` entry, with the address and holder
        as they stand now when the claims still say so). None when there is no clash: without
        this the header said RESTRICTED while the kernel held the subscriber free."""
        noted = self.engine.conflicts.get(sid)
        if noted is None or not decision.restricted:   # paid meanwhile: the timer's retry drops the entry
            return None
        clash = dict(noted)
        found = self.engine.claims.conflict(sid, held(decision))
        if found is not None:
            clash |= {"address": _shown(found.network), "holder": found.holder, "holders_address": _shown(found.theirs)}
        return clash

    def _session_at(self, address: str) -> Session | None:
        """The session holding ``address`` (or a prefix containing it) now, whoever it belongs
        to: SPEC §9, ``explain`` shows which session gave an address, a paying customer's too."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return self.engine.inputs.sessions.holder(ipaddress.ip_network(ip))

    def _session_json(self, session: Session) -> dict[str, Any]:
        """A session for ``explain``: where it comes from, whose it is (``subscriber``: the listed
        subscriber it belongs to, None for a paying customer's), what it holds and until when."""
        inputs = self.engine.inputs
        return {"source": session.source, "key": session.key, "match": session.match.to_json(),
                "subscriber": inputs.session_owner(session),
                "addresses": [str(a) for a in inputs.sessions.held(session)], "expires": session.expires,
                "seen": session.seen, "detail": session.detail}

    def _holder_of(self, address: str, giver: Session | None) -> str | None:
        """Which known subscriber's addresses contain ``address`` (restricted or not): the owner
        of the session holding it (``giver``), else O(list), for the operator's ``explain`` of
        someone a promise, grace or exemption freed."""
        ip = ipaddress.ip_address(address)
        inputs = self.engine.inputs
        if giver is not None:
            owner = inputs.session_owner(giver)
            if owner is not None:
                return owner
        sources = [inputs.listed.items(), ((sid, o.subscriber) for sid, o in inputs.overrides.items() if o.subscriber)]
        for pairs in sources:
            for sid, subscriber in pairs:
                if any(ip.version == n.version and ip in n for n in subscriber.addresses):
                    return sid
        return None

    def _chain(self, sid: str, now: float, decision: Decision) -> list[str]:
        """Every input that bears on the subscriber, in the order the policy weighs them."""
        when, inputs = policy.when, self.engine.inputs
        chain = []
        listed = inputs.listed.get(sid)
        if listed is None:
            chain.append("list: not on the restricted list in force")
        else:
            since = inputs.listed_since.get(sid)
            chain.append(f"list: {listed.mode.value} (reason {listed.reason or 'none'})"
                         + (f", listed since {when(since)}" if since else ""))
            if listed.exempt_until:
                chain.append(f"list: exempt ({listed.exempt_category}) until {when(listed.exempt_until)}")
        if inputs.rules.escalation:
            chain.append("escalation ladder: " + ", ".join(f"{s.mode.value} after {s.after / 86400:g} d"
                                                             for s in inputs.rules.escalation))
        for session in inputs.sessions_of(sid):
            held = inputs.sessions.held(session)
            chain.append(f"session: {session.describe()} gives {', '.join(map(str, held)) or 'no address now'}"
                         + (f" until {when(session.expires)}" if session.expires else ""))
        override = inputs.overrides.get(sid)
        if override is not None:
            chain.append(f"override: {'restrict' if override.restrict else 'lift'} at {when(override.at)} "
                         f"by {override.cause}")
        grace = inputs.graces.get(sid)
        if grace is not None:
            state = "in force" if grace.until > now else "ended"
            chain.append(f"payment grace {state} until {when(grace.until)} ({grace.cause})")
        for promise in inputs.promises.get(sid, [])[-3:]:
            chain.append(f"promise to pay {when(promise.made_at)} - {when(promise.until)}: {promise.outcome}")
        for exemption in inputs.exemptions.get(sid, {}).values():
            chain.append(f"{exemption.describe()} until {when(exemption.until)}")
        if decision.pending is not None:
            chain.append(f"window: {decision.pending.value} waits; windows are {inputs.rules.windows.describe()}")
        chain.append(f"result: {decision.mode.value}: {decision.cause}")
        return chain


def _shown(network: Network) -> str:
    """An address as an operator writes it: without ``/32`` or ``/128``, a prefix with its length."""
    return str(network.network_address) if network.prefixlen == network.max_prefixlen else str(network)


def _address_of(query: str) -> str:
    """A prefix as the list writes it (``100.64.0.11/32``, ``2001:db8:10:100::/56``) stands
    for its network address; anything else is asked as it is."""
    if "/" in query:
        try:
            return str(ipaddress.ip_network(query, strict=False).network_address)
        except ValueError:
            pass
    return query
