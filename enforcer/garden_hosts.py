"""Walled-garden hostnames (``walled_garden.allow: [pay.example.net]``) kept resolved.

Payment providers move between addresses; we re-resolve periodically and put the addresses
in their own hash sets, diffed like everything else. A name that fails to resolve keeps its
last known addresses: a DNS hiccup must not cut restricted customers off the payment page.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .dataplane.backend import DataplaneError

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("walled_garden.garden_hosts")

#: How often names are re-resolved, and how long one lookup may take.
REFRESH_SECONDS = 300.0
LOOKUP_TIMEOUT = 5.0

Resolver = Callable[[str], Awaitable[set[str]]]


async def resolve(host: str) -> set[str]:
    """IPv4 and IPv6 addresses of ``host`` through the system resolver."""
    infos = await asyncio.wait_for(
        asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), LOOKUP_TIMEOUT)
    return {str(info[4][0]).split("%", 1)[0] for info in infos}


class GardenHosts:
    def __init__(self, hosts: tuple[str, ...], apply: Callable[[set[str]], Awaitable[None]],
                 resolver: Resolver = resolve) -> None:
        self.hosts = hosts
        self.apply = apply
        self.resolver = resolver
        self.known: dict[str, set[str]] = {}

    async def refresh(self) -> set[str]:
        """Resolve every name once; returns the union in force afterwards."""
        results = await asyncio.gather(*(self.resolver(h) for h in self.hosts), return_exceptions=True)
        for host, result in zip(self.hosts, results, strict=True):
            if isinstance(result, BaseException) or not result:
                why = ("no addresses" if not isinstance(result, BaseException)
                       else (str(result) or type(result).__name__))
                log.warning("event=garden_host_unresolved host=%s error=%s kept=%d", host, why,
                            len(self.known.get(host, ())))
                continue
            if result != self.known.get(host):
                log.info("event=garden_host_resolved host=%s addresses=%s", host, ",".join(sorted(result)))
            self.known[host] = set(result)
        addresses = set().union(*self.known.values()) if self.known else set()
        await self.apply(addresses)
        return addresses

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``REFRESH_SECONDS`` until ``stop``. A name that fails to resolve is
        handled inside ``refresh`` and a table that cannot be changed inside ``apply``; anything
        else is a bug and ends the run, which the supervisor logs with its traceback, counts
        (``walled_garden_task_failures_total{task="hosts"}``) and restarts with backoff, keeping
        ``known``."""
        while not stop.is_set():
            await self.refresh()
            try:
                await asyncio.wait_for(stop.wait(), REFRESH_SECONDS)
            except TimeoutError:
                pass


async def install(engine: Engine, addresses: set[str]) -> None:
    """Put the addresses the hostnames resolve to now in the table (a failure is retried by
    the repair loop; the previous addresses stay meanwhile)."""
    async with engine.lock:
        try:
            await engine.kernel(engine.reconciler.set_host_allow, addresses)
        except DataplaneError as exc:
            log.error("event=garden_hosts_not_applied error=%s", str(exc))
            engine.changed.set()
