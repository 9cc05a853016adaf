"""The one small interface between session sources and the daemon.

A source (a lease file watcher, the RADIUS accounting receiver) knows its own input format
and nothing of the policy or the kernel: it reports sessions to a ``SessionSink`` and
returns. The sink merges them into the ``SessionBook``, enforces the change and makes it
durable before ``replace``/``update`` return, so a source may acknowledge its peer (a RADIUS
Accounting-Response) exactly when the change is committed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from ..model import Network
from .session import Session

#: Kinds of bad input a source reports (label ``kind`` of ``session_source_errors_total``).
PROBLEMS = ("malformed", "outside_prefixes", "unknown_attribute", "bad_authenticator", "unknown_client",
            "unreadable", "commit_failed")


class SessionChangeFailed(Exception):
    """The change could not be enforced or saved; nothing of it was kept. A source retries
    (a file on its next read; a RADIUS client resends because it got no answer)."""


class SessionSink(Protocol):
    async def replace(self, source: str, sessions: Sequence[Session], *, complete: bool = True,
                      observed: float | None = None) -> None:
        """The source's whole current set (a lease file just read): sessions of ``source``
        not in it end, unless ``complete`` is False (some lines could not be read: ending the
        sessions they may have held would free someone by accident). ``observed``: when the
        source saw the change (wall clock; for the lag metric)."""

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None) -> None:
        """Sessions started or updated, and keys of ``source`` that stopped."""

    def keys(self, source: str) -> Collection[str]:
        """The keys of ``source``'s sessions held now (saved before a restart too): a RADIUS
        receiver learns which sessions a rebooted NAS (Accounting-On) had."""

    def problem(self, source: str, kind: str, detail: str) -> None:
        """Bad input (one of ``PROBLEMS``): logged and counted; nothing else changes."""

    def address_problem(self, network: Network) -> str | None:
        """Why ``network`` cannot be a subscriber's (outside ``gateway.subscriber_prefixes``,
        special-use), or None. A source drops such an address and reports ``outside_prefixes``."""


class SessionSource(Protocol):
    """A configured source (``subscribers.sessions``); run by the daemon's supervisor, which
    restarts ``run`` with backoff if it fails."""

    name: str

    @property
    def kind(self) -> str:
        """``dnsmasq``, ``kea`` or ``radius``."""

    async def run(self, sink: SessionSink) -> None:
        """Report sessions to ``sink`` until cancelled."""

    def status(self) -> dict[str, Any]:
        """What ``status`` shows for this source (path or listen address, last read, errors)."""
