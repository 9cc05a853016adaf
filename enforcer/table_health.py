"""Is our table still in the kernel as we left it? Someone may delete it, flush the ruleset
or remove an element by hand; the daemon notices and repairs it with a full sync.

Every check reads the layout tag and each set's sentinel (a deleted table, a ``flush
ruleset``, a ``flush set``) on a reader with its own libnftables context, so no webhook waits
behind it; every ``FULL_CHECK_SECONDS`` every element is compared with the mirror too (a
single deleted element), on the kernel thread where the mirror is consistent. That listing
costs ~1 s at 100k elements (nft 1.0.6, measured), hence the longer period.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .engine import Engine
from .reconciler import probe

log = logging.getLogger("walled_garden.enforcer")
#: How often every element is compared with the mirror.
FULL_CHECK_SECONDS = 600.0


class TableHealth:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._full_check = time.monotonic()

    async def verify(self) -> bool:
        """True when the table is as we left it; else a repair is started and False returned."""
        engine = self.engine
        reconciler = engine.reconciler
        layout = reconciler.layout
        if layout is None or reconciler.needs_full:
            return True
        # A start that trusted the table's digest mark (not read back) gets its full comparison at
        # the first check rather than ten minutes later: the mark cannot see a hand-edited ruleset
        # dump restored at the same generation after a reboot (docs/operations.md, Restart).
        full = not reconciler.verified or time.monotonic() - self._full_check >= FULL_CHECK_SECONDS
        if full:
            self._full_check = time.monotonic()
            problem = await engine.kernel(reconciler.check_kernel, True)
        else:
            problem = await asyncio.to_thread(probe, reconciler.dataplane.reader(), layout)
            if problem and (reconciler.layout is not layout or reconciler.needs_full):
                return True    # a sync replaced the table meanwhile: nothing to say about the old one
            if problem:
                reconciler.needs_full = True
        if not problem:
            return True
        # Someone removed or changed our table: repaired now.
        log.error("event=table_lost table=%s check=%s detail=%s action=repairing", engine.config.gateway.table,
                  "full" if full else "quick", problem)
        engine.table_repairs += 1
        engine.changed.set()
        return False

    async def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of the table's named counters, read on a reader of its own."""
        return await asyncio.to_thread(self.engine.reconciler.dataplane.reader().counters)
