"""Everything the DNS forwarder process needs, in one JSON-able value.

The daemon builds it from the configuration (``from_config``) and hands it to the forwarder
process on its command line, so the process never reads the configuration file itself: it runs
with exactly the settings the daemon validated, even if the file changed meanwhile.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

from ..dataplane.layout import DNS_GARDEN_SETS

__all__ = ["DNS_GARDEN_SETS", "ForwarderSettings"]


@dataclass(frozen=True)
class ForwarderSettings:
    """The forwarder's whole configuration (docs/reference.md, "DNS-driven walled garden")."""

    table: str                                   # the daemon's nftables table (inet)
    port: int                                    # where redirected DNS lands, UDP and TCP
    resolvers: tuple[tuple[str, int], ...]       # upstreams (address, port), tried in order
    names: tuple[str, ...] = ()                  # allowed names, exact, lower case, no trailing dot
    suffixes: tuple[str, ...] = ()               # "*.psp.example" given as "psp.example"
    listen: tuple[str, ...] = ("0.0.0.0", "::")  # addresses the forwarder binds
    query_rate: float = 20.0                     # per subscriber address, queries/s
    query_burst: int = 200                       # bucket size of that rate
    upstream_timeout: float = 2.0                # seconds per resolver before the next is asked
    ttl_margin: int = 120                        # seconds an address stays beyond its TTL
    max_ttl: int = 86400                         # TTLs above this are cut to it
    max_addresses: int = 65536                   # per family: the garden sets' size cap
    tcp_clients: int = 1024                      # concurrent TCP connections at most
    refused: tuple[str, ...] = ()                # never admitted: gateway.subscriber_prefixes (CIDRs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ForwarderSettings:
        raw = json.loads(text)
        raw["resolvers"] = tuple((str(host), int(port)) for host, port in raw["resolvers"])
        for key in ("names", "suffixes", "listen", "refused"):
            raw[key] = tuple(raw[key])
        return cls(**raw)

    @classmethod
    def from_config(cls, config: Config) -> ForwarderSettings | None:
        """The settings for ``config``, or None when it does not use ``dns: gateway``."""
        garden = config.walled_garden
        forwarder = garden.forwarder
        if forwarder is None:
            return None
        return cls(table=config.gateway.table, port=forwarder.port,
                   resolvers=tuple((str(address), 53) for address in garden.resolvers),
                   names=tuple(name.lower() for name in garden.allow_hosts),
                   suffixes=tuple(suffix.lower() for suffix in garden.allow_domains),
                   query_rate=forwarder.query_rate, query_burst=forwarder.query_burst,
                   upstream_timeout=forwarder.upstream_timeout, ttl_margin=forwarder.ttl_margin,
                   max_ttl=forwarder.max_ttl, max_addresses=forwarder.max_addresses,
                   refused=tuple(str(prefix) for prefix in config.gateway.subscriber_prefixes))
