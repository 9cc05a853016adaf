"""A DHCP server's lease file, watched: the part the ``dnsmasq`` and ``kea`` sources share.

The file is polled with ``os.stat`` every ``poll_interval`` (0.25 s) rather than watched
with inotify: polling needs no extra dependency (asyncinotify and aionotify exist, but
would be one more library to keep for one watch), sees a rename-replace (Kea's lease file
cleanup, an editor) and an in-place rewrite (dnsmasq truncates and rewrites its file) the
same way, keeps working when the file or its directory is recreated, and one stat per
250 ms costs nothing. A change is (inode, size, mtime_ns) of any watched file.

A read is trusted only when it cannot be half a write: dnsmasq rewrites its file IN PLACE,
so a read may see it truncated or half written. A read whose files changed stat while being
read, or whose parser says it ends mid-line, is done again shortly (``RETRIES`` times, then
on the next poll); an empty file that used to hold leases is confirmed once more after a
pause. Never is a possibly truncated set reported as complete: that would end sessions and
free restricted subscribers by accident.

A missing or unreadable file is reported once per change of state (not every poll) and the
sessions already reported are kept. A change the sink could not commit
(``SessionChangeFailed``) is delivered again on the next poll, before anything new is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .session import Session
from .source import SessionChangeFailed, SessionSink

log = logging.getLogger(__name__)

#: (device, inode, size, mtime_ns) of a file, or None when it does not exist.
Stamp = tuple[int, int, int, int]
Stamps = Mapping[Path, Stamp | None]


class TornRead(Exception):
    """What was read may be half a write (the file changed meanwhile, a line has no end): read again."""


@dataclass
class Reading:
    """What one trusted read found.

    ``sessions``: the whole current set (``incremental`` False: the sink ``replace``\\s with it),
    or the sessions started or updated since the last read (``incremental`` True: the sink
    ``update``\\s with them and ``stopped``). ``complete`` False when some line could not be
    read (nothing the file may still hold is ended then). ``problems``: (kind, detail, dedup key)
    of bad lines, reported once the read is trusted; ``skipped``: lines skipped by reason.
    ``commit``: run once the read is trusted, to keep what the parser learnt (Kea's offset)."""

    sessions: list[Session]
    complete: bool = True
    incremental: bool = False
    stopped: list[str] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    total: int = 0                                   # sessions the source holds after this read
    commit: Callable[[], None] | None = None

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def mac_from_duid(text: str) -> str | None:
    """The MAC address a DHCPv6 client DUID embeds, or None.

    A DUID-LLT (type 1: type, hardware type, time, link-layer address) and a DUID-LL (type 3:
    type, hardware type, link-layer address) carry the client's link-layer address (RFC 8415
    §11.2, §11.4); with hardware type 1 (Ethernet) and 6 octets it is the MAC the v4 side of
    the same client shows. Other DUIDs (EN, UUID) name no MAC. ``text``: hex octets, with or
    without colons, as dnsmasq and Kea write them."""
    try:
        octets = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        return None
    kind = int.from_bytes(octets[:2], "big") if len(octets) >= 4 else 0
    hwtype = int.from_bytes(octets[2:4], "big")
    address = octets[8:] if kind == 1 else octets[4:] if kind == 3 else b""
    if hwtype != 1 or len(address) != 6:
        return None
    return ":".join(f"{octet:02x}" for octet in address)


def stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LeaseFileSource(ABC):
    """A ``SessionSource`` reading one lease file (and, for Kea, its cleanup companions).

    Subclasses give ``kind``, ``watched()`` (the main file first) and ``parse()``."""

    kind: ClassVar[str]
    #: Re-reads of a read that may be half a write, ``RETRY_DELAY`` apart, before the next poll.
    RETRIES = 5
    RETRY_DELAY = 0.03

    def __init__(self, name: str, path: str | os.PathLike[str], poll_interval: float = 0.25, *,
                 clock: Callable[[], float] = time.time) -> None:
        if poll_interval <= 0:
            raise ValueError(f"session source {name}: poll_interval must be positive, got {poll_interval}")
        self.name = name
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.clock = clock
        self._seen: dict[Path, Stamp | None] | None = None    # stamps of the last trusted read
        self._pending: Reading | None = None                  # read, not yet committed by the sink
        self._pending_observed: float | None = None
        self._reported_problems: set[str] = set()            # dedup keys of bad lines reported
        self._outside: set[str] = set()                       # keys of leases reported outside_prefixes
        self._missing: str | None = None                      # why the file cannot be read, once reported
        self._status: dict[str, Any] = {"last_read": None, "sessions": 0, "lines_skipped": 0,
                                        "skipped": {}, "last_problem": None, "retries": 0}

    # -- for subclasses -----------------------------------------------------------------------
    def watched(self) -> tuple[Path, ...]:
        """Files whose change means a new read; the first is the lease file itself."""
        return (self.path,)

    @abstractmethod
    def parse(self, before: Stamps, previous: Stamps | None, now: float) -> Reading:
        """Read the files (``before``: their stamps now; ``previous``: at the last trusted read).
        Runs in a worker thread; must not change ``self`` (put that in ``Reading.commit``).
        Raises ``TornRead`` when what it read may be half a write, OSError when it cannot read."""

    def settled(self, before: Stamps, after: Stamps) -> bool:
        """Whether a read that started at ``before`` and ended at ``after`` can be trusted."""
        return before == after

    def restart(self) -> None:
        """Forget what was read: ``run`` starts again with a full read (after a supervisor restart)."""
        self._seen = None

    # -- SessionSource ------------------------------------------------------------------------
    async def run(self, sink: SessionSink) -> None:
        self.restart()
        while True:
            await self.poll(sink)
            await asyncio.sleep(self.poll_interval)

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": str(self.path),
                "poll_interval": self.poll_interval, **self._status}

    async def poll(self, sink: SessionSink) -> None:
        """One poll: deliver what the sink could not take last time, else read if anything changed."""
        if self._pending is not None and not await self._deliver(sink):
            return
        for attempt in range(self.RETRIES + 1):
            if attempt:
                await asyncio.sleep(self.RETRY_DELAY)
            before = self._stamps()
            if before == self._seen:
                return
            if before[self.path] is None:
                if self._missing is not None:
                    return    # already reported; kept sessions stand until it is back
                continue      # a file being replaced may be missing for an instant: look again
            try:
                reading = await asyncio.to_thread(self.parse, before, self._seen, self.clock())
            except TornRead as torn:
                self._status["retries"] += 1
                log.debug("event=lease_file_torn source=%s detail=%s action=reread", self.name, torn)
                continue
            except OSError as error:
                self._unreadable(sink, f"{self.path}: {error.strerror or error}")
                return
            after = self._stamps()
            if not self.settled(before, after):
                self._status["retries"] += 1
                continue
            if reading.total == 0 and self._status["sessions"] and not attempt:
                continue      # emptied: confirm after a pause that this is not a rewrite's first half
            self._trust(sink, reading, before)
            await self._deliver(sink)
            return
        if self._stamps()[self.path] is None:
            self._unreadable(sink, f"{self.path}: no such file")
        else:
            self._status["last_problem"] = f"{self.path} kept changing while read; trying again next poll"

    # -- steps --------------------------------------------------------------------------------
    def _stamps(self) -> dict[Path, Stamp | None]:
        return {path: stamp(path) for path in self.watched()}

    def _unreadable(self, sink: SessionSink, why: str) -> None:
        """Report once per change of state; the sessions already reported stay."""
        if self._missing != why:
            self._missing = why
            self._status["last_problem"] = why
            sink.problem(self.name, "unreadable", why)

    def _trust(self, sink: SessionSink, reading: Reading, stamps: dict[Path, Stamp | None]) -> None:
        if reading.commit is not None:
            reading.commit()
        self._seen = stamps
        self._missing = None
        main = stamps[self.path]
        self._pending = reading
        self._pending_observed = main[3] / 1e9 if main is not None else self.clock()
        self._status["last_read"] = self.clock()
        self._status["lines_skipped"] = sum(reading.skipped.values())
        self._status["skipped"] = dict(reading.skipped)
        keys = set()
        for kind, detail, key in reading.problems:
            keys.add(key)
            if key not in self._reported_problems or reading.incremental:
                self._status["last_problem"] = detail
                sink.problem(self.name, kind, detail)
        # a whole read says which bad lines remain: one reported again after it was fixed is news
        self._reported_problems = self._reported_problems | keys if reading.incremental else keys

    async def _deliver(self, sink: SessionSink) -> bool:
        """Hand the pending reading to the sink, dropping addresses no subscriber may have."""
        reading = self._pending
        assert reading is not None
        outside: set[str] = set()
        sessions = [s for s in reading.sessions if self._acceptable(sink, s, outside)]
        self._outside = self._outside | outside if reading.incremental else outside
        try:
            if reading.incremental:
                await sink.update(self.name, sessions, reading.stopped, observed=self._pending_observed)
            else:
                await sink.replace(self.name, sessions, complete=reading.complete,
                                   observed=self._pending_observed)
        except SessionChangeFailed as failed:
            self._status["last_problem"] = f"change not committed ({failed}); delivering again next poll"
            return False
        self._pending = None
        self._status["sessions"] = reading.total
        return True

    def _acceptable(self, sink: SessionSink, session: Session, outside: set[str]) -> bool:
        """False for a lease naming an address no subscriber may have (reported once while it lasts)."""
        for network in session.addresses:
            reason = sink.address_problem(network)
            if reason is not None:
                outside.add(session.key)
                if session.key not in self._outside:
                    detail = f"{self.path}: lease {session.key} ({session.match.text()}): {reason}"
                    self._status["last_problem"] = detail
                    sink.problem(self.name, "outside_prefixes", detail)
                return False
        return True
