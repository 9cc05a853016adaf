"""The session sources ``subscribers.sessions`` configures, built for the daemon."""

from __future__ import annotations

from collections.abc import Sequence

from ..config.schema import SessionSourceConfig
from .source import SessionSource


def build_sources(configs: Sequence[SessionSourceConfig]) -> list[SessionSource]:
    sources: list[SessionSource] = []
    for config in configs:
        if config.kind == "dnsmasq":
            from .dnsmasq import DnsmasqSource
            sources.append(DnsmasqSource(config.name, config.path, config.poll_interval))
        elif config.kind == "kea":
            from .kea import KeaSource
            sources.append(KeaSource(config.name, config.path, config.poll_interval))
        elif config.kind == "radius":
            from .radius import RadiusSource
            assert config.listen is not None   # the config reader requires it
            with open(config.secret_file, encoding="utf-8") as handle:
                secret = handle.readline().strip().encode()
            sources.append(RadiusSource(config.name, config.listen.host, config.listen.port, secret,
                                        clients=config.clients, session_timeout=config.session_timeout))
    return sources
