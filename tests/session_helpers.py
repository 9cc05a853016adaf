"""A ``SessionSink`` that records what a session source tells it, for unit tests of sources.

It keeps the source's current sessions the way the daemon's book would (``replace`` with
``complete`` ends the ones missing, ``update`` adds and stops), can be told to fail the next
changes (``fail``: ``SessionChangeFailed``, as when enforcing or saving failed), and rejects
addresses outside ``prefixes`` like ``gateway.subscriber_prefixes``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from enforcer.model import Network
from enforcer.sessions.session import Session
from enforcer.sessions.source import PROBLEMS, SessionChangeFailed


@dataclass
class RecordingSink:
    prefixes: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    calls: list[tuple[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    current: dict[tuple[str, str], Session] = field(default_factory=dict)
    fail: int = 0                       # the next ``fail`` changes raise SessionChangeFailed
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def replace(self, source: str, sessions: Sequence[Session], *, complete: bool = True,
                      observed: float | None = None) -> None:
        self._maybe_fail("replace")
        self.calls.append(("replace", {"source": source, "sessions": list(sessions), "complete": complete,
                                       "observed": observed}))
        if complete:
            for key in [k for k in self.current if k[0] == source]:
                del self.current[key]
        for session in sessions:
            self.current[session.id] = session
        self.changed.set()

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None) -> None:
        self._maybe_fail("update")
        self.calls.append(("update", {"source": source, "started": list(started), "stopped": list(stopped),
                                      "observed": observed}))
        for key in stopped:
            self.current.pop((source, key), None)
        for session in started:
            self.current[session.id] = session
        self.changed.set()

    def problem(self, source: str, kind: str, detail: str) -> None:
        assert kind in PROBLEMS, kind
        self.problems.append((source, kind, detail))
        self.changed.set()

    def address_problem(self, network: Network) -> str | None:
        if any(network.version == p.version and network.subnet_of(p)   # type: ignore[arg-type]
               for p in map(ipaddress.ip_network, self.prefixes)):
            return None
        return f"{network} is outside gateway.subscriber_prefixes ({', '.join(self.prefixes)})"

    def _maybe_fail(self, what: str) -> None:
        if self.fail:
            self.fail -= 1
            self.calls.append(("failed", what))
            raise SessionChangeFailed("injected by the test")

    # -- for assertions -----------------------------------------------------------------------
    def keys(self, source: str | None = None) -> set[str]:
        return {key for (src, key) in self.current if source is None or src == source}

    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.problems]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 3.0) -> None:
        """Until ``condition()`` holds (checked after every call), at most ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()
