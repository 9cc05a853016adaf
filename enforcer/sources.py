"""Where the restricted list comes from: a watched file (URL polling is issue 4's).

A source only reads and parses; it hands a complete, validated list to the daemon or
reports why it could not. A file is read once its size and mtime have held still for one
poll, so an export being written in place is not read half-way through.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

from .subscribers import ListError, Subscriber, parse_list

log = logging.getLogger(__name__)

#: Poll period; with the settle check an edit applies within about two periods.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ListUpdate:
    subscribers: list[Subscriber]
    origin: str         # file path or URL
    fingerprint: str    # changes whenever the content may have changed


@dataclass(frozen=True)
class SourceFailure:
    origin: str
    reason: str         # short label for metrics: "unreadable", "invalid"
    message: str        # names file:line where it can


OnList = Callable[[ListUpdate], Awaitable[None]]
OnFailure = Callable[[SourceFailure], Awaitable[None]]


def read_list_file(path: str) -> ListUpdate:
    """Read and parse now; raises ``ListError`` or ``OSError``."""
    with open(path, encoding="utf-8") as handle:
        st = os.fstat(handle.fileno())
        text = handle.read()
    return ListUpdate(parse_list(text, path), path, _fingerprint(st))


def _fingerprint(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FileSource:
    """Watches one file by polling ``stat`` (works across atomic renames and editors)."""

    def __init__(self, path: str, on_list: OnList, on_failure: OnFailure) -> None:
        self.path = path
        self.on_list = on_list
        self.on_failure = on_failure
        self.applied: str | None = None   # fingerprint of the last content handed over or refused

    async def run(self, stop: asyncio.Event) -> None:
        previous: str | None = None
        while not stop.is_set():
            try:
                current = _fingerprint(os.stat(self.path))
            except OSError as exc:
                current = f"missing:{exc.errno}"
            if current != self.applied and current == previous:
                await self.check(current)
            previous = current
            try:
                await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def check(self, fingerprint: str | None = None) -> None:
        """Read the file now and hand over the result (also used at start-up)."""
        try:
            update = await asyncio.to_thread(read_list_file, self.path)
        except OSError as exc:
            self.applied = fingerprint
            await self.on_failure(SourceFailure(self.path, "unreadable", f"{self.path}: {exc.strerror or exc}"))
            return
        except ListError as exc:
            self.applied = fingerprint
            await self.on_failure(SourceFailure(self.path, "invalid", str(exc)))
            return
        self.applied = fingerprint or update.fingerprint
        await self.on_list(update)
