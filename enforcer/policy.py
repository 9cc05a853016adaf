"""Who should be restricted, and why: a pure function of the inputs and the time.

Inputs are the last good list from billing, per-subscriber overrides (billing events and
operator actions), payment graces, exemptions, promises to pay, and the rules from config
(escalation ladder, enforcement windows). The rules, in order:

1. an override is the newest word about a subscriber and wins; it lasts until a newer event,
   or until the list itself changes what it says about that subscriber;
2. a payment lifts at once and, for the grace period, keeps the subscriber free even if the
   list still names them (payments are often booked after the next export);
3. otherwise the list decides; a subscriber absent from it is free; a list restriction
   escalates along the ladder (notice → throttle → walled garden) the longer it lasts;
4. an active promise to pay, then an exemption, turn any restriction into freedom, except an
   operator's restriction made after them (a person looked at the case);
5. a restriction that would start or get stricter waits for the next enforcement window,
   unless an operator ordered it; lifting is never delayed.

No I/O and no clock here: callers pass ``now``, so every rule is testable with a fake clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

from .exemptions import Exemption
from .match import ID_KEY, Pair
from .model import SEVERITY, EscalationStep, Mode, Network
from .promises import Promise, settle
from .sessions.book import SessionBook
from .sessions.session import Session
from .subscribers import Subscriber
from .windows import Windows


class Origin(enum.Enum):
    """Who gave an override: billing (a webhook) or a person (the control socket). A person's
    restriction outranks exemptions and windows (rules 4 and 5); billing's does not."""

    BILLING = "billing"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Override:
    """An explicit instruction about one subscriber, newer than the list."""

    restrict: bool
    at: float                       # when this gateway received it (``receipt_clock``)
    cause: str                      # for people: "event <id> (...)" or "operator <user>: <reason>"
    subscriber: Subscriber | None = None   # addresses/mode when ``restrict``
    origin: Origin = Origin.BILLING

    @property
    def operator(self) -> bool:
        """Ordered by a person on the control socket (not billing)."""
        return self.origin is Origin.OPERATOR


@dataclass(frozen=True)
class Grace:
    """A payment: free until ``until`` whatever the list says.

    ``paid_at`` is when this gateway received the payment (``receipt_clock``), the instant it
    is ordered by against overrides; the grace runs from it."""

    paid_at: float
    until: float
    cause: str


@dataclass(frozen=True)
class Readdress:
    """Billing says the subscriber's addresses changed: enforce on the new ones from now on."""

    addresses: tuple[Network, ...]
    at: float
    cause: str


LISTED = "on the restricted list"
_FREE = Mode.FREE


@dataclass(frozen=True)
class Rules:
    """The configured parts of the policy."""

    windows: Windows = field(default_factory=Windows.always)
    escalation: tuple[EscalationStep, ...] = ()


DEFAULT_RULES = Rules()


@dataclass(frozen=True, slots=True)
class Decision:
    """One subscriber's mode now and why; one per listed subscriber (slots: 100k of them)."""

    subscriber_id: str
    mode: Mode
    cause: str
    subscriber: Subscriber | None = None   # set when restricted: what to enforce
    until: float | None = None             # when this decision changes by itself
    pending: Mode | None = None            # a stricter mode waiting for the enforcement window

    @property
    def restricted(self) -> bool:
        return self.mode is not _FREE   # not ``Mode.FREE``: an enum's attribute is a lookup each time


def when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide(subscriber_id: str, listed: Subscriber | None, override: Override | None,
           grace: Grace | None, now: float, readdress: Readdress | None = None, *,
           exemptions: Iterable[Exemption] = (), promise: Promise | None = None,
           listed_since: float | None = None, rules: Rules = DEFAULT_RULES,
           enforced: Decision | None = None) -> Decision:
    """The mode one subscriber should be in at ``now``, given what the kernel enforces now."""
    decision = _decide(subscriber_id, listed, override, grace, now)
    if decision.cause == LISTED and listed is not None and listed_since is not None:
        decision = _escalate(decision, listed, listed_since, rules.escalation, now)
    ordered = override is not None and override.restrict and override.operator and decision.cause == override.cause
    if decision.restricted and (exemptions or promise is not None or (listed is not None and listed.exempt_until)):
        decision = _relieve(decision, listed, override if ordered else None, exemptions, promise, now)
    if readdress is not None and decision.subscriber is not None:
        moved = replace(decision.subscriber, addresses=readdress.addresses)
        decision = replace(decision, subscriber=moved, cause=f"{decision.cause}; addresses from {readdress.cause}")
    if decision.restricted and not ordered:
        decision = _wait_for_window(decision, enforced, rules.windows, now)
    return decision


def _escalate(decision: Decision, listed: Subscriber, since: float, ladder: tuple[EscalationStep, ...],
              now: float) -> Decision:
    mode, step_cause, upcoming = decision.mode, "", None
    for step in ladder:
        if SEVERITY[step.mode] <= SEVERITY[mode]:
            continue
        if now >= since + step.after:
            mode, step_cause = step.mode, f"; escalated to {step.mode.value} after {step.after / 86400:g} days"
        elif upcoming is None or since + step.after < upcoming:
            upcoming = since + step.after
    if mode is decision.mode:
        return replace(decision, until=upcoming) if upcoming else decision
    return replace(decision, mode=mode, subscriber=replace(listed, mode=mode),
                   cause=f"{LISTED} since {when(since)}{step_cause}", until=upcoming)


def _relieve(decision: Decision, listed: Subscriber | None, ordered: Override | None,
             exemptions: Iterable[Exemption], promise: Promise | None, now: float) -> Decision:
    """A promise to pay or an exemption frees the subscriber, unless a person restricted them since."""
    sid = decision.subscriber_id
    if promise is not None and promise.active(now) and (ordered is None or ordered.at < promise.made_at):
        return Decision(sid, Mode.FREE, f"promise to pay made {when(promise.made_at)}, until {when(promise.until)}",
                        until=promise.until)
    active = [e for e in exemptions if e.active(now) and (ordered is None or ordered.at < e.set_at)]
    if listed is not None and listed.exempt_until and now < listed.exempt_until and ordered is None:
        active.append(Exemption(listed.exempt_category or "other", listed.exempt_until, "", "the list", 0.0))
    if active:
        longest = max(active, key=lambda e: e.until)
        return Decision(sid, Mode.FREE, f"{longest.describe()} until {when(longest.until)}; "
                                        f"otherwise: {decision.cause}", until=longest.until)
    return decision


def _wait_for_window(decision: Decision, enforced: Decision | None, windows: Windows, now: float) -> Decision:
    current = enforced if enforced is not None and enforced.restricted else None
    if SEVERITY[decision.mode] <= SEVERITY[current.mode if current else Mode.FREE] or windows.is_open(now):
        return decision
    opens = windows.next_open(now)
    cause = (f"{decision.mode.value} waits for the enforcement window ({windows.describe()}; next opens "
             f"{when(opens) if opens else 'never'}); reason: {decision.cause}")
    if current is not None:
        return replace(current, cause=cause, until=opens, pending=decision.mode)
    return Decision(decision.subscriber_id, Mode.FREE, cause, until=opens, pending=decision.mode)


def _decide(subscriber_id: str, listed: Subscriber | None, override: Override | None,
            grace: Grace | None, now: float) -> Decision:
    # Ends only: a clock stepped back must never make a grace received "in the future" void.
    active_grace = grace if grace is not None and now < grace.until else None
    if override is not None and (grace is None or override.at >= grace.paid_at):
        if not override.restrict:
            return Decision(subscriber_id, Mode.FREE, override.cause)
        assert override.subscriber is not None
        return Decision(subscriber_id, override.subscriber.mode, override.cause, override.subscriber)
    if active_grace is not None:
        return Decision(subscriber_id, Mode.FREE, f"payment grace ({active_grace.cause})",
                        until=active_grace.until if listed is not None else None)
    if listed is not None:
        return Decision(subscriber_id, listed.mode, LISTED, listed)
    return Decision(subscriber_id, Mode.FREE, "not on the restricted list")


@dataclass(frozen=True)
class Snapshot:
    """One subscriber's policy inputs at one moment (``PolicyInputs.snapshot``)."""

    subscriber_id: str
    override: Override | None
    grace: Grace | None
    readdress: Readdress | None
    exemptions: dict[str, Exemption] | None
    promises: list[Promise] | None


_V = TypeVar("_V")


def _put_back(table: dict[str, _V], subscriber_id: str, value: _V | None) -> None:
    """``table[subscriber_id]`` as a snapshot saw it: ``None`` means it had no entry."""
    if value is None:
        table.pop(subscriber_id, None)
    else:
        table[subscriber_id] = value


@dataclass
class PolicyInputs:
    """Everything ``decide`` reads, kept together so the daemon and tests share one shape."""

    listed: dict[str, Subscriber]
    overrides: dict[str, Override]
    graces: dict[str, Grace]
    readdressed: dict[str, Readdress] = field(default_factory=dict)
    exemptions: dict[str, dict[str, Exemption]] = field(default_factory=dict)   # id → category → exemption
    promises: dict[str, list[Promise]] = field(default_factory=dict)           # id → history, oldest first
    listed_since: dict[str, float] = field(default_factory=dict)               # id → first listed (this run)
    rules: Rules = DEFAULT_RULES
    sessions: SessionBook = field(default_factory=SessionBook, repr=False, compare=False)
    _list_exempt: tuple[dict[str, Subscriber], list[Subscriber]] | None = field(
        default=None, init=False, repr=False, compare=False)
    _match_index: tuple[dict[str, Subscriber], dict[Pair, str]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def newest_instant(self) -> float:
        """The newest receipt instant stored (``receipt_clock`` floors its stamps at it, so the
        order of receipt survives a restart after the clock stepped back)."""
        instants = [o.at for o in self.overrides.values()]
        instants += [g.paid_at for g in self.graces.values()]
        instants += [r.at for r in self.readdressed.values()]
        instants += [e.set_at for by_category in self.exemptions.values() for e in by_category.values()]
        instants += [p.made_at for history in self.promises.values() for p in history]
        instants += [s.seen for s in self.sessions.sessions.values()]
        return max(instants, default=0.0)

    def known_ids(self) -> set[str]:
        return set(self.listed) | set(self.overrides) | set(self.graces)

    def promise(self, subscriber_id: str) -> Promise | None:
        history = self.promises.get(subscriber_id)
        return history[-1] if history else None

    def decide(self, subscriber_id: str, now: float, enforced: Decision | None = None) -> Decision:
        exemptions = self.exemptions.get(subscriber_id)
        decision = decide(subscriber_id, self.listed.get(subscriber_id), self.overrides.get(subscriber_id),
                          self.graces.get(subscriber_id), now, self.readdressed.get(subscriber_id),
                          exemptions=exemptions.values() if exemptions else (), promise=self.promise(subscriber_id),
                          listed_since=self.listed_since.get(subscriber_id), rules=self.rules, enforced=enforced)
        if decision.subscriber is not None and self.sessions:
            decision = self._with_sessions(decision)
        return decision

    # -- sessions -------------------------------------------------------------------------------
    def _with_sessions(self, decision: Decision) -> Decision:
        """A restriction covers the addresses the subscriber's current sessions hold too
        (``sessions``): the list names who, the network says where."""
        sid, subscriber = decision.subscriber_id, decision.subscriber
        assert subscriber is not None
        extra: list[Network] = []
        givers: list[str] = []
        for session in self.sessions_of(sid):
            held = [a for a in self.sessions.held(session) if a not in subscriber.addresses and a not in extra]
            if held:
                extra += held
                givers.append(f"{', '.join(map(str, held))} from {session.describe()}")
        if not extra:
            return decision
        # Built directly, not with ``dataclasses.replace`` (ten times the cost; a full sync
        # decides every restricted subscriber).
        s = subscriber
        moved = Subscriber(s.id, s.addresses + tuple(extra), s.mode, s.reason, s.exempt_until, s.exempt_category,
                           s.match)
        d = decision
        return Decision(d.subscriber_id, d.mode, f"{d.cause}; session addresses: {'; '.join(givers)}", moved, d.until,
                        d.pending)

    def match_pairs(self, subscriber_id: str) -> tuple[Pair, ...]:
        """What sessions match this subscriber by: its id and its list entry's match keys."""
        listed = self.listed.get(subscriber_id)
        return ((ID_KEY, subscriber_id),) + (listed.match.pairs() if listed is not None else ())

    def sessions_of(self, subscriber_id: str) -> list[Session]:
        """The sessions that belong to this subscriber (``session_owner``), oldest first."""
        return [s for s in self.sessions.matching(self.match_pairs(subscriber_id))
                if self.session_owner(s) == subscriber_id]

    def session_owner(self, session: Session) -> str | None:
        """The subscriber a session belongs to: the one named by its most specific key (the
        account id, then username, circuit id, remote id, MAC); None when no entry names it."""
        index = self._matches()
        for pair in session.pairs():
            if pair[0] == ID_KEY:
                return pair[1]
            owner = index.get(pair)
            if owner is not None:
                return owner
        return None

    def subscribers_of(self, pairs: Iterable[Pair]) -> set[str]:
        """Subscribers any of ``pairs`` names (to decide again after a session change)."""
        index = self._matches()
        out = set()
        for pair in pairs:
            owner = pair[1] if pair[0] == ID_KEY else index.get(pair)
            if owner is not None:
                out.add(owner)
        return out

    def _matches(self) -> dict[Pair, str]:
        """match pair → listed subscriber, built once per list (the list parser refuses one
        value for two entries, so each pair names one subscriber)."""
        if self._match_index is None or self._match_index[0] is not self.listed:
            index: dict[Pair, str] = {}
            for sid, entry in self.listed.items():
                for pair in entry.match.pairs():
                    index.setdefault(pair, sid)
            self._match_index = (self.listed, index)
        return self._match_index[1]

    def decide_all(self, now: float, enforced: Mapping[str, Decision] | None = None) -> dict[str, Decision]:
        enforced = enforced or {}
        if self.rules.escalation or self.sessions or not self.rules.windows.is_open(now):
            return {sid: self.decide(sid, now, enforced.get(sid)) for sid in self.known_ids() | set(enforced)}
        # Without a ladder, sessions or a closed window, a listed subscriber with no other input
        # is decided by the list alone (rule 3): that decision built directly, as ``decide``
        # would build it (or the one enforced, when it is that already), is a tenth of the cost,
        # and nearly everyone on a 100k list is such a one. The list is walked in its own order.
        listed, overrides, graces, moved = self.listed, self.overrides, self.graces, self.readdressed
        exemptions, promises = self.exemptions, self.promises
        out: dict[str, Decision] = {}
        for sid in (overrides.keys() | graces.keys() | enforced.keys()) - listed.keys():
            out[sid] = self.decide(sid, now, enforced.get(sid))
        for sid, entry in listed.items():
            if (entry.exempt_until or sid in overrides or sid in graces or sid in moved
                    or exemptions.get(sid) or promises.get(sid)):
                out[sid] = self.decide(sid, now, enforced.get(sid))
                continue
            before = enforced.get(sid)   # the same decision already (a restart, a sync that changes nothing)
            if (before is None or before.subscriber is not entry or before.cause is not LISTED
                    or before.mode is not entry.mode or before.until is not None or before.pending is not None):
                before = Decision(sid, entry.mode, LISTED, entry)
            out[sid] = before
        return out

    def next_change(self, now: float, waiting: bool = False) -> float | None:
        """The earliest future instant at which some decision changes without new input.

        Escalation steps are not in here (O(list) to compute); the daemon checks them on a
        slow timer. ``waiting``: some restriction waits for the enforcement window.
        """
        times = [g.until for g in self.graces.values() if g.until > now]
        times += [p.until for h in self.promises.values() for p in h[-1:] if p.active(now)]
        times += [e.until for ex in self.exemptions.values() for e in ex.values() if e.until > now]
        times += [s.exempt_until for s in self.list_exempt() if s.exempt_until and s.exempt_until > now]
        if waiting and self.rules.windows.configured:
            opens = self.rules.windows.next_open(now)
            if opens is not None and opens > now:
                times.append(opens)
        return min(times) if times else None

    def ended_unexpired(self, now: float) -> bool:
        """Has some grace, exemption or promise ended but is still held (``expire`` has not run
        since: just after a start, or a late round)? Then the timer runs at once, so what ended
        is dropped and saved before a clock step back can make it look running again."""
        return (any(g.until <= now for g in self.graces.values())
                or any(e.until <= now for by_category in self.exemptions.values() for e in by_category.values())
                or any(h[-1].outcome == "active" and h[-1].until <= now for h in self.promises.values() if h))

    def snapshot(self, subscriber_id: str) -> Snapshot:
        """One subscriber's overrides, grace, addresses, exemptions and promises, copied."""
        exemptions = self.exemptions.get(subscriber_id)
        promises = self.promises.get(subscriber_id)
        return Snapshot(subscriber_id, self.overrides.get(subscriber_id), self.graces.get(subscriber_id),
                        self.readdressed.get(subscriber_id), dict(exemptions) if exemptions is not None else None,
                        list(promises) if promises is not None else None)

    def restore(self, snapshot: Snapshot) -> None:
        """Put back what ``snapshot`` copied (a change that could not be applied)."""
        sid = snapshot.subscriber_id
        _put_back(self.overrides, sid, snapshot.override)
        _put_back(self.graces, sid, snapshot.grace)
        _put_back(self.readdressed, sid, snapshot.readdress)
        _put_back(self.exemptions, sid, snapshot.exemptions)
        _put_back(self.promises, sid, snapshot.promises)

    def list_exempt(self) -> list[Subscriber]:
        """Listed entries that carry their own exemption (cached per list)."""
        if self._list_exempt is None or self._list_exempt[0] is not self.listed:
            self._list_exempt = (self.listed, [s for s in self.listed.values() if s.exempt_until])
        return self._list_exempt[1]


def session_owners(inputs: PolicyInputs, sids: Iterable[str], also: Mapping[str, Subscriber]) -> set[str]:
    """Who owns the sessions that carry a match key of these subscribers' entries, in
    ``inputs.listed`` or in ``also`` (the list before a change), under the list in force."""
    if not inputs.sessions:
        return set()
    pairs = {pair for sid in sids for entries in (inputs.listed, also)
             if (entry := entries.get(sid)) is not None for pair in entry.match.pairs()}
    pairs.update((ID_KEY, sid) for sid in sids)
    return {owner for s in inputs.sessions.matching(pairs) if (owner := inputs.session_owner(s)) is not None}


def list_changes(old: Mapping[str, Subscriber], new: Mapping[str, Subscriber]) -> set[str]:
    """Ids whose entry the new list adds, removes or alters."""
    changed = {sid for sid in old.keys() ^ new.keys()}
    changed.update(sid for sid in old.keys() & new.keys() if old[sid] != new[sid])
    return changed


def apply_list(inputs: PolicyInputs, new: Mapping[str, Subscriber], now: float | None = None) -> set[str]:
    """Install a new list; overrides about subscribers whose entry changed are superseded.

    Returns the ids whose inputs changed (for re-evaluation). ``listed_since`` starts for
    newly listed ids at ``now`` and ends for ids the list dropped (escalation restarts).
    """
    changed = list_changes(inputs.listed, new)
    for sid in changed:
        inputs.overrides.pop(sid, None)
        inputs.readdressed.pop(sid, None)  # the list's own addresses are the newer word
    for sid in inputs.listed.keys() - new.keys():
        inputs.listed_since.pop(sid, None)
    if now is not None:
        for sid in new.keys() - inputs.listed_since.keys():
            inputs.listed_since[sid] = now
    inputs.listed = dict(new)
    return changed


def expire(inputs: PolicyInputs, now: float, since: float | None = None) -> set[str]:
    """Drop graces, exemptions and promises that ended; returns the ids to re-evaluate.

    A list entry's own exemption is not dropped (the list says it): it counts as ended when its
    end lies after ``since`` (the previous call's ``now``; None: any end up to ``now``), so an
    entry whose date passed long ago is not re-decided and re-saved at every round."""
    ended = {sid for sid, g in inputs.graces.items() if g.until <= now}
    for sid in ended:
        grace = inputs.graces.pop(sid)
        override = inputs.overrides.get(sid)
        if override is not None and override.at < grace.paid_at:
            del inputs.overrides[sid]  # the payment already superseded it
    for sid, by_category in list(inputs.exemptions.items()):
        for category in [c for c, e in by_category.items() if e.until <= now]:
            del by_category[category]
            ended.add(sid)
        if not by_category:
            del inputs.exemptions[sid]
    for sid, history in inputs.promises.items():
        if history and history[-1].outcome == "active" and history[-1].until <= now:
            inputs.promises[sid] = settle(history, now, paid=False)
            ended.add(sid)
    ended.update(s.id for s in inputs.list_exempt()
                 if s.exempt_until and s.exempt_until <= now and (since is None or since < s.exempt_until))
    return ended


def escalation_due(inputs: PolicyInputs, now: float, enforced: Mapping[str, Decision]) -> set[str]:
    """Listed subscribers whose ladder step is due but not yet enforced (O(list), run rarely)."""
    ladder = inputs.rules.escalation
    if not ladder:
        return set()
    due = set()
    for sid, since in inputs.listed_since.items():
        target = max((s for s in ladder if now >= since + s.after), key=lambda s: SEVERITY[s.mode], default=None)
        if target is None:
            continue
        current = enforced.get(sid)
        if current is None or (SEVERITY[current.mode] < SEVERITY[target.mode] and current.pending is None):
            due.add(sid)
    return due


def record_payment(inputs: PolicyInputs, subscriber_id: str, paid_at: float, grace_seconds: float,
                   cause: str, received_at: float | None = None) -> None:
    """A payment supersedes older overrides and opens (or extends) the grace period.

    The grace runs from when we learnt of the payment: a webhook retried for hours must
    still lift the subscriber rather than arrive with its grace already spent.
    """
    override = inputs.overrides.get(subscriber_id)
    if override is not None and override.at <= paid_at:
        del inputs.overrides[subscriber_id]
    previous = inputs.graces.get(subscriber_id)
    until = max(paid_at, received_at if received_at is not None else paid_at) + grace_seconds
    if previous is not None and previous.until > until:
        until = previous.until
    inputs.graces[subscriber_id] = Grace(paid_at, until, cause)
    if subscriber_id in inputs.promises:
        inputs.promises[subscriber_id] = settle(inputs.promises[subscriber_id], paid_at, paid=True)


def clock_stepped(inputs: PolicyInputs, seconds: float, now: float) -> set[str]:
    """The wall clock jumped ``seconds`` forward: durations that run from receipt (payment
    graces, promises) still running at ``now - seconds`` end that much later, so the jump
    costs nobody their freedom. Returns the ids whose inputs changed (to persist)."""
    before = now - seconds
    moved = set()
    for sid, grace in inputs.graces.items():
        if grace.until > before:
            inputs.graces[sid] = replace(grace, until=grace.until + seconds)
            moved.add(sid)
    for sid, history in inputs.promises.items():
        if history and history[-1].outcome == "active" and history[-1].until > before:
            history[-1] = replace(history[-1], until=history[-1].until + seconds)
            moved.add(sid)
    return moved


def record_promise(inputs: PolicyInputs, promise: Promise) -> None:
    inputs.promises.setdefault(promise.subscriber_id, []).append(promise)


def record_exemption(inputs: PolicyInputs, subscriber_id: str, exemption: Exemption) -> None:
    inputs.exemptions.setdefault(subscriber_id, {})[exemption.category] = exemption


def clear_exemption(inputs: PolicyInputs, subscriber_id: str, category: str | None = None) -> list[Exemption]:
    """End one category of exemption (or all); returns what was ended."""
    by_category = inputs.exemptions.get(subscriber_id, {})
    ended = [by_category.pop(c) for c in list(by_category) if category in (None, c)]
    if not by_category:
        inputs.exemptions.pop(subscriber_id, None)
    return ended


def record_override(inputs: PolicyInputs, subscriber_id: str, override: Override) -> None:
    inputs.overrides[subscriber_id] = override


def restricted_ids(decisions: Iterable[Decision]) -> set[str]:
    return {d.subscriber_id for d in decisions if d.restricted}


#: An IPv6 prefix counts once per /56 (a usual per-subscriber delegation) in ``weight``.
IPV6_UNIT = 56


def weight(subscriber: Subscriber | None) -> int:
    """How many subscribers' worth of address space an entry covers, for the mass-change guard:
    an IPv4 prefix counts one per address, an IPv6 prefix one per /56, a subscriber at least 1.
    So one entry with ``100.64.0.0/16`` weighs 65,536 and is held like 65,536 new restrictions."""
    if subscriber is None:
        return 1
    units = 1
    for version, prefixlen, _ in subscriber.keys:   # the kernel's keys: no networks built
        spare = (32 - prefixlen) if version == 4 else (IPV6_UNIT - prefixlen)
        units = max(units, 1 << spare if spare > 0 else 1)
    return units


def preview_list(inputs: PolicyInputs, new: Mapping[str, Subscriber], now: float) -> tuple[int, int]:
    """How much a new list would newly restrict and newly free, without applying it, weighed
    by address space (``weight``)."""
    restricting = lifting = 0
    others = (inputs.overrides.keys() | inputs.graces.keys() | inputs.readdressed.keys() | inputs.exemptions.keys()
              | inputs.promises.keys())
    for sid in list_changes(inputs.listed, new):
        entry = new.get(sid)
        if sid not in inputs.listed and sid not in others:
            # Nothing but the new entry speaks of them (every entry of a first list): free now,
            # and after as the entry says (``decide`` with these inputs, built directly).
            after = entry is not None and entry.mode is not Mode.FREE and not (
                entry.exempt_until and now < entry.exempt_until)
            if after:
                restricting += weight(entry)
            continue
        before = inputs.decide(sid, now).restricted
        exemptions = inputs.exemptions.get(sid)
        after = decide(sid, entry, None, inputs.graces.get(sid), now,
                       exemptions=exemptions.values() if exemptions else (), promise=inputs.promise(sid)).restricted
        if after and not before:
            restricting += weight(new.get(sid))
        if before and not after:
            lifting += weight(inputs.listed.get(sid) or new.get(sid))
    return restricting, lifting
