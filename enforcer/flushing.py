"""Connection flushing after an enforcement change, with its metrics and its failure policy.

A change is in force for new connections the moment the kernel commits it; connections
opened before keep their NAT and conntrack state until flushed (``conntrack``). A failed
flush is logged and counted but never undoes the change: the kernel is right, and old
connections time out on their own.

The flush is named by the reconciler's keys (``SyncResult.changed``: version, prefix length,
text), never by ``ipaddress`` networks: a cold start changes 125k addresses, and building a
network for each cost ~0.45 s and 40-55 MB until the flush was done (issue 16).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from .conntrack import Conntrack, ConntrackError
from .ctnetlink import Target
from .dataplane.layout import PORTAL_CT_MARK
from .metrics import Metrics

log = logging.getLogger("walled_garden.enforcer")


class ConnectionTable(Protocol):
    """What flushing needs of conntrack (a fake in unit tests)."""

    async def flush(self, targets: Iterable[Target], keep_mark: int = 0) -> int: ...


class Flusher:
    def __init__(self, conntrack: ConnectionTable, metrics: Metrics) -> None:
        self.conntrack, self.metrics = conntrack, metrics
        if isinstance(conntrack, Conntrack):
            conntrack.observe = lambda dump, seconds: metrics.conntrack_seconds.labels(dump).observe(seconds)

    async def flush(self, targets: Iterable[Target], why: str) -> int | None:
        """Delete the connections of ``targets`` (keys, or networks); the count, or None when
        the flush failed."""
        wanted = set(targets)
        if not wanted:
            return 0
        try:
            # The portal's own connections survive: the page confirming a lift must arrive.
            deleted = await self.conntrack.flush(wanted, keep_mark=PORTAL_CT_MARK)
        except (ConntrackError, OSError) as exc:
            self.metrics.conntrack_failures.inc()
            log.error("event=conntrack_flush_failed cause=%s error=%s", why, str(exc))
            return None
        self.metrics.conntrack_flushed.inc(deleted)
        log.info("event=conntrack_flushed cause=%s networks=%d entries=%d", why, len(wanted), deleted)
        return deleted

