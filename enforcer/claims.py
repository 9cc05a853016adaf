"""Who holds which addresses: one index, so no input can wall a neighbour (safety rules).

An address or prefix belongs to at most one subscriber's enforcement. The kernel's sets are
keyed per (family, prefix length), so a clash of *equal* keys is easy to see, but a
``subscriber.restricted`` naming ``100.64.0.0/16`` clashes with every subscriber inside it
without sharing a single key. This index answers "does this network overlap anyone else's?"
in O(prefix lengths in use):

- *containing or equal*: for each length in use up to the network's own, the network masked
  to that length is looked up among the held networks of that length;
- *contained*: for each length in use, ``inside`` counts the held networks of longer prefixes
  under each masked key, so one lookup says whether anything lies within.

Held networks are looked up by their key's text (the string the list entry holds, so the index
adds no string of its own), masked ones computed as integers; lengths per family are few (a
gateway uses /32 and /128, /64 and /56, maybe a /29), so a 100k-subscriber index is a few dicts.
A length seen for the first time gets its ``inside`` counts by one scan of the held networks.
What each subscriber holds is kept as the kernel's keys (``subscribers.Key``), the very tuples
the list entries hold (``rebuild_keys``), not as ``ipaddress`` networks (~430 bytes each).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from .model import Mode, Network
from .policy import Decision
from .subscribers import Key, Subscriber, key_network, network_key

log = logging.getLogger("walled_garden.enforcer")

Slot = tuple[int, int]            # (IP version, prefix length)
_BITS = {4: 32, 6: 128}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _value(key: Key) -> int:
    """The key's address as an integer (``int(network.network_address)``)."""
    return int.from_bytes(socket.inet_pton(_FAMILIES[key[0]], key[2]), "big")


def _text(value: int, version: int) -> str:
    """``_value``'s inverse: the address as the kernel's keys spell it (``inet_ntop``)."""
    return socket.inet_ntop(_FAMILIES[version], value.to_bytes(_BITS[version] // 8, "big"))


def _masked(value: int, version: int, plen: int) -> int:
    shift = _BITS[version] - plen
    return (value >> shift) << shift


class Conflict(ValueError):
    """A network overlaps one another subscriber holds."""

    def __init__(self, network: Network, holder: str, theirs: Network) -> None:
        relation = "is" if network == theirs else ("lies within" if network.prefixlen > theirs.prefixlen
                                                    else "covers")
        super().__init__(f"{network} {relation} {theirs}, held by subscriber {holder}")
        self.network, self.holder, self.theirs = network, holder, theirs


class ClaimsIndex:
    def __init__(self) -> None:
        self.held: dict[str, tuple[Key, ...]] = {}
        self._exact: dict[Slot, dict[str, str]] = {}   # keyed by the key's text, the entries' own string
        self._inside: dict[Slot, dict[int, dict[str, int]]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    # -- queries -----------------------------------------------------------------------
    def conflict(self, sid: str, networks: Iterable[Network]) -> Conflict | None:
        """The first overlap of ``networks`` with a network another subscriber holds."""
        for network in networks:
            found = self._overlap(sid, network)
            if found is not None:
                return found
        return None

    def _overlap(self, sid: str, network: Network) -> Conflict | None:
        version, plen = network.version, network.prefixlen
        value = int(network.network_address)
        for length in self._lengths[version]:
            if length > plen:
                break
            holder = self._exact[(version, length)].get(_text(_masked(value, version, length), version))
            if holder is not None and holder != sid:
                return Conflict(network, holder, self._network_of(holder, network, length))
        self._ensure_inside(version, plen)
        below = self._inside[(version, plen)].get(value)
        if below:
            for holder in below:
                if holder != sid:
                    return Conflict(network, holder, self._network_of(holder, network, None))
        return None

    def _network_of(self, holder: str, near: Network, length: int | None) -> Network:
        """Which of ``holder``'s networks overlaps ``near`` (for the message)."""
        for theirs in map(key_network, self.held.get(holder, ())):
            if theirs.version == near.version and (theirs.subnet_of(near) or  # type: ignore[arg-type]
                                                   theirs.supernet_of(near)):  # type: ignore[arg-type]
                return theirs
        return near

    # -- changes -------------------------------------------------------------------------
    def claim(self, sid: str, networks: Iterable[Network]) -> tuple[Network, ...]:
        """Make ``networks`` the ones ``sid`` holds (none: release); returns what they held."""
        previous = self.held.pop(sid, ())
        for key in previous:
            self._remove(sid, key)
        for network in networks:   # held grows as they are added: see _ensure_inside
            key = network_key(network)
            self._add(sid, key)
            self.held[sid] = (*self.held.get(sid, ()), key)
        return tuple(map(key_network, previous))

    def rebuild(self, holdings: Mapping[str, Iterable[Network]]) -> None:
        """``rebuild_keys`` from networks."""
        self.rebuild_keys({sid: tuple(map(network_key, networks)) for sid, networks in holdings.items()})

    def rebuild_keys(self, holdings: Mapping[str, tuple[Key, ...]]) -> None:
        """Start over from what the kernel holds (after a full sync), in bulk: one pass fills the
        exact keys, ``inside`` is counted per length in use (100k /32s: no such work at all).
        ``holdings`` (subscriber → ``Subscriber.keys``) must not overlap (the reconciler left
        every clash out); the tuples are kept as they are, shared with the list entries."""
        self.held = {sid: keys for sid, keys in holdings.items() if keys}
        exact: dict[Slot, dict[str, str]] = {}
        for sid, held in self.held.items():
            for key in held:
                slot = key[:2]
                texts = exact.get(slot)
                if texts is None:
                    texts = exact[slot] = {}
                texts[key[2]] = sid
        self._exact = exact
        self._lengths = {version: sorted(p for v, p in exact if v == version) for version in (4, 6)}
        self._inside = {}
        for version, length in exact:
            counts: dict[int, dict[str, int]] = {}
            for (v, plen), texts in exact.items():
                if v == version and plen > length:
                    for text, sid in texts.items():
                        slot_counts = counts.setdefault(_masked(_value((v, plen, text)), version, length), {})
                        slot_counts[sid] = slot_counts.get(sid, 0) + 1
            self._inside[(version, length)] = counts

    def _add(self, sid: str, key: Key) -> None:
        version, plen = key[0], key[1]
        value = _value(key)
        if plen not in self._lengths[version]:
            self._new_length(version, plen)
        self._exact[(version, plen)][key[2]] = sid
        for length in self._lengths[version]:
            if length >= plen:
                break
            counts = self._inside[(version, length)].setdefault(_masked(value, version, length), {})
            counts[sid] = counts.get(sid, 0) + 1

    def _remove(self, sid: str, key: Key) -> None:
        version, plen = key[0], key[1]
        value = _value(key)
        exact = self._exact.get((version, plen), {})
        if exact.get(key[2]) == sid:
            del exact[key[2]]
        for length in self._lengths[version]:
            if length >= plen:
                break
            masked = _masked(value, version, length)
            counts = self._inside[(version, length)].get(masked)
            if counts and sid in counts:
                counts[sid] -= 1
                if not counts[sid]:
                    del counts[sid]
                if not counts:
                    del self._inside[(version, length)][masked]

    def _new_length(self, version: int, plen: int) -> None:
        self._lengths[version] = sorted([*self._lengths[version], plen])
        self._exact[(version, plen)] = {}
        self._ensure_inside(version, plen)

    def _ensure_inside(self, version: int, plen: int) -> None:
        """Counts of held longer prefixes under each /plen key (one scan, first time only)."""
        if (version, plen) in self._inside:
            return
        counts: dict[int, dict[str, int]] = {}
        for sid, held in self.held.items():
            for key in held:
                if key[0] == version and key[1] > plen:
                    slot = counts.setdefault(_masked(_value(key), version, plen), {})
                    slot[sid] = slot.get(sid, 0) + 1
        self._inside[(version, plen)] = counts
        if plen not in self._lengths[version]:
            # tracked for ``inside`` upkeep from now on, though nothing of this length is held
            self._lengths[version] = sorted([*self._lengths[version], plen])
            self._exact.setdefault((version, plen), {})


def held_back(sid: str) -> Decision:
    """What the kernel holds for a restricted subscriber every one of whose addresses another
    holds: nothing, so free, with why (the wish waits in ``Conflicts``). The engine's diffs and its
    full sync both say so: one said restricted and the other free, and the subscriber flipped
    between them in the audit log, the gauge and ``explain`` at every full sync (review)."""
    return Decision(sid, Mode.FREE, "an address of theirs is enforced for another subscriber")


def uncontested(decision: Decision, kept: Iterable[Network], contested: Iterable[Network]) -> Decision:
    """``decision`` holding only ``kept``; ``contested``, another subscriber's, named in its
    cause. One address of a subscriber that another holds must not leave the rest of its
    restriction out (its other addresses free): the holder keeps what it holds, this one gets
    the rest. The engine's diffs and the full sync trim alike, so they enforce the same."""
    subscriber = decision.subscriber
    assert subscriber is not None
    s, d = subscriber, decision
    return Decision(d.subscriber_id, d.mode,
                    f"{d.cause}; held back (enforced for another subscriber): {', '.join(map(str, contested))}",
                    Subscriber(s.id, tuple(kept), s.mode, s.reason, s.exempt_until, s.exempt_category, s.match),
                    d.until, d.pending)


class Conflicts(dict[str, dict[str, Any]]):
    """Decisions not enforced because an address is another subscriber's, by subscriber: what
    ``status`` reports (``address_conflicts``) and the timer retries each round."""

    def note(self, sid: str, detail: str, wanted: str, now: float) -> None:
        since = self.get(sid, {}).get("since", now)
        self[sid] = {"detail": detail, "since": since, "wanted": wanted}

    def after_sync(self, wanted: Mapping[str, tuple[str, tuple[Network, ...]]], owned: Iterable[str],
                   index: ClaimsIndex, now: float) -> None:
        """After a full sync: a restriction the sync left out (``wanted``: mode and networks of
        the restricted decisions; ``owned``: who holds elements now) is a conflict; everyone
        else's is resolved."""
        owned = set(owned)
        for sid in [sid for sid in self if sid not in wanted]:
            del self[sid]
        for sid, (mode, networks) in wanted.items():
            if sid in owned:
                self.pop(sid, None)
                continue
            holders = (c.holder for n in networks for c in [index.conflict("", [n])] if c)
            holder = next((h for h in holders if h != sid), "another")
            if sid not in self:
                log.warning("event=address_conflict subscriber=%s cause=sync held_by=%s (not enforced; retried "
                            "each timer round)", sid, holder)
            self.note(sid, f"an address is enforced for subscriber {holder}", mode, now)
