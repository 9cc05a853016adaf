"""Flush a subscriber's tracked connections when their enforcement changes.

Without a flush, connections opened before a restriction keep their NAT and conntrack state,
and connections redirected to the portal keep landing there after a payment. We speak
ctnetlink in-process (``ctnetlink``: kernel-filtered dumps for a few IPv4 addresses, one
parsed full dump otherwise, no process starts) and fall back to the conntrack-tools binary
when the netlink socket cannot be opened; the tool handles IPv4 and IPv6 prefixes through
``--mask-src``.

A flush names its targets as the reconciler's keys (``Key``: version, prefix length, text)
or as ``ipaddress`` networks (``ctnetlink.Target``); the netlink path matches entries on
integers (``ctnetlink.NetworkIndex``), the tool takes each target's text.

A flush can spare connections by ct mark (``keep_mark``: the portal's, ``PORTAL_CT_MARK``,
so the page confirming a lift reaches the customer on the connection that asked for it).
Both paths delete only entries with ``mark & keep_mark == 0``: ctnetlink by a kernel mark
filter checked again in user space, the tool by ``--mark 0/keep_mark`` (the tool compares
``mark & mask == value``, in the kernel's dump filter and again on each entry).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from .batcher import Batcher
from .ctnetlink import Ctnetlink, Target, target_parts

log = logging.getLogger(__name__)
_DELETED = re.compile(r"(\d+) flow entries have been deleted")
_SOURCE = re.compile(r"^\S+\s+\d+\s.*?src=(\S+)", re.MULTILINE)  # the first src= is the original source
#: Above this many networks, one listing per family (two kernel table walks in all) beats a
#: filtered delete per network (one walk each), whatever the number of networks.
BULK_THRESHOLD = 4
#: Flush passes start at least this far apart. Each pass walks the kernel's whole conntrack
#: hash (~19 ms of kernel CPU with 262,144 buckets, however few entries), so under a webhook
#: flood back-to-back passes ate a core; spaced out, one pass serves every event of the gap.
#: A flush after a quiet spell is not delayed.
PASS_INTERVAL = 0.05
#: conntrack processes run at once; each is a short dump-and-delete in the kernel.
CONCURRENCY = 8


class ConntrackError(Exception):
    pass


class Conntrack:
    """Flushes run one pass at a time; requests that arrive meanwhile share the next pass."""

    def __init__(self, binary: str | None = None, netlink: bool = True) -> None:
        self.binary = binary or shutil.which("conntrack") or "/usr/sbin/conntrack"
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._batcher: Batcher[tuple[set[Target], int, asyncio.Future[int]]] | None = None
        self._netlink: Ctnetlink | None = None
        self._use_netlink = netlink            # tried on first use; False after it failed
        self._thread: ThreadPoolExecutor | None = None
        #: Called with (kind of dump, seconds) after each pass: the daemon's metrics.
        self.observe: Callable[[str, float], None] = lambda dump, seconds: None

    async def flush(self, targets: Iterable[Target], keep_mark: int = 0) -> int:
        """Delete entries whose original source is in ``targets`` and whose ct mark has no
        bit of ``keep_mark``; returns how many (in the pass)."""
        wanted = targets if isinstance(targets, set) else set(targets)
        _check_mark(keep_mark)
        if not wanted:
            return 0
        if self._batcher is None:
            self._batcher = Batcher(self._pass, min_interval=PASS_INTERVAL)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._batcher.submit((wanted, keep_mark, done))
        return await done

    async def _pass(self, requests: list[tuple[set[Target], int, asyncio.Future[int]]]) -> None:
        """One flush per distinct ``keep_mark`` among the requests (in practice one)."""
        by_mark: dict[int, list[tuple[set[Target], int, asyncio.Future[int]]]] = {}
        for request in requests:
            by_mark.setdefault(request[1], []).append(request)
        for keep_mark, group in by_mark.items():
            # a lone request (a cold start's 125k keys) is flushed as it is, not copied
            union: set[Target] = group[0][0] if len(group) == 1 else set().union(*(t for t, _, _ in group))
            try:
                deleted = await self.flush_now(union, keep_mark)
            except Exception as exc:  # noqa: BLE001 - every waiter must be answered whatever failed; each re-raises it
                for _, _, done in group:
                    if not done.done():   # a caller that gave up has a cancelled future
                        done.set_exception(exc)
                        done.exception()
                continue
            for _, _, done in group:
                if not done.done():
                    done.set_result(deleted)

    async def flush_now(self, targets: Iterable[Target], keep_mark: int = 0) -> int:
        """Delete every entry whose original source lies in ``targets`` and whose ct mark
        has no bit of ``keep_mark``; returns how many.

        A few networks (an event) get one kernel-filtered delete each. Many (a cold start or
        a big list change) would mean thousands of processes, so we list the table once and
        delete only for the networks that really have connections.
        """
        _check_mark(keep_mark)
        netlink = self._open_netlink()
        started = time.perf_counter()
        if netlink is not None:
            assert self._thread is not None
            flush = functools.partial(netlink.flush, targets, keep_mark=keep_mark)   # a set is read in the thread
            try:
                deleted = await asyncio.get_running_loop().run_in_executor(self._thread, flush)
            except OSError as exc:
                raise ConntrackError(f"conntrack netlink flush failed: {exc}") from None
            self.observe(netlink.last_pass, time.perf_counter() - started)
            return deleted
        parts = list(dict.fromkeys(target_parts(t) for t in targets))
        if len(parts) > BULK_THRESHOLD:
            parts = await self._with_connections(parts, keep_mark)
        results = await asyncio.gather(*(self._flush_one(p, keep_mark) for p in parts), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ConntrackError("; ".join(str(e) for e in errors[:5]))
        self.observe("tool", time.perf_counter() - started)
        return sum(r for r in results if isinstance(r, int))

    def _open_netlink(self) -> Ctnetlink | None:
        if self._netlink is None and self._use_netlink:
            try:
                self._netlink = Ctnetlink()
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="conntrack")
            except OSError as exc:
                self._use_netlink = False
                log.warning("event=conntrack_netlink_unavailable error=%s fallback=conntrack_tool", exc)
        return self._netlink

    async def _with_connections(self, parts: list[tuple[int, int, int]], keep_mark: int) -> list[tuple[int, int, int]]:
        """The subset of ``parts`` (version, address, prefix length) that is the original
        source of at least one entry not kept by ``keep_mark``."""
        index: dict[tuple[int, int], set[int]] = {}
        for version, address, plen in parts:
            index.setdefault((version, plen), set()).add(address)
        found: dict[tuple[int, int, int], None] = {}
        families = [(family, version) for family, version in (("ipv4", 4), ("ipv6", 6))
                    if any(v == version for v, _ in index)]
        listings = await asyncio.gather(*(self._sources(family, keep_mark) for family, _ in families))
        for (_family, version), sources in zip(families, listings, strict=True):
            lengths = [(plen, table) for (v, plen), table in index.items() if v == version]
            width = 32 if version == 4 else 128
            for source in sources:
                value = int(ipaddress.ip_address(source))
                for plen, table in lengths:
                    address = value >> (width - plen) << (width - plen)
                    if address in table:
                        found[(version, address, plen)] = None
        return list(found)

    async def _sources(self, family: str, keep_mark: int) -> set[str]:
        proc = await asyncio.create_subprocess_exec(self.binary, "-L", "-f", family, *_mark_filter(keep_mark),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise ConntrackError(f"conntrack -L -f {family} failed ({proc.returncode}): {err.decode().strip()}")
        return {match.group(1) for match in _SOURCE.finditer(out.decode(errors="replace"))}

    async def _flush_one(self, part: tuple[int, int, int], keep_mark: int) -> int:
        version, address, plen = part
        family, width = (socket.AF_INET, 32) if version == 4 else (socket.AF_INET6, 128)
        argv = [self.binary, "-D", "-f", "ipv4" if version == 4 else "ipv6", "-s", _text(family, width, address)]
        if plen != width:
            argv += ["--mask-src", _text(family, width, ((1 << plen) - 1) << (width - plen))]
        argv += _mark_filter(keep_mark)
        async with self._slots:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
        text = (out + err).decode(errors="replace")
        match = _DELETED.search(text)
        if match:  # exit status is 1 when nothing matched; that is success for us
            return int(match.group(1))
        raise ConntrackError(f"conntrack {' '.join(argv[1:])} failed ({proc.returncode}): {text.strip()}")


def _text(family: int, width: int, value: int) -> str:
    """An address as ``ipaddress`` writes it (``inet_ntop``: RFC 5952 for IPv6)."""
    return socket.inet_ntop(family, value.to_bytes(width // 8, "big"))


def _check_mark(keep_mark: int) -> None:
    if not isinstance(keep_mark, int) or not 0 <= keep_mark <= 0xFFFFFFFF:
        raise ValueError(f"conntrack flush: keep_mark {keep_mark!r} is not a 32-bit ct mark mask")


def _mark_filter(keep_mark: int) -> list[str]:
    """The tool's arguments selecting entries with ``mark & keep_mark == 0`` (none: all)."""
    return ["--mark", f"0/{keep_mark:#x}"] if keep_mark else []
