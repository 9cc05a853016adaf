"""The door billing's events come in by, as the webhook app sees it.

The webhook listener (in the daemon, or in its own unprivileged worker process) needs only
this: hand over a verified event, get its result once it is enforced. Keeping it a Protocol
lets the worker process implement it by forwarding over a socket without importing the
daemon, and lets tests drive the webhook app against a recording sink.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .events import Event
from .outcome import Result


class EventSink(Protocol):
    def submit(self, event: Event, received: float, at: float | None = None) -> asyncio.Future[Result]:
        """Queue one verified event; the future resolves once it is enforced (or refused).
        ``received`` is ``time.perf_counter()`` at arrival, for the latency histogram; ``at``, in a
        fleet, when the gateway that accepted it received it (default: now)."""
        ...

    def count(self, event_type: str, result: str, by: int = 1) -> None:
        """Count a request that never became an event (unauthorized, malformed, unavailable)."""
        ...
