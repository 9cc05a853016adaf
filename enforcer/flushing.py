"""Connection flushing after an enforcement change, with its metrics and its failure policy.

A change is in force for new connections the moment the kernel commits it; connections
opened before keep their NAT and conntrack state until flushed (``conntrack``). A failed
flush is logged and counted but never undoes the change: the kernel is right, and old
connections time out on their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol

from .conntrack import Conntrack, ConntrackError
from .dataplane.layout import PORTAL_CT_MARK
from .metrics import Metrics
from .model import Network

log = logging.getLogger("walled_garden.enforcer")


class ConnectionTable(Protocol):
    """What flushing needs of conntrack (a fake in unit tests)."""

    async def flush(self, networks: Iterable[Network], keep_mark: int = 0) -> int: ...


class Flusher:
    def __init__(self, conntrack: ConnectionTable, metrics: Metrics) -> None:
        self.conntrack, self.metrics = conntrack, metrics
        if isinstance(conntrack, Conntrack):
            conntrack.observe = lambda dump, seconds: metrics.conntrack_seconds.labels(dump).observe(seconds)

    async def flush(self, networks: Iterable[Network], why: str) -> int | None:
        """Delete the connections of ``networks``; the count, or None when the flush failed."""
        networks = set(networks)
        if not networks:
            return 0
        try:
            # The portal's own connections survive: the page confirming a lift must arrive.
            deleted = await self.conntrack.flush(networks, keep_mark=PORTAL_CT_MARK)
        except (ConntrackError, OSError) as exc:
            self.metrics.conntrack_failures.inc()
            log.error("event=conntrack_flush_failed cause=%s error=%r", why, str(exc))
            return None
        self.metrics.conntrack_flushed.inc(deleted)
        log.info("event=conntrack_flushed cause=%s networks=%d entries=%d", why, len(networks), deleted)
        return deleted


class CoalescingFlush:
    """One flush at a time; addresses arriving meanwhile are flushed together by the next.

    A conntrack pass costs about the same for one address or a hundred (a table dump, or one
    kernel-filtered dump per address at most), so under a stream of small commits (session
    changes at 1,000/s) a flush per commit would spend more than the commits. Each caller
    still returns only once a flush that covers its addresses has run.
    """

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.passes = 0
        self._pending: set[Network] = set()
        self._causes: set[str] = set()
        self._waiting: list[asyncio.Future[None]] = []
        self._running: asyncio.Future[None] | None = None

    async def flush(self, networks: Iterable[Network], why: str) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.update(networks)
        self._causes.add(why)
        self._waiting.append(done)
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        await done

    async def _run(self) -> None:
        try:
            while self._waiting:
                networks, causes, waiting = self._pending, self._causes, self._waiting
                self._pending, self._causes, self._waiting = set(), set(), []
                try:
                    self.passes += 1
                    await self.flusher.flush(networks, ", ".join(sorted(causes)))
                except Exception as exc:   # a bug below the flusher: reported, and the passes go on
                    self.flusher.metrics.task_failures.labels("flush").inc()
                    log.error("event=task_failed task=flush error=%r", str(exc), exc_info=exc)
                finally:   # nobody is left waiting, whatever the pass did
                    for done in waiting:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._running = None
