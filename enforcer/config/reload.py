"""What a configuration reload (SIGHUP) may change in a running daemon, and what needs a restart.

Sockets, the state directory, the table name and dataplane backend, the session sources and
the fleet are bound when the daemon starts: a reload
keeps their running values and names the keys whose new value waits for a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .schema import Config

#: Settings bound at start-up, by key path.
BOUND_AT_START: dict[str, Callable[[Config], Any]] = {
    "state_dir": lambda c: c.state_dir, "gateway.table": lambda c: c.gateway.table,
    "gateway.backend": lambda c: c.gateway.backend, "gateway.ipset": lambda c: c.gateway.ipset,
    "api.socket": lambda c: c.api.socket, "api.socket_group": lambda c: c.api.socket_group,
    "api.listen": lambda c: c.api.listen, "metrics.listen": lambda c: c.metrics.listen,
    "portal.listen": lambda c: c.portal.listen, "subscribers.sessions": lambda c: c.subscribers.sessions,
    "fleet": lambda c: c.fleet,
}


def reloadable(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the running values of what is bound at start-up, and the keys whose new
    value therefore waits for a restart."""
    restart = [key for key, get in BOUND_AT_START.items() if get(new) != get(old)]
    kept = replace(new, state_dir=old.state_dir,
                   subscribers=replace(new.subscribers, sessions=old.subscribers.sessions),
                   gateway=replace(new.gateway, table=old.gateway.table, backend=old.gateway.backend,
                                   ipset=old.gateway.ipset),
                   api=replace(new.api, socket=old.api.socket, socket_group=old.api.socket_group,
                               listen=old.api.listen),
                   metrics=replace(new.metrics, listen=old.metrics.listen),
                   portal=replace(new.portal, listen=old.portal.listen), fleet=old.fleet)
    return kept, restart
