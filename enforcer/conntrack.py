"""Flush a subscriber's tracked connections when their enforcement changes.

Without a flush, connections opened before a restriction keep flowing (conntrack has already
said yes) and connections redirected to the portal keep landing there after a payment. We use
conntrack-tools: it handles IPv4 and IPv6 prefixes through ``--mask-src`` (pyroute2's kernel
filter is exact-address only, and its IPv6 filter is broken on kernel 6.18).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil

from .subscribers import Network

log = logging.getLogger(__name__)
_DELETED = re.compile(r"(\d+) flow entries have been deleted")
#: conntrack processes run at once; each is a short dump-and-delete in the kernel.
CONCURRENCY = 8


class ConntrackError(Exception):
    pass


class Conntrack:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("conntrack") or "/usr/sbin/conntrack"
        self._slots = asyncio.Semaphore(CONCURRENCY)

    async def flush(self, networks: set[Network] | list[Network]) -> int:
        """Delete every entry whose original source lies in ``networks``; returns how many."""
        results = await asyncio.gather(*(self._flush_one(n) for n in networks), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ConntrackError("; ".join(str(e) for e in errors[:5]))
        return sum(r for r in results if isinstance(r, int))

    async def _flush_one(self, network: Network) -> int:
        family = "ipv4" if network.version == 4 else "ipv6"
        argv = [self.binary, "-D", "-f", family, "-s", str(network.network_address)]
        if network.prefixlen != network.max_prefixlen:
            argv += ["--mask-src", str(network.netmask)]
        async with self._slots:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
        text = (out + err).decode(errors="replace")
        match = _DELETED.search(text)
        if match:  # exit status is 1 when nothing matched; that is success for us
            return int(match.group(1))
        raise ConntrackError(f"conntrack {' '.join(argv[1:])} failed ({proc.returncode}): {text.strip()}")
