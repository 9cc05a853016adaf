"""dnsmasq's lease file (``--dhcp-leasefile``, Debian: /var/lib/misc/dnsmasq.leases), watched.

dnsmasq rewrites the whole file in place on every lease change (truncate, write, fsync), so
the file is the whole current set: each trusted read ``replace``\\s the source's sessions.
What dnsmasq 2.90 writes (``lease_update_file``), one lease a line, space separated:

    1796095675 02:00:00:00:10:01 192.0.2.149 pc1 01:02:00:00:00:10:01
    0 02:00:00:00:10:02 192.0.2.200 * *
    duid 00:01:00:01:32:a0:ed:27:02:00:00:00:00:01
    1796099276 4097 2001:db8:1::174 * 00:03:00:01:02:00:00:00:10:01

v4: expiry (epoch seconds; 0 = infinite lease), MAC (``<hwtype>-<addr>`` when not Ethernet),
address, hostname or ``*``, client-id or ``*``. After the server's ``duid`` line, v6: expiry,
IAID (``T`` before it for a temporary address), address, hostname or ``*``, client DUID or
``*``. A v6 lease carries no MAC; a DUID-LLT/-LL client DUID embeds it (``mac_from_duid``) and
then the lease matches like the client's v4 lease; other v6 leases are skipped (``no_mac``
in ``status``), as are non-Ethernet v4 leases.

A lease is a session keyed by its address, matched by its MAC, ending at its expiry. A bad
line is reported ``malformed`` and makes the set incomplete (the sessions it may hold are not
ended); a lease already expired at read time is left out (it ends).
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from ..match import Match, normal_mac
from .lease_file import LeaseFileSource, Reading, Stamps, TornRead, mac_from_duid
from .session import Session

_IAID = re.compile(r"T?[0-9]{1,10}")


class DnsmasqSource(LeaseFileSource):
    kind: ClassVar[str] = "dnsmasq"
    def __init__(self, name: str, path: str | os.PathLike[str], poll_interval: float = 0.25, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name, path, poll_interval, clock=clock)
        # The previous trusted read's sessions by line: dnsmasq rewrites the whole file for
        # each lease that changes, so nearly every line of the next read is one already parsed.
        self._lines: dict[str, Session] = {}

    def parse(self, before: Stamps, previous: Stamps | None, now: float) -> Reading:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            raise TornRead(f"{self.path} ends mid-line")
        known = self._lines
        lines: dict[str, Session] = {}
        reading = parse_leases(data.decode("utf-8", errors="replace"), self.name, str(self.path), now, known, lines)

        def keep() -> None:
            self._lines = lines
        reading.commit = keep
        return reading


def parse_leases(text: str, source: str, where: str, now: float, known: Mapping[str, Session] | None = None,
                 lines: dict[str, Session] | None = None) -> Reading:
    """The sessions of a whole dnsmasq lease file (``where``: its path, for problem reports).
    A line in ``known`` (the previous read) is not parsed again; ``lines`` collects this
    read's, for the next (a 100k-lease file is read in ~0.1 s instead of ~6 s)."""
    reading = Reading(sessions=[])
    by_key: dict[str, Session] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        session = known.get(line) if known else None
        if session is not None:
            if session.expires is not None and session.expires <= now:
                reading.skip("expired")
                continue
        else:
            try:
                session = _lease(line, source, now, reading)
            except ValueError as error:
                reading.complete = False
                reading.problems.append(("malformed", f"{where}:{number}: {error}", f"malformed {line}"))
                continue
        if session is not None:
            by_key[session.key] = session
            if lines is not None:
                lines[line] = session
    reading.sessions = list(by_key.values())
    reading.total = len(reading.sessions)
    return reading


def _lease(line: str, source: str, now: float, reading: Reading) -> Session | None:
    """One line's session; None for the server DUID line and leases skipped (counted in ``reading``)."""
    fields = line.split()
    if fields[0] == "duid":
        if len(fields) != 2:
            raise ValueError(f"'duid' line has {len(fields)} fields, expected 2")
        return None
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} fields, expected 5 (expiry, MAC or IAID, address, hostname, client id)")
    expiry_text, hw, address_text, hostname, client = fields
    if not expiry_text.isdigit():
        raise ValueError(f"expiry {expiry_text[:40]!r} is not seconds since the epoch")
    expiry = int(expiry_text)
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise ValueError(f"address {address_text[:60]!r} is not an IP address") from None
    if address.version == 4:
        if re.fullmatch(r"[0-9a-f]{2}-[0-9a-f:]*", hw):
            reading.skip("no_mac")           # a non-Ethernet client (InfiniBand, ...)
            return None
        try:
            mac = normal_mac(hw)
        except ValueError as error:
            raise ValueError(str(error)) from None
    else:
        if not _IAID.fullmatch(hw):
            raise ValueError(f"IAID {hw[:40]!r} is not a number")
        found = mac_from_duid(client) if client != "*" else None
        if found is None:
            reading.skip("no_mac")           # a v6 lease whose client DUID embeds no MAC
            return None
        mac = found
    if expiry and expiry <= now:
        reading.skip("expired")
        return None
    detail = f"lease {address}" + (f", hostname {hostname}" if hostname != "*" else "")
    return Session(source, str(address), Match(mac=mac), (ipaddress.ip_network(address),),
                   expires=float(expiry) if expiry else None, detail=detail)

