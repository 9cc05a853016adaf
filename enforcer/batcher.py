"""Coalesce bursts of changes into one kernel transaction, without delaying a lone one.

A submission wakes the worker at once; whatever else arrives while a batch is being
committed forms the next batch. Under a burst the kernel therefore sees one transaction per
commit round (a few ms), and a single event pays no waiting window at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Largest batch; keeps one transaction (and one conntrack pass) bounded under a flood.
MAX_BATCH = 2000


class Batcher(Generic[T]):
    def __init__(self, commit: Callable[[list[T]], Awaitable[None]], max_batch: int = MAX_BATCH,
                 min_interval: float = 0.0) -> None:
        """``min_interval``: under load, rounds start at least this far apart (a round that
        is costly whatever its size, like a conntrack table walk, then serves more items).
        Load means items arrived while the previous round ran; an item that finds the
        batcher idle starts a round at once, so a sender that waits for each answer before
        sending the next never waits for the interval (it did: 50 ms per webhook)."""
        self.commit = commit
        self.max_batch = max_batch
        self.min_interval = min_interval
        self._last_start = -1e9
        self._backlog = False        # items arrived while the last round ran
        self._queue: list[T] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.largest = 0

    def submit(self, item: T) -> None:
        self._queue.append(item)
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                wait = self._last_start + self.min_interval - asyncio.get_running_loop().time()
                if wait > 0 and self._backlog:
                    await asyncio.sleep(wait)
                self._last_start = asyncio.get_running_loop().time()
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                self.batches += 1
                self.largest = max(self.largest, len(batch))
                try:
                    await self.commit(batch)
                except Exception:  # the commit answers its items itself; never let the worker die
                    log.exception("event=batch_failed size=%d", len(batch))
                self._backlog = bool(self._queue)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
