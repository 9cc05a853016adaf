"""Is our table still in the kernel as we left it? Someone may delete it, flush the ruleset,
remove an element, delete a rule or make the table dormant by hand; the daemon notices and
repairs it with a full sync.

Every check (``verify``, every ``service.TABLE_CHECK_SECONDS``) reads the layout tag and each
set's sentinel (a deleted table, a ``flush ruleset``, a ``flush set``) and the table's structure
(``reconciler.structure_problem``: flags, chains, rules, set declarations; a deleted jump, a
``dormant`` flag) on a reader with its own libnftables context and netlink socket, so no webhook
waits behind it. Neither reads a subscriber set's elements: ~0.4 ms and ~5 ms at 100k
subscribers (nft 1.0.6, measured; ``nft -t list table``, terse, would cost ~0.6 s there, as
nft loads every element first). Every ``FULL_CHECK_SECONDS`` every element is compared with the
mirror too (a single deleted element), on the kernel thread where the mirror is consistent.
That listing costs ~1 s at 100k elements (nft 1.0.6, measured), hence the longer period.

A start compares the structure itself (``Reconciler._structure_changed``, before it decides
between a diff and a replace); what it found and replaced is counted here, in ``table_repairs``,
as soon as the start's sync is done (``on_replaced``) or at the latest at the first check.
``status`` shows the last problem found (section ``table``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .engine import Engine
from .reconciler import probe

log = logging.getLogger("walled_garden.enforcer")
#: How often every element is compared with the mirror.
FULL_CHECK_SECONDS = 600.0


class TableHealth:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._full_check = time.monotonic()
        self.last_problem: dict[str, Any] | None = None   # the last difference found, for ``status``
        if isinstance(engine, Engine):   # a test's stand-in engine has no registries
            engine.reports["table"] = self.report
            engine.on_replaced.append(self._count_start)

    async def verify(self) -> bool:
        """True when the table is as we left it; else a repair is started and False returned."""
        engine = self.engine
        reconciler = engine.reconciler
        self._count_repaired()
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
            # The structure our last install left, unless a replace is under way (odd epoch): a
            # table replaced meanwhile is not compared with the old one's reference.
            epoch = reconciler.structure_epoch
            reference = reconciler.structure if epoch % 2 == 0 else None
            problem = await asyncio.to_thread(probe, reconciler.dataplane.reader(), layout, reference)
            if problem and (reconciler.layout is not layout or reconciler.needs_full
                            or reconciler.structure_epoch != epoch):
                return True    # a sync replaced the table meanwhile: nothing to say about the old one
            if problem:
                reconciler.needs_full = True
        if not problem:
            return True
        # Someone removed or changed our table: repaired now.
        log.error("event=table_lost table=%s check=%s detail=%s action=repairing", engine.config.gateway.table,
                  "full" if full else "quick", problem)
        self._found("full" if full else "quick", problem)
        engine.changed.set()
        return False

    def _found(self, check: str, problem: str) -> None:
        self.engine.table_repairs += 1
        self.engine.metrics.table_repairs.labels(check).inc()
        self.last_problem = {"check": check, "detail": problem, "at": self.engine.clock()}

    async def _count_start(self) -> None:
        """After any replace (``Engine.run_replaced``: a start's, a reload's, a repair's): what a
        start found, counted at once. After a repair there is nothing to take (the reconciler
        keeps only a start's findings; the check that found the damage counted it)."""
        self._count_repaired()

    def _count_repaired(self) -> None:
        """The structure changes a start found and replaced (``Reconciler.repaired``), counted once;
        the reconciler logged each (``event=table_lost check=start``)."""
        for problem in self.engine.reconciler.take_repaired():
            self._found("start", problem)

    def report(self) -> dict[str, Any]:
        """``status``'s ``table`` section: the reference the checks compare the structure with, and
        the last difference found (any check; ``table_repairs`` counts them)."""
        reconciler = self.engine.reconciler
        structure = reconciler.structure
        return {"structure": structure.fingerprint if structure is not None and structure.fingerprint else None,
                "verified": reconciler.verified, "last_problem": self.last_problem}

    async def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of the table's named counters, read on a reader of its own."""
        return await asyncio.to_thread(self.engine.reconciler.dataplane.reader().counters)
