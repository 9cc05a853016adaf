"""All current sessions, merged: who holds which address now.

Pure bookkeeping, no I/O and no clock (callers pass ``now``): the policy reads it to add a
subscriber's session addresses, the intake changes it and learns which match keys a change
touched (the subscribers to decide again).

Two sessions may name one address (a lease handed on while the old holder's RADIUS Stop was
lost; a lease file and a BNG script reporting the same address): the newer one (``seen``)
holds it, so an address re-leased to a paying subscriber is never left walled for the
previous holder. When the holder ends, the newest remaining session naming it holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from ..match import Pair
from ..model import Network
from .session import Session, SessionId


@dataclass
class Change:
    """What one change did: sessions started (or updated), stopped, and the match pairs whose
    sessions or addresses changed (their subscribers are decided again)."""

    started: list[Session] = field(default_factory=list)
    stopped: list[Session] = field(default_factory=list)
    touched: set[Pair] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.started or self.stopped)

    def merge(self, other: Change) -> None:
        self.started += other.started
        self.stopped += other.stopped
        self.touched |= other.touched


class SessionBook:
    def __init__(self, sessions: Iterable[Session] = ()) -> None:
        self.sessions: dict[SessionId, Session] = {}
        self._by_pair: dict[Pair, set[SessionId]] = {}
        self._holders: dict[Network, set[SessionId]] = {}
        self._owner: dict[Network, SessionId] = {}
        self._keys: dict[str, set[str]] = {}   # source → its session keys (a replace, status, metrics)
        for session in sessions:
            self._add(session, Change())

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sessions)

    def matching(self, pairs: Iterable[Pair]) -> list[Session]:
        """Sessions that carry any of ``pairs``, oldest first."""
        ids: set[SessionId] = set()
        for pair in pairs:
            found = self._by_pair.get(pair)
            if found:
                ids |= found
        if len(ids) <= 1:   # the usual case, asked for every restricted subscriber on a full sync
            return [self.sessions[i] for i in ids]
        return sorted((self.sessions[i] for i in ids), key=lambda s: (s.seen, s.id))

    def held(self, session: Session) -> tuple[Network, ...]:
        """The addresses of ``session`` it holds now (not taken by a newer session)."""
        return tuple(a for a in session.addresses if self._owner.get(a) == session.id)

    def holder(self, network: Network) -> Session | None:
        owner = self._owner.get(network)
        return self.sessions[owner] if owner is not None else None

    def of_source(self, source: str) -> dict[str, Session]:
        return {key: self.sessions[(source, key)] for key in self._keys.get(source, ())}

    def counts(self) -> dict[str, int]:
        """Sessions per source (sources with none left out)."""
        return {source: len(keys) for source, keys in self._keys.items() if keys}

    def next_expiry(self) -> float | None:
        return min((s.expires for s in self.sessions.values() if s.expires is not None), default=None)

    # -- changing -----------------------------------------------------------------------------
    def start(self, sessions: Iterable[Session]) -> Change:
        """Add or update sessions (an update equal to what is held changes nothing)."""
        change = Change()
        for session in sessions:
            current = self.sessions.get(session.id)
            if current == session:
                continue
            if current is not None:
                self._remove(current, change)
            self._add(session, change)
            change.started.append(session)
        return change

    def stop(self, ids: Iterable[SessionId]) -> Change:
        change = Change()
        for sid in ids:
            current = self.sessions.get(sid)
            if current is not None:
                self._remove(current, change)
                change.stopped.append(current)
        return change

    def replace(self, source: str, sessions: Sequence[Session], complete: bool = True) -> Change:
        """Make ``source``'s sessions exactly ``sessions`` (only add and update them when not
        ``complete``)."""
        change = self.start(sessions)
        if complete:
            keep = {s.key for s in sessions}
            change.merge(self.stop([(source, key) for key in self.of_source(source) if key not in keep]))
        return change

    def expire(self, now: float) -> Change:
        """End sessions whose lease ran out."""
        return self.stop([s.id for s in self.sessions.values() if s.expires is not None and s.expires <= now])

    def clock_stepped(self, seconds: float, now: float) -> list[Session]:
        """The wall clock jumped ``seconds`` forward: sessions still running at ``now - seconds``
        end that much later (a RADIUS session's end is its receipt plus the session timeout or
        three interims, so a step would end it early and free a restricted subscriber's address
        until the next Interim-Update). A lease moved this way that really ended is replaced by
        its source's next reading, and a newer session naming the address holds it anyway.
        Returns the moved sessions (to save); the indexes hold ids, so they stay as they are."""
        before = now - seconds
        moved = []
        for sid, session in list(self.sessions.items()):
            if session.expires is not None and session.expires > before:
                self.sessions[sid] = later = replace(session, expires=session.expires + seconds)
                moved.append(later)
        return moved

    # -- indexes ------------------------------------------------------------------------------
    def _add(self, session: Session, change: Change) -> None:
        self.sessions[session.id] = session
        self._keys.setdefault(session.source, set()).add(session.key)
        change.touched.update(session.pairs())
        for pair in session.pairs():
            self._by_pair.setdefault(pair, set()).add(session.id)
        for network in session.addresses:
            self._holders.setdefault(network, set()).add(session.id)
            previous = self._owner.get(network)
            if previous is not None and previous != session.id:
                older = self.sessions[previous]
                if (older.seen, older.id) > (session.seen, session.id):   # as ``_remove`` picks an heir
                    continue
                change.touched.update(older.pairs())   # it loses the address
            self._owner[network] = session.id

    def _remove(self, session: Session, change: Change) -> None:
        del self.sessions[session.id]
        self._keys[session.source].discard(session.key)
        change.touched.update(session.pairs())
        for pair in session.pairs():
            ids = self._by_pair.get(pair)
            if ids is not None:
                ids.discard(session.id)
                if not ids:
                    del self._by_pair[pair]
        for network in session.addresses:
            holders = self._holders.get(network)
            if holders is None:
                continue
            holders.discard(session.id)
            if not holders:
                del self._holders[network]
                self._owner.pop(network, None)
            elif self._owner.get(network) == session.id:
                heir = max((self.sessions[h] for h in holders), key=lambda s: (s.seen, s.id))
                self._owner[network] = heir.id
                change.touched.update(heir.pairs())   # it gets the address back
