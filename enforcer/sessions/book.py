"""All current sessions, merged: who holds which address now.

Pure bookkeeping, no I/O and no clock (callers pass ``now``): the policy reads it to add a
subscriber's session addresses, the intake changes it and learns which match keys a change
touched (the subscribers to decide again).

Two sessions may name one address (a lease handed on while the old holder's RADIUS Stop was
lost; a lease file and a BNG script reporting the same address), or overlapping ones (a Kea
delegated /60 still on the books while a BNG gives a /128 inside it to someone else): the newer
one (``seen``) holds what it names, and the older session's overlapping address or prefix is
released whole, so an address re-leased to a paying subscriber is never left walled for the
previous holder. When the newer one ends, the older gets it back unless another newer session
still overlaps it.

Cost: starting or ending a session of k addresses is O(k x (prefix lengths in use in its family +
the sessions overlapping it)), usually one or two dict lookups per address; ``held`` is O(1) for
a session nothing was taken from; ``holder`` is O(prefix lengths in use).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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


Slot = tuple[int, int]            # (IP version, prefix length)
_BITS = {4: 32, 6: 128}


def _masked(value: int, bits: int, plen: int) -> int:
    shift = bits - plen
    return (value >> shift) << shift


def _overlap(a: Network, b: Network) -> bool:
    """``a`` and ``b`` are equal, or one lies within the other."""
    if a.version != b.version:
        return False
    bits, plen = _BITS[a.version], min(a.prefixlen, b.prefixlen)
    return _masked(int(a.network_address), bits, plen) == _masked(int(b.network_address), bits, plen)


class _Spans:
    """The sessions naming each network, per (family, prefix length), so that every session naming
    a network that overlaps a given one is found in O(prefix lengths in use) dict lookups plus the
    answer (the scheme of ``claims.ClaimsIndex``):

    - *equal or containing*: for each length in use up to the network's own, the network masked
      to that length is looked up among the named networks of that length;
    - *inside*: for each length in use, ``inside`` counts per masked key the sessions naming a
      longer network under it, so one lookup lists them.

    A gateway uses few lengths (/32; /128, /64, /56), and with IPv4 host addresses only there is
    no ``inside`` upkeep at all. A length seen for the first time gets its ``inside`` counts by one
    scan of the family's networks; lengths are never dropped (an empty one costs a lookup).
    Networks are keyed by their address as an integer; a network named by one session holds its
    id, by several a list (the usual case allocates no container).
    """

    def __init__(self) -> None:
        self._named: dict[Slot, dict[int, SessionId | list[SessionId]]] = {}
        self._inside: dict[Slot, dict[int, dict[SessionId, int]]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def add(self, network: Network, sid: SessionId) -> None:
        version, plen, value = network.version, network.prefixlen, int(network.network_address)
        named = self._named.get((version, plen))
        if named is None:
            named = self._new_length(version, plen)
        there = named.get(value)
        if there is None:
            named[value] = sid
        elif isinstance(there, list):
            there.append(sid)
        else:
            named[value] = [there, sid]
        bits = _BITS[version]
        for length in self._lengths[version]:
            if length >= plen:
                break
            counts = self._inside[(version, length)].setdefault(_masked(value, bits, length), {})
            counts[sid] = counts.get(sid, 0) + 1

    def remove(self, network: Network, sid: SessionId) -> None:
        version, plen, value = network.version, network.prefixlen, int(network.network_address)
        named = self._named.get((version, plen), {})
        there = named.get(value)
        if isinstance(there, list):
            if sid in there:
                there.remove(sid)
                if len(there) == 1:
                    named[value] = there[0]
        elif there == sid:
            del named[value]
        bits = _BITS[version]
        for length in self._lengths[version]:
            if length >= plen:
                break
            inside = self._inside[(version, length)]
            masked = _masked(value, bits, length)
            counts = inside.get(masked)
            if counts and sid in counts:
                counts[sid] -= 1
                if not counts[sid]:
                    del counts[sid]
                if not counts:
                    del inside[masked]

    def containing(self, network: Network) -> Iterator[SessionId]:
        """Sessions naming ``network`` or a network containing it (one may come more than once)."""
        version, plen, value = network.version, network.prefixlen, int(network.network_address)
        bits = _BITS[version]
        for length in self._lengths[version]:
            if length > plen:
                break
            there = self._named[(version, length)].get(_masked(value, bits, length))
            if there is None:
                continue
            if isinstance(there, list):
                yield from list(there)
            else:
                yield there

    def overlapping(self, network: Network) -> Iterator[SessionId]:
        """Sessions naming a network equal to, containing or inside ``network`` (one may come
        more than once)."""
        yield from self.containing(network)
        inside = self._inside.get((network.version, network.prefixlen))
        if inside is None:
            self._new_length(network.version, network.prefixlen)
            inside = self._inside[(network.version, network.prefixlen)]
        below = inside.get(int(network.network_address))
        if below:
            yield from list(below)

    def _new_length(self, version: int, plen: int) -> dict[int, SessionId | list[SessionId]]:
        bits = _BITS[version]
        inside: dict[int, dict[SessionId, int]] = {}
        for (v, length), named in self._named.items():
            if v != version or length <= plen:
                continue
            for value, there in named.items():
                counts = inside.setdefault(_masked(value, bits, plen), {})
                for sid in there if isinstance(there, list) else (there,):
                    counts[sid] = counts.get(sid, 0) + 1
        self._inside[(version, plen)] = inside
        self._lengths[version] = sorted([*self._lengths[version], plen])
        named_here: dict[int, SessionId | list[SessionId]] = {}
        self._named[(version, plen)] = named_here
        return named_here


class SessionBook:
    def __init__(self, sessions: Iterable[Session] = ()) -> None:
        self.sessions: dict[SessionId, Session] = {}
        self._by_pair: dict[Pair, set[SessionId]] = {}
        self._spans = _Spans()
        self._lost: dict[SessionId, set[Network]] = {}   # what a newer overlapping session took from it
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
        """The addresses of ``session`` it holds now (none overlapped by a newer session's)."""
        sid = session.id
        if sid not in self.sessions:
            return ()
        lost = self._lost.get(sid)
        if lost is None:
            return session.addresses
        return tuple(a for a in session.addresses if a not in lost)

    def holder(self, network: Network) -> Session | None:
        """The session holding ``network`` or a prefix containing it, if any."""
        for sid in self._spans.containing(network):
            session = self.sessions[sid]
            lost = self._lost.get(sid, ())
            if any(a not in lost and a.prefixlen <= network.prefixlen and _overlap(a, network)
                   for a in session.addresses):
                return session
        return None

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
        sid = session.id
        self.sessions[sid] = session
        self._keys.setdefault(session.source, set()).add(session.key)
        change.touched.update(session.pairs())
        for pair in session.pairs():
            self._by_pair.setdefault(pair, set()).add(sid)
        for network in session.addresses:
            self._spans.add(network, sid)
        mine = (session.seen, sid)
        for network in session.addresses:
            for other in self._spans.overlapping(network):
                if other == sid:
                    continue   # a session's own addresses may nest (a /64 and an address in it)
                theirs = self.sessions[other]
                if (theirs.seen, other) > mine:   # a newer session holds it (as ``_remove`` hands back)
                    self._lose(sid, network)
                    continue
                for address in theirs.addresses:
                    if _overlap(address, network) and self._lose(other, address):
                        change.touched.update(theirs.pairs())   # it loses the address

    def _remove(self, session: Session, change: Change) -> None:
        sid = session.id
        del self.sessions[sid]
        self._keys[session.source].discard(session.key)
        change.touched.update(session.pairs())
        for pair in session.pairs():
            ids = self._by_pair.get(pair)
            if ids is not None:
                ids.discard(sid)
                if not ids:
                    del self._by_pair[pair]
        mine = (session.seen, sid)
        older: set[SessionId] = set()   # sessions it may have taken an address from
        for network in session.addresses:
            for other in self._spans.overlapping(network):
                if other != sid and other in self._lost and (self.sessions[other].seen, other) < mine:
                    older.add(other)
        for network in session.addresses:
            self._spans.remove(network, sid)
        self._lost.pop(sid, None)
        for other in older:
            theirs, lost = self.sessions[other], self._lost[other]
            for address in [a for a in lost if any(_overlap(a, n) for n in session.addresses)]:
                if not self._taken(theirs, address):
                    lost.discard(address)
                    change.touched.update(theirs.pairs())   # it gets the address back
            if not lost:
                del self._lost[other]

    def _lose(self, sid: SessionId, network: Network) -> bool:
        """``network`` of session ``sid`` is taken by a newer session; True if it held it until now."""
        lost = self._lost.setdefault(sid, set())
        if network in lost:
            return False
        lost.add(network)
        return True

    def _taken(self, session: Session, network: Network) -> bool:
        """Whether a session newer than ``session`` names a network overlapping ``network``."""
        mine = (session.seen, session.id)
        for other in self._spans.overlapping(network):
            if other != mine[1] and (self.sessions[other].seen, other) > mine:
                return True
        return False
