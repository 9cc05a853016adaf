"""The kernel writer: puts the addresses of allowed names in the ``dnsgarden`` timeout sets.

The forwarder awaits ``admit`` before it sends an answer for an allowed name, so the customer's
first connection to the answer's address already passes. Many queries arrive together (a page
asks for a dozen names at once), and each kernel transaction has a fixed cost, so concurrent
admits are grouped: the addresses asked for while one transaction is on its way wait and go
together in the next one. The writes go over netlink directly (``nfnetlink.ElementWriter``: one
``sendmsg`` the kernel answers within the call, tens of µs), on the event loop; through
libnftables each cost a text parse and a cache check (~0.5 ms idle, several ms on a busy
machine) in a thread, and at 5,000 queries/s with one in ten for an allowed name those waits,
and the loop's hand-offs to the thread, were most of the forwarder's p99 (docs/benchmarks.md).
So are the marker checks (two lookups); the listing at ``seed`` and the rare refill stay with
libnftables, in a thread.

What the writer tracks (``_held``: address → when its kernel element expires, by our clock) is
what keeps the kernel work small and the set bounded:

* an address already held with enough time left is skipped: "enough" is at least the wanted
  time minus ``slack`` = min(30 s, ttl_margin / 2). The wanted time is TTL + ttl_margin, so a
  skipped address still outlives every cached copy of the answer by ttl_margin / 2, while a name
  asked every second costs one kernel write per ~30 s, not one per query;
* an address held for less than that but still for at least the answer's TTL plus
  ``COVER_LEFT`` is refreshed without holding the answer back (``covers``): the forwarder sends
  the answer and the refresh follows;
* a held address that needs longer is refreshed by ``delete element`` + ``add element`` in one
  batch (a plain ``add`` of an existing element keeps its old timeout on kernels before 6.x);
  when one expired meanwhile the delete fails the batch, which is retried deleting only those
  the set still holds (asked one by one) and adding the rest;
* at most ``cap`` addresses per family: the kernel set's ``size`` minus the one slot the
  marker takes, and never more than ``max_addresses``. The kernel refuses a *whole* batch with
  "Too many open files in system" when one element does not fit, so the writer never sends an
  address beyond the cap (it is counted in ``garden_set_full`` instead); if the kernel is fuller
  than tracked (elements expired by our clock but not yet collected by the kernel's), the batch
  is retried as refreshes first and then one new address at a time, so one address that does
  not fit never fails the others.

A kernel error is logged (at most once per ``LOG_EVERY`` s) and counted (``kernel_failures``),
never raised: the answer still goes out, the customer's client just cannot connect yet.

The daemon creates the sets empty and may recreate them (a layout change replaces the table;
another tool may flush a set), so the writer adds a marker element without timeout
(``layout.SENTINELS``) whenever it (re)fills a set, and ``watch`` asks for both markers every
second: a missing marker means the set lost its elements, and every live tracked address goes
back in with the time it has left. While the table is missing the writer waits (logged once).
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from ..dataplane.backend import DataplaneError
from ..dataplane.layout import DNS_GARDEN_SETS, SENTINELS
from ..dataplane.libnftables import Nftables, NftError
from ..dataplane.nfnetlink import BatchRefused, ElementWriter
from .settings import ForwarderSettings
from .stats import Stats

__all__ = ["FAMILY_LABELS", "GardenSet", "GardenSetError"]

log = logging.getLogger("walled_garden.dns")

Address = IPv4Address | IPv6Address

#: The ``family`` label of the writer's stats and metrics.
FAMILY_LABELS = {4: "ipv4", 6: "ipv6"}
#: Seconds between two marker checks (``watch``).
WATCH_EVERY = 1.0
#: A repeated kernel failure is logged at most this often (a DNS flood must not flood the log).
LOG_EVERY = 10.0
#: Seconds a tracked address is kept past its expiry before it is forgotten (see ``_prune``).
PRUNE_GRACE = 2.0
#: The longest refresh slack (see the module docstring).
MAX_SLACK = 30.0
#: Addresses per kernel transaction (``nfnetlink.ElementWriter`` has a size limit per batch).
WRITE_CHUNK = 1000
#: Seconds past the answer's TTL an address must still be held for the answer to go before its
#: refresh (``covers``).
COVER_LEFT = 10.0

_MISSING = "No such file or directory"          # ENOENT: no such element, set or table (nft's text)


class GardenSetError(Exception):
    """The sets cannot be used at all (missing table at start); the process exits on it."""


@dataclass(frozen=True)
class _Write:
    """One element to write: a new address or a refresh of a held one."""

    address: Address
    seconds: int
    refresh: bool


class _Throttled:
    """Logs a repeated failure at most once per ``LOG_EVERY`` s, with how many were not logged."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def error(self, event: str, error: str) -> None:
        now = self.clock()
        if now - self._last.get(event, -math.inf) < LOG_EVERY:
            self._skipped[event] = self._skipped.get(event, 0) + 1
            return
        self._last[event] = now
        skipped = self._skipped.pop(event, 0)
        log.error("event=%s error=%s not_logged_since_last=%d", event, error, skipped)


class GardenSet:
    """The writer of ``dnsgarden4``/``dnsgarden6`` in table ``inet settings.table``."""

    def __init__(self, nft: Nftables, settings: ForwarderSettings, stats: Stats,
                 clock: Callable[[], float] = time.monotonic, elements: ElementWriter | None = None) -> None:
        self.nft = nft
        self.elements = elements or ElementWriter(settings.table)
        self.table = settings.table
        self.stats = stats
        self.clock = clock
        self.max_addresses = settings.max_addresses
        self.cap = {4: settings.max_addresses, 6: settings.max_addresses}
        self.slack = min(MAX_SLACK, settings.ttl_margin / 2)
        self.ttl_margin = settings.ttl_margin
        self._held: dict[int, dict[Address, float]] = {4: {}, 6: {}}
        self._expiry: list[tuple[float, int, Address]] = []       # (expires, family, address), lazy
        self._wanted: dict[Address, int] = {}                     # asked for since the last batch
        self._waiting: list[asyncio.Future[None]] = []
        self._writing: asyncio.Task[None] | None = None
        self._kernel = asyncio.Lock()                             # one kernel write at a time
        self._throttled = _Throttled(clock)
        self._table_missing = False

    # -- what is held ---------------------------------------------------------------------------
    def held(self, family: int) -> dict[Address, float]:
        """Live tracked addresses of ``family`` → expiry (by ``clock``), after pruning."""
        self._prune()
        return dict(self._held[family])

    def _track(self, address: Address, expires: float) -> None:
        self._held[address.version][address] = expires
        heapq.heappush(self._expiry, (expires, address.version, address))

    def _prune(self) -> None:
        """Forget addresses the kernel has dropped. ``PRUNE_GRACE`` after their tracked expiry, not
        at it: the tracked time runs a little ahead of the kernel's (taken before the write, or
        read in whole seconds at seed), and an address forgotten while the kernel still holds it
        would be re-added with a plain ``add``, which on kernels before 6.x keeps the old, nearly
        spent timeout while we believe it renewed. Until then a new answer refreshes it
        (``delete`` + ``add``, falling back to ``add`` when it is gone)."""
        now = self.clock() - PRUNE_GRACE
        expiry, held = self._expiry, self._held
        while expiry and expiry[0][0] <= now:
            expires, family, address = heapq.heappop(expiry)
            if held[family].get(address) == expires:     # else refreshed meanwhile: a stale entry
                del held[family][address]
        if len(expiry) > 2 * (len(held[4]) + len(held[6])) + 1024:   # refreshes left stale entries
            self._expiry = [(e, f, a) for f in (4, 6) for a, e in held[f].items()]
            heapq.heapify(self._expiry)

    def _publish(self) -> None:
        for family, label in FAMILY_LABELS.items():
            self.stats.gauge("garden_addresses", (label,), len(self._held[family]))
        self.stats.gauge("garden_capacity", (), min(self.cap.values()))

    # -- start ----------------------------------------------------------------------------------
    async def seed(self) -> None:
        """Track what the sets already hold (a restarted forwarder), learn their size, add the
        markers. Raises ``GardenSetError`` when the table or a set is missing."""
        listings = await asyncio.to_thread(self._list_sets)
        now = self.clock()
        for family, data in listings.items():
            size, elements = _parse_listing(data, DNS_GARDEN_SETS[family])
            if size is not None:
                self.cap[family] = max(0, min(self.max_addresses, size - 1))   # the marker takes a slot
            for key, expires in elements:
                try:
                    address = ip_address(key)
                except ValueError:
                    continue
                if address.version == family and key != SENTINELS[family] and math.isfinite(expires):
                    self._track(address, now + expires)   # one without timeout is not ours: left alone
        try:
            await asyncio.to_thread(self.nft.run, self._markers())
        except NftError as exc:
            raise GardenSetError(f"cannot add the markers to the dnsgarden sets of table inet {self.table}: "
                                 f"{exc}") from None
        self._publish()
        log.info("event=dns_garden_seeded table=%s ipv4=%d ipv6=%d cap_ipv4=%d cap_ipv6=%d", self.table,
                 len(self._held[4]), len(self._held[6]), self.cap[4], self.cap[6])

    def _list_sets(self) -> dict[int, dict[str, Any]]:
        out = {}
        for family, name in DNS_GARDEN_SETS.items():
            try:
                out[family] = self.nft.run_json(f"list set inet {self.table} {name}")
            except NftError as exc:
                raise GardenSetError(f"table inet {self.table} has no set {name} ({exc}); the daemon creates it "
                                     "with walled_garden.dns: gateway") from None
        return out

    def _markers(self) -> str:
        return "".join(f"add element inet {self.table} {name} {{ {SENTINELS[family]} }}\n"
                       for family, name in DNS_GARDEN_SETS.items())

    # -- admit ----------------------------------------------------------------------------------
    def holds(self, addresses: Iterable[tuple[Address, int]]) -> bool:
        """Whether the kernel already holds every address long enough (no write needed): the
        common case, a payment host asked again. Synchronous, so the forwarder answers at once
        instead of going through ``admit``'s task and future (a few loop turns under load)."""
        now = self.clock()
        return all(self._long_enough(address, max(1, math.ceil(seconds)), now) for address, seconds in addresses)

    def covers(self, addresses: Iterable[tuple[Address, int]]) -> bool:
        """Whether the kernel holds every address at least for the answer's TTL (``seconds``
        less ``ttl_margin``) plus ``COVER_LEFT``: then the answer need not wait for the refresh
        to TTL + margin, which follows it (the client may use the answer for its TTL, and the
        refresh lands within milliseconds). Only an address missing or nearly spent holds the
        answer back; a name asked again once its slack is used up no longer does."""
        now, held = self.clock(), self._held
        for address, seconds in addresses:
            expires = held[address.version].get(address)
            if expires is None or expires - now < max(0, seconds - self.ttl_margin) + COVER_LEFT:
                return False
        return True

    def _long_enough(self, address: Address, seconds: int, now: float) -> bool:
        """Whether ``address`` is held for ``seconds`` more, give or take the refresh slack (the
        one rule for skipping a write, in ``holds``, ``admit`` and ``_write``)."""
        expires = self._held[address.version].get(address)
        return expires is not None and expires - now >= seconds - self.slack

    async def admit(self, addresses: Iterable[tuple[Address, int]]) -> None:
        """Hold each address for at least its seconds; returns once the kernel has them (or
        failed: logged and counted, never raised)."""
        wanted, asked, now = self._wanted, False, self.clock()
        for address, seconds in addresses:
            seconds = max(1, math.ceil(seconds))
            if self._long_enough(address, seconds, now):
                continue   # held long enough already: the common case (a name asked again), no write
            asked = True
            if wanted.get(address, 0) < seconds:
                wanted[address] = seconds
        if not asked:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_all())
        await asyncio.shield(future)    # a cancelled query does not cancel the others' batch

    async def _write_all(self) -> None:
        """Batches until nothing is wanted: what arrives during a write goes in the next one."""
        while self._wanted:
            wanted, self._wanted = self._wanted, {}
            waiting, self._waiting = self._waiting, []
            try:
                async with self._kernel:
                    await self._write(wanted)
            except Exception as exc:  # a bug here must not leave queries hanging: logged + counted
                log.exception("event=dns_garden_write_failed error=%s", exc)
                self.stats.count("kernel_failures")
            finally:
                for future in waiting:
                    if not future.done():
                        future.set_result(None)

    async def _write(self, wanted: dict[Address, int]) -> None:
        self._prune()
        now = self.clock()
        writes: list[_Write] = []
        free = {family: self.cap[family] - len(self._held[family]) for family in (4, 6)}
        for address, seconds in wanted.items():
            if self._long_enough(address, seconds, now):
                continue
            if address in self._held[address.version]:
                writes.append(_Write(address, seconds, refresh=True))
            elif free[address.version] > 0:
                free[address.version] -= 1
                writes.append(_Write(address, seconds, refresh=False))
            else:
                self.stats.count("garden_set_full", (FAMILY_LABELS[address.version],))
        if not writes:
            return
        done = self._apply(writes)   # on the loop: see the module docstring
        for write in done:
            self._track(write.address, now + write.seconds)
            if not write.refresh:
                self.stats.count("garden_addresses_added", (FAMILY_LABELS[write.address.version],))
        self._publish()

    def _apply(self, writes: list[_Write]) -> list[_Write]:
        """The writes the kernel took (all, some, or none on an error), ``WRITE_CHUNK`` at a time
        (one netlink batch has a size limit; each chunk is one transaction)."""
        done: list[_Write] = []
        for at in range(0, len(writes), WRITE_CHUNK):
            done += self._apply_chunk(writes[at:at + WRITE_CHUNK])
        return done

    def _apply_chunk(self, writes: list[_Write]) -> list[_Write]:
        gone: set[Address] = {w.address for w in writes if w.refresh}
        try:
            self._run(writes, gone)
            return writes
        except DataplaneError as exc:
            error = exc
        if _refused(error, errno.ENOENT) and gone:
            # A refreshed element expired meanwhile: delete (then add) only those still there,
            # add the others. A plain add of one still there would keep its old timeout on
            # kernels before 6.x while we record the new one.
            try:
                gone = {a for a in gone if self.elements.holds(DNS_GARDEN_SETS[a.version], str(a))}
                self._run(writes, gone)
                return writes
            except DataplaneError as exc:
                error = exc
        if _refused(error, errno.ENFILE):
            return self._apply_one_by_one(writes)
        self._failed("dns_garden_add_failed", str(error))
        return []

    def _apply_one_by_one(self, writes: list[_Write]) -> list[_Write]:
        """The kernel's set is fuller than tracked: refreshes (which free their slot first) go
        together, then each new address alone until one does not fit."""
        done: list[_Write] = []
        refreshes = [w for w in writes if w.refresh]
        if refreshes:
            try:
                self._run(refreshes, set())
                done += refreshes
            except DataplaneError as exc:
                self._failed("dns_garden_add_failed", str(exc))
        full: set[int] = set()
        for write in (w for w in writes if not w.refresh):
            family = write.address.version
            if family in full:
                self.stats.count("garden_set_full", (FAMILY_LABELS[family],))
                continue
            try:
                self._run([write], set())
                done.append(write)
            except DataplaneError as exc:
                if not _refused(exc, errno.ENFILE):
                    self._failed("dns_garden_add_failed", str(exc))
                    return done
                full.add(family)
                self.stats.count("garden_set_full", (FAMILY_LABELS[family],))
        return done

    def _run(self, writes: list[_Write], gone: set[Address]) -> None:
        """One transaction: delete the addresses in ``gone`` (refreshes), add every write."""
        changes = []
        for family, name in DNS_GARDEN_SETS.items():
            mine = [w for w in writes if w.address.version == family]
            changes.append((name, [w.address for w in mine if w.address in gone],
                            [(w.address, w.seconds) for w in mine]))
        self.elements.write(changes)

    def _failed(self, event: str, error: str) -> None:
        self.stats.count("kernel_failures")
        self._throttled.error(event, error)

    async def close(self) -> None:
        """Waits for the write in progress (the forwarder is closed first: no new admits)."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        self.elements.close()

    # -- watch ----------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Every ``WATCH_EVERY`` s: both markers present? If not, refill (see the module docstring)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), WATCH_EVERY)
                return
            except TimeoutError:
                pass
            await self.check()

    async def check(self) -> None:
        """One marker check, and the refill when a marker is missing.

        The check is two exact lookups over netlink (``ElementWriter.holds``, ~20 µs each) on the
        loop. It used to list both sets through libnftables in a thread (``get element`` through
        nft 1.0.6 loads every set of the table after any write, ~0.85 s at 100k subscribers), but
        decoding the JSON listing of a few thousand held addresses took the GIL from the loop for
        milliseconds every second: at 5,000 queries/s that alone put the forwarder's p99 above
        1 ms (docs/benchmarks.md)."""
        self._prune()
        self._publish()
        try:
            marked = all(self.elements.holds(name, SENTINELS[family]) for family, name in DNS_GARDEN_SETS.items())
        except DataplaneError as exc:
            self._failed("dns_garden_check_failed", str(exc))
            return
        if marked:
            if self._table_missing:
                log.info("event=dns_garden_table_back table=%s", self.table)
                self._table_missing = False
            return
        async with self._kernel:
            await self._refill()

    async def _refill(self) -> None:
        now = self.clock()
        entries = {family: sorted(((e - now, a) for a, e in self._held[family].items()), reverse=True)
                   for family in (4, 6)}
        for family in (4, 6):    # the longest-lived first, should the sets have shrunk
            del entries[family][self.cap[family]:]
        # Flushed and written whole, in one transaction: a plain add keeps the timeout an element
        # already has on kernels before 6.x's timeout update (Debian 12's 6.1), and a replace of the
        # table may have carried an element with less time left than this process gave it since.
        lines = [f"flush set inet {self.table} {name}\n" for name in DNS_GARDEN_SETS.values()]
        lines.append(self._markers())
        for family, name in DNS_GARDEN_SETS.items():
            if entries[family]:
                elements = ", ".join(f"{a} timeout {max(1, math.ceil(left))}s" for left, a in entries[family])
                lines.append(f"add element inet {self.table} {name} {{ {elements} }}\n")
        try:
            await asyncio.to_thread(self.nft.run, "".join(lines))
        except NftError as exc:
            if _MISSING in str(exc):
                if not self._table_missing:
                    # Waiting for the daemon to create it; addresses cannot be admitted meanwhile.
                    log.error("event=dns_garden_table_missing table=%s error=%s admitting=paused", self.table, exc)
                    self._table_missing = True
                return
            self._failed("dns_garden_refill_failed", str(exc))
            return
        # A set had lost its marker: the table was recreated or a set flushed.
        log.warning("event=dns_garden_refilled table=%s ipv4=%d ipv6=%d why=marker_lost", self.table,
                    len(entries[4]), len(entries[6]))
        self._table_missing = False
        for family in (4, 6):
            keep = {a for _, a in entries[family]}
            for address in [a for a in self._held[family] if a not in keep]:
                del self._held[family][address]
        self._publish()


def _refused(error: DataplaneError, code: int) -> bool:
    """Did the kernel refuse the batch with ``code`` (ENOENT: an element to delete, or the set or
    table, is gone; ENFILE: an add does not fit the set's ``size``)?"""
    return isinstance(error, BatchRefused) and error.errno == code


def _parse_listing(data: dict[str, Any], name: str) -> tuple[int | None, list[tuple[str, float]]]:
    """The set's ``size`` and its elements as (key, seconds left) from ``nft -j list set``.

    An element without a timeout (the marker, or one another tool added) is listed with +inf
    left; the caller skips the marker."""
    for obj in data.get("nftables", []):
        found = obj.get("set") if isinstance(obj, dict) else None
        if not isinstance(found, dict) or found.get("name") != name:
            continue
        size = found.get("size")
        elements: list[tuple[str, float]] = []
        for item in found.get("elem", []) or []:
            if isinstance(item, str):
                elements.append((item, math.inf))
            elif isinstance(item, dict) and isinstance(item.get("elem"), dict):
                elem = item["elem"]
                if isinstance(elem.get("val"), str):
                    left = elem.get("expires", elem.get("timeout"))
                    elements.append((elem["val"], float(left) if isinstance(left, int | float) else math.inf))
        return (int(size) if isinstance(size, int) else None), elements
    raise GardenSetError(f"nft listed no set {name}")
