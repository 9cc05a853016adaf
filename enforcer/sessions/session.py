"""One session: addresses a source says belong to whoever carries its match keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..match import ID_KEY, Match, Pair
from ..model import Network
from ..subscribers import parse_network

#: A session's identity: (source name, key within the source).
SessionId = tuple[str, str]


def address_key(network: Network) -> str:
    """The key of a session that is one address or prefix: ``100.64.0.5``, ``2001:db8:1::/56``
    (how lease files name their leases)."""
    host = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if host else str(network)


@dataclass(frozen=True)
class Session:
    """``key`` is unique within ``source``: the leased address for DHCP (one lease per address),
    ``<nas>/<Acct-Session-Id>`` for RADIUS, the address for session events and the CLI.
    ``seen`` is when this gateway learnt of it (receipt clock): of two sessions naming one
    address, the newer holds it. ``expires`` (wall clock) ends it without further word."""

    source: str
    key: str
    match: Match
    addresses: tuple[Network, ...]
    subscriber: str = ""          # an account id the source names directly (session events), else ""
    expires: float | None = None
    seen: float = field(default=0.0, compare=False)
    detail: str = field(default="", compare=False)   # for people: "lease 100.64.1.5, hostname pc1"

    @property
    def id(self) -> SessionId:
        return (self.source, self.key)

    def pairs(self) -> tuple[Pair, ...]:
        """What it matches a subscriber by: the account id first, then the match keys."""
        return self._pairs

    @cached_property
    def _pairs(self) -> tuple[Pair, ...]:
        own = ((ID_KEY, self.subscriber),) if self.subscriber else ()
        return own + self.match.pairs()

    def stamped(self, seen: float) -> Session:
        """This session as received at ``seen`` (built directly: ``dataclasses.replace`` costs
        ten times as much, and a 100k-lease file is stamped at once)."""
        return Session(self.source, self.key, self.match, self.addresses, self.subscriber, self.expires, seen,
                       self.detail)

    def describe(self) -> str:
        who = self.match.text() or f"id={self.subscriber}"
        text = f"{self.source} session {self.key} ({who})"
        return f"{text}, {self.detail}" if self.detail else text

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "key": self.key, "match": self.match.to_json(),
                               "addresses": [str(a) for a in self.addresses], "seen": self.seen}
        if self.subscriber:
            out["subscriber"] = self.subscriber
        if self.expires is not None:
            out["expires"] = self.expires
        if self.detail:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        return cls(str(data["source"]), str(data["key"]), Match.from_json(data.get("match") or {}),
                   tuple(parse_network(str(a)) for a in data["addresses"]), str(data.get("subscriber", "")),
                   float(data["expires"]) if data.get("expires") is not None else None,
                   float(data.get("seen", 0.0)), str(data.get("detail", "")))
