"""Kea's memfile lease files (``kea-leases4.csv``, ``kea-leases6.csv``), watched.

The memfile is a CSV log, APPENDED to on every lease change: each row is the newest state of
the lease for its address, so the last row for an address wins. Kea 2.2 writes these headers
(newer versions add columns at the end, e.g. ``pool_id``; columns are found by name):

    v4: address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,
        state,user_context
    v6: address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,prefix_len,
        fqdn_fwd,fqdn_rev,hostname,hwaddr,state,user_context,hwtype,hwaddr_source

v4 or v6 is told by the header. A row is a session when ``state`` is 0 (default: not 1
declined, 2 expired-reclaimed, 3 released), ``valid_lifetime`` is not 0 (a deleted or released
lease is appended with valid_lifetime 0) and ``expire`` is still ahead (4294967295 s lifetime:
infinite). Commas inside values (``hostname``, ``user_context``) are escaped ``&#x2c``.

Lease file cleanup (LFC): Kea renames the lease file to ``<file>.1`` and starts a new, empty
one; ``kea-lfc`` merges ``<file>.2`` (the previous cleanup's result) and ``<file>.1`` into
``<file>.output``, renames it ``<file>.completed``, then to ``<file>.2``, and deletes ``.1``.
So the whole state is, in order, ``.completed`` if it exists, else ``.2`` then ``.1``, then
the lease file (what Kea itself loads at start). Appended rows are read incrementally (from
the remembered offset, the sink ``update``\\s); any other change (a new inode, a shrink, a
companion file changing) reads all of them again and ``replace``\\s: the same state.

Match: v4 ``hwaddr`` as mac, and the relay agent's option 82 circuit-id (sub-option 1) and
remote-id (2) when Kea keeps them (``store-extended-info: true``: ``user_context`` holds
``{"ISC": {"relay-agent-info": "0x…"}}``, or from Kea 2.3 ``{"…": {"sub-options": "0x…", …}}``);
a value of printable ASCII is taken as text, any other as lowercase hex without separators
(write the match key that way). v6: ``hwaddr`` when Kea filled it, else the MAC a DUID-LLT/-LL
embeds, else the lease is skipped (``no_mac`` in ``status``). A v6 address (IA_NA, IA_TA) is
a /128 session, a delegated prefix (IA_PD, lease_type 2) a session for the whole prefix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..match import Match, normal_mac, normal_value
from ..model import Network
from .lease_file import LeaseFileSource, Reading, Stamps, TornRead, mac_from_duid
from .session import Session

#: Lease states (Kea's ``Lease::STATE_*``): only the default one is a lease in use.
STATE_DEFAULT = 0
INFINITE = 0xFFFFFFFF
LEASE_PD = 2
_ESCAPE = re.compile(r"&#x([0-9a-fA-F]{2})")
_HEX_OCTETS = re.compile(r"[0-9a-fA-F]{2}(?::?[0-9a-fA-F]{2})*")
_REQUIRED = {4: ("address", "hwaddr", "valid_lifetime", "expire"),
             6: ("address", "duid", "valid_lifetime", "expire", "lease_type", "prefix_len")}


@dataclass(frozen=True)
class Columns:
    version: int
    index: dict[str, int]

    @classmethod
    def of(cls, header: str) -> Columns:
        names = header.strip().split(",")
        version = 6 if "duid" in names and "lease_type" in names else 4
        missing = [name for name in _REQUIRED[version] if name not in names]
        if names[0] != "address" or missing:
            raise ValueError(f"not a Kea lease file header (missing {', '.join(missing) or 'address first'})")
        return cls(version, {name: i for i, name in enumerate(names)})


@dataclass
class _Parsed:
    """Rows of one stretch of one file: the newest state per key (a Session, or None: no session)."""

    states: dict[str, Session | None]
    consumed: int          # bytes up to the end of the last whole line
    lines: int             # whole lines
    columns: Columns | None


class KeaSource(LeaseFileSource):
    kind: ClassVar[str] = "kea"

    def restart(self) -> None:
        super().restart()
        self._table: dict[str, Session | None] = {}
        self._live: set[str] = set()
        self._offset = 0
        self._lines = 0                              # whole lines read of the lease file
        self._file: tuple[int, int] | None = None   # (device, inode) of the lease file read
        self._columns: Columns | None = None

    def __init__(self, name: str, path: str | os.PathLike[str], poll_interval: float = 0.25, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name, path, poll_interval, clock=clock)
        self.restart()

    def companion(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def watched(self) -> tuple[Path, ...]:
        return (self.path, self.companion(".completed"), self.companion(".2"), self.companion(".1"))

    def settled(self, before: Stamps, after: Stamps) -> bool:
        """Kea only appends: a read of the first ``size`` bytes stays true while the file grows."""
        if any(before[p] != after[p] for p in self.watched()[1:]):
            return False
        old, new = before[self.path], after[self.path]
        return old is not None and new is not None and old[:2] == new[:2] and new[2] >= old[2]

    # -- reading ------------------------------------------------------------------------------
    def parse(self, before: Stamps, previous: Stamps | None, now: float) -> Reading:
        main = before[self.path]
        assert main is not None
        appended = (previous is not None and self._columns is not None and self._file == main[:2]
                    and main[2] >= self._offset and all(before[p] == previous[p] for p in self.watched()[1:]))
        if appended:
            return self._read_appended(main[2], now)
        return self._read_all(before, now)

    def _read_appended(self, size: int, now: float) -> Reading:
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        reading = Reading(sessions=[], incremental=True)
        parsed = _parse(data, self._columns, str(self.path), self._lines + 1, self.name, now, reading)
        started = [s for s in parsed.states.values() if s is not None]
        stopped = [key for key, s in parsed.states.items() if s is None]
        live = len(self._live) + sum(1 for s in started if s.key not in self._live) \
            - sum(1 for key in stopped if key in self._live)
        reading.sessions, reading.stopped, reading.total = started, stopped, live

        def commit() -> None:
            self._table.update(parsed.states)
            self._live.update(s.key for s in started)
            self._live.difference_update(stopped)
            self._offset += parsed.consumed
            self._lines += parsed.lines
        reading.commit = commit
        return reading

    def _read_all(self, before: Stamps, now: float) -> Reading:
        """All of Kea's state: ``.completed`` or ``.2`` + ``.1``, then the lease file."""
        reading = Reading(sessions=[])
        table: dict[str, Session | None] = {}
        completed = self.companion(".completed")
        older = [completed] if before[completed] is not None else \
            [p for p in (self.companion(".2"), self.companion(".1")) if before[p] is not None]
        for path in older:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise TornRead(f"{path} went away while read (lease file cleanup)") from None
            parsed = _parse(data, None, str(path), 1, self.name, now, reading)
            if parsed.consumed != len(data):
                reading.complete = False
                reading.problems.append(("malformed", f"{path}: last line has no end", f"malformed end {path}"))
            table.update(parsed.states)
        main = before[self.path]
        assert main is not None   # poll reads only a lease file that exists
        parsed = _parse(self.path.read_bytes()[:main[2]], None, str(self.path), 1, self.name, now, reading)
        table.update(parsed.states)
        sessions = [s for s in table.values() if s is not None]
        reading.sessions, reading.total = sessions, len(sessions)

        def commit() -> None:
            self._table = table
            self._live = {s.key for s in sessions}
            self._offset, self._lines = parsed.consumed, parsed.lines
            self._columns = parsed.columns
            self._file = main[:2]
        reading.commit = commit
        return reading


def _parse(data: bytes, columns: Columns | None, where: str, first_line: int, source: str, now: float,
           reading: Reading) -> _Parsed:
    """Rows of ``data`` (whole lines only; the header first when ``columns`` is None)."""
    end = data.rfind(b"\n") + 1
    states: dict[str, Session | None] = {}
    lines = data[:end].split(b"\n")[:-1]
    for number, raw in enumerate(lines, first_line):
        place = f"{where}:{number}"
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not line.strip():
            continue
        if columns is None:
            try:
                columns = Columns.of(line)
            except ValueError as error:
                reading.complete = False
                reading.problems.append(("malformed", f"{place}: {error}", f"malformed header {where}"))
                return _Parsed(states, end, len(lines), None)
            continue
        if line.startswith("address,"):
            columns = Columns.of(line) if line.split(",") != list(columns.index) else columns
            continue       # a header again: Kea reopened the file without truncating it
        try:
            key, session = _row(line, columns, source, now, reading)
        except ValueError as error:
            reading.complete = False
            reading.problems.append(("malformed", f"{place}: {error}", f"malformed {line}"))
            continue
        states.pop(key, None)          # keep the order of the newest rows
        states[key] = session
    return _Parsed(states, end, len(lines), columns)


def _row(line: str, columns: Columns, source: str, now: float, reading: Reading) -> tuple[str, Session | None]:
    values = line.split(",")
    if len(values) != len(columns.index):
        raise ValueError(f"{len(values)} columns, the header has {len(columns.index)}")

    def get(name: str, default: str = "") -> str:
        i = columns.index.get(name)
        return _unescape(values[i]) if i is not None else default

    def number(name: str, default: str | None = None) -> int:
        text = get(name, default or "")
        if not text.isdigit():
            raise ValueError(f"{name} {text[:30]!r} is not a number")
        return int(text)

    address = ipaddress.ip_address(_checked(get("address"), "address"))
    valid, expire, state = number("valid_lifetime"), number("expire"), number("state", "0")
    if address.version != columns.version:
        raise ValueError(f"address {address} in a v{columns.version} lease file")
    network: Network
    if columns.version == 6 and number("lease_type") == LEASE_PD:
        network = ipaddress.IPv6Network(f"{address}/{number('prefix_len')}")
        key, detail = str(network), f"prefix {network}"
    else:
        network = ipaddress.ip_network(address)
        key, detail = str(address), f"lease {address}"
    if valid == 0 or state != STATE_DEFAULT or (valid != INFINITE and expire <= now):
        reading.skip("released" if valid == 0 else "not_in_use" if state != STATE_DEFAULT else "expired")
        return key, None
    match = _match(get, columns.version)
    if not match:
        reading.skip("no_mac")
        return key, None
    hostname = get("hostname")
    return key, Session(source, key, match, (network,), expires=None if valid == INFINITE else float(expire),
                        detail=detail + (f", hostname {hostname}" if hostname else ""))


def _match(get: Callable[[str], str], version: int) -> Match:
    mac = _mac(get("hwaddr"))
    if version == 6:
        if mac is None and get("duid"):
            mac = mac_from_duid(get("duid"))
        return Match(mac=mac or "")
    circuit, remote = _relay_ids(get("user_context"))
    return Match(circuit_id=circuit, remote_id=remote, mac=mac or "")


def _mac(text: str) -> str | None:
    """A 6-octet hardware address; None when absent or of another length (InfiniBand ...)."""
    if not text:
        return None
    if not _HEX_OCTETS.fullmatch(text):
        raise ValueError(f"hwaddr {text[:60]!r} is not hex octets")
    try:
        return normal_mac(text)
    except ValueError:
        return None


def _relay_ids(context: str) -> tuple[str, str]:
    """(circuit_id, remote_id) from the relay agent information Kea keeps in ``user_context``."""
    if not context:
        return "", ""
    try:
        data = json.loads(context)
    except json.JSONDecodeError as error:
        raise ValueError(f"user_context is not JSON ({error.msg})") from None
    info = data.get("ISC", {}).get("relay-agent-info") if isinstance(data, dict) else None
    if isinstance(info, dict):
        info = info.get("sub-options")
    if not isinstance(info, str) or not info:
        return "", ""
    digits = info.removeprefix("0x").removeprefix("0X").replace(":", "")
    try:
        octets = bytes.fromhex(digits)
    except ValueError:
        raise ValueError(f"relay-agent-info {info[:60]!r} is not hex") from None
    found = {1: "", 2: ""}
    i = 0
    while i + 2 <= len(octets):
        code, length = octets[i], octets[i + 1]
        value = octets[i + 2:i + 2 + length]
        if len(value) != length:
            raise ValueError(f"relay-agent-info {info[:60]!r}: sub-option {code} runs past the end")
        if code in found:
            found[code] = _id_text("circuit_id" if code == 1 else "remote_id", value)
        i += 2 + length
    return found[1], found[2]


def _id_text(key: str, value: bytes) -> str:
    """Printable ASCII as text, anything else as lowercase hex (empty when neither is a valid value)."""
    for text in (value.decode("ascii", errors="replace"), value.hex()):
        try:
            return normal_value(key, text)
        except ValueError:
            continue
    return ""


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text) if "&#x" in text else text


def _checked(text: str, name: str) -> str:
    if not text:
        raise ValueError(f"{name} is empty")
    return text
