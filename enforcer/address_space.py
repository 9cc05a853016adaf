"""The address space subscribers live in (docs/reference.md, Safety rules 1), and which addresses can never be theirs.

Billing's export, a webhook or an operator can name any address at all; enforcing one that is
not a subscriber's does harm: ``127.0.0.1`` or ``224.0.0.0/16`` is never matched (the customer
stays free while billing was told "restricted"), an upstream prefix walls traffic to it for free
subscribers too, and ``::ffff:100.64.0.5`` is never seen as 100.64.0.5. So every address is
checked twice: against the special-use ranges that are never a subscriber's
(``special_use_problem``), and against ``gateway.subscriber_prefixes`` when the operator has
named them (``AddressSpace.problem``): inside one of them, and never one of them whole (one
event or command must not wall every subscriber of a prefix at once).

Two subscribers sharing addresses is refused as well (one restriction would wall the other):
``find_overlaps`` finds every such network among a whole list in O(n log n).

API for the daemon (events, operator commands)::

    space = AddressSpace.from_config(config)      # once per config (re)load
    problem = space.problem(network)               # None = acceptable, else why not (for a 400)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

from .model import Network

if TYPE_CHECKING:
    from .config.schema import Config

Key = TypeVar("Key", bound=Hashable)

_WIDTH = {4: 32, 6: 128}


def _span(network: Network) -> tuple[int, int]:
    """First and last address of ``network`` as integers (cheaper than ``ipaddress`` properties)."""
    start = int(network.network_address)
    return start, start | ((1 << (_WIDTH[network.version] - network.prefixlen)) - 1)


Span = tuple[int, int, int]   # (IP version, first address, last address) as integers


def span(network: Network) -> Span:
    """``network`` as a ``Span``: what the checks below work on, so a bulk parser that never
    builds an ``ipaddress`` network (``subscribers``' fast path) can use them too."""
    return (network.version, *_span(network))


#: (version, first, last, what it is): checked in this order, so 255.255.255.255 is named as
#: the broadcast address rather than as part of 240.0.0.0/4. A network *overlapping* any of
#: them is refused: ``0.0.0.0/16`` lies inside 0.0.0.0/8, ``::/32`` contains ``::`` and ``::1``.
_SPECIAL: tuple[tuple[int, int, int, str], ...] = tuple(
    (net.version, *_span(net), label) for net, label in (
        (ipaddress.ip_network("0.0.0.0/8"), "an unspecified address (0.0.0.0/8)"),
        (ipaddress.ip_network("127.0.0.0/8"), "a loopback address (127.0.0.0/8)"),
        (ipaddress.ip_network("224.0.0.0/4"), "a multicast address (224.0.0.0/4)"),
        (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address"),
        (ipaddress.ip_network("240.0.0.0/4"), "a reserved address (240.0.0.0/4)"),
        (ipaddress.ip_network("::/128"), "the unspecified address (::)"),
        (ipaddress.ip_network("::1/128"), "the loopback address (::1)"),
        (ipaddress.ip_network("ff00::/8"), "a multicast address (ff00::/8)"),
        (ipaddress.ip_network("::ffff:0:0/96"),
         "an IPv4-mapped IPv6 address (::ffff:0:0/96; write the IPv4 address itself)"),
    ))


_V6_MULTICAST = int(ipaddress.IPv6Address("ff00::"))


def special_use_problem(network: Network) -> str | None:
    """Why ``network`` can never be a subscriber's (loopback, multicast, ...), or None."""
    return _special_use_problem(network, *_span(network))


def _special_use_problem(network: Network, first: int, last: int) -> str | None:
    """``special_use_problem`` with the network's span already known."""
    label = _special_label(network.version, first, last)
    return None if label is None else f"{network} is or overlaps {label}, never a subscriber's"


def _special_label(version: int, first: int, last: int) -> str | None:
    """The special-use range the span overlaps (its label), or None."""
    # Fast path (called for every address of a 100k-line list): clear of every range above.
    if version == 4:
        if first >> 24 > 0 and last >> 24 < 224 and not first >> 24 <= 127 <= last >> 24:
            return None
    elif first >> 48 and last < _V6_MULTICAST:      # all IPv6 ranges but multicast lie in ::/80
        return None
    for special_version, low, high, label in _SPECIAL:
        if special_version == version and first <= high and low <= last:
            return label
    return None


#: An entry of ``gateway.subscriber_prefixes`` broader than this is a pool of many subscribers,
#: which no single one may cover whole (one event walling them all); a narrower entry may be
#: one customer's block, listed or leased as it is (a /29 of static addresses, a delegated /56).
POOL_BROADER_THAN = {4: 24, 6: 48}


@dataclass(frozen=True)
class AddressSpace:
    """``gateway.subscriber_prefixes``: where subscribers' addresses may lie.

    Empty ``prefixes`` (the key not set) accepts every unicast address (``check-config`` warns);
    special-use addresses are refused either way.
    """

    prefixes: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> AddressSpace:
        return cls(tuple(config.gateway.subscriber_prefixes))

    @property
    def restricted(self) -> bool:
        """True when the operator named the prefixes (otherwise only special use is refused)."""
        return bool(self.prefixes)

    @cached_property
    def _spans(self) -> tuple[tuple[int, int, int], ...]:
        """(version, first, last) of each prefix, computed once: ``problem`` runs for every
        address of a 100k-line list (it was a third of the parse)."""
        return tuple((prefix.version, *_span(prefix)) for prefix in self.prefixes)

    @cached_property
    def _families(self) -> dict[int, tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int, int], ...], int]]:
        """Per family: every entry's span; the *pools* among them, (first, last, index) of each
        entry broader than one subscriber's block (``POOL_BROADER_THAN``); and the smallest
        pool's size, under which a span cannot cover one (so a /32 never looks)."""
        out = {}
        for version in (4, 6):
            spans = tuple((low, high) for v, low, high in self._spans if v == version)
            pools = tuple((low, high, i) for i, (v, low, high) in enumerate(self._spans)
                          if v == version and self.prefixes[i].prefixlen < POOL_BROADER_THAN[version])
            out[version] = (spans, pools, min((high - low for low, high, _ in pools), default=0))
        return out

    def problem(self, network: Network) -> str | None:
        """Why ``network`` may not be a subscriber's address or prefix, or None if it may:
        special use, outside every prefix, or covering a whole pool entry (of either family)."""
        first, last = _span(network)
        special = _special_use_problem(network, first, last)
        if special or not self.prefixes:
            return special
        inside, covered = self._place(network.version, first, last)
        if not inside:
            names = ", ".join(str(p) for p in self.prefixes)
            return f"{network} lies outside gateway.subscriber_prefixes ({names})"
        if covered is not None:
            return (f"{network} covers the whole gateway.subscriber_prefixes entry {self.prefixes[covered]}; "
                    "refusing a prefix that wide for one subscriber")
        return None

    def accepts(self, version: int, first: int, last: int) -> bool:
        """``problem(network) is None`` for the network with this span, without the network
        or the wording: the bulk parser asks this, and on False lets ``problem`` say why."""
        if _special_label(version, first, last) is not None:
            return False
        if not self.prefixes:
            return True
        inside, covered = self._place(version, first, last)
        return inside and covered is None

    def _place(self, version: int, first: int, last: int) -> tuple[bool, int | None]:
        """Whether the span lies inside an entry, and the index of a pool entry it covers whole
        (None: none). Quick: ``accepts`` runs for every address of a 100k-line list."""
        spans, pools, smallest = self._families[version]
        inside = False
        for low, high in spans:
            if low <= first and last <= high:
                inside = True
                break
        if pools and last - first >= smallest:
            for low, high, index in pools:
                if first <= low and high <= last:
                    return inside, index
        return inside, None


Tag = TypeVar("Tag")


def find_overlaps(entries: Iterable[tuple[Key, Network]]) -> list[tuple[tuple[Key, Network], tuple[Key, Network]]]:
    """Pairs ``(outer, inner)`` of ``(owner, network)`` where ``inner`` equals or lies inside
    ``outer`` and the owners differ; one pair per conflicting ``inner``, with its closest
    ``outer`` (``find_span_overlaps`` over the networks' spans)."""
    return find_span_overlaps((owner, span(network), network) for owner, network in entries)


def find_span_overlaps(entries: Iterable[tuple[Key, Span, Tag]]) -> list[tuple[tuple[Key, Tag], tuple[Key, Tag]]]:
    """``find_overlaps`` over ``(owner, span, tag)``: pairs ``(outer, inner)`` of ``(owner, tag)``.

    CIDR blocks either nest or are disjoint, so one sort by (start, widest first) and a stack of
    the blocks enclosing the current one find every conflict: O(n log n), about 0.2 s for 100k
    entries. Networks of one owner may nest (a /56 and an address in it).
    """
    listed = list(entries)
    # Sorted as plain tuples of ints (the index breaks ties): no key function per element.
    order = sorted([(version, first, -last, i) for i, (_, (version, first, last), _) in enumerate(listed)])
    pairs: list[tuple[tuple[Key, Tag], tuple[Key, Tag]]] = []
    stack: list[tuple[int, int, int, Key, Tag]] = []      # (version, first, last, owner, tag), nested
    for version, first, negative_last, i in order:
        owner, _, tag = listed[i]
        last = -negative_last
        while stack and (stack[-1][0] != version or stack[-1][2] < first):
            stack.pop()
        for _, _, _, other, outer in reversed(stack):
            if other != owner:
                pairs.append(((other, outer), (owner, tag)))
                break
        top = stack[-1] if stack else None
        if not (top and top[3] == owner and top[1] == first and top[2] == last):   # a repeat adds nothing
            stack.append((version, first, last, owner, tag))
    return pairs
