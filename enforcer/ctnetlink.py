"""Conntrack over ctnetlink on a raw netlink socket: dumps, kernel-filtered dumps, deletes.

Why not the ``conntrack`` tool: two process starts per flush pass, whose text output is
parsed again here; with a webhook flood that was a fifth of the daemon's throughput. Why not
libnetfilter_conntrack through ctypes (our previous version): a Python callback per entry.
On a gateway whose conntrack table holds 200,000 entries that made one flush pass cost
1.5–1.9 s of CPU, holding the GIL (docs/benchmarks.md). Here:

* **Filtered dumps** (``CTA_FILTER`` on the original source address): the kernel walks its
  table and sends only the entries of that address: ~78 ms per address with 200,000 entries
  (~19 ms when the table is empty: the walk visits every hash bucket either way), with no
  per-entry work in Python. Exact IPv4 addresses only: kernel 6.18's IPv6 filter matches
  nothing (checked on this kernel), and the filter has no prefix masks.
* **Full dumps** of both families, parsed here only as far as the original source address,
  for prefixes, IPv6, and passes with so many addresses that one walk is cheaper than one
  walk each. Which of the two a pass uses follows the measured cost of each.
* **Targets** are the reconciler's keys (``Key``: version, prefix length, address text) or
  ``ipaddress`` networks (tests, tools). They are turned into integers once per pass
  (``NetworkIndex``), and entries are matched on integers: a cold start's 125k keys become
  125k ints in per-prefix-length sets, not 125k ``ipaddress`` networks (~430 bytes and ~1 us
  each).
* **Deletes** echo each matched entry's original tuple (and zone) back in one write.
* **Kept marks**: a flush may spare entries whose ct mark has a bit of ``keep_mark`` (the
  portal's connections, ``PORTAL_CT_MARK``: the page confirming a lift rides one). Every dump
  then carries ``CTA_MARK`` 0 with ``CTA_MARK_MASK`` ``keep_mark``, so the kernel sends only
  entries with ``mark & keep_mark == 0`` (``ctnetlink_filter_match``, any kernel with
  ``CTA_FILTER``); each entry about to be deleted is checked again here, so a kernel that
  ignored the filter still never loses a kept connection.

Every message is read with its lengths checked against the bytes received: a malformed
answer raises ``CtnetlinkError``, never another exception (fuzzed:
tests/unit/test_ctnetlink_fuzz.py).

Blocking: call it from a worker thread.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

from .model import Network

#: What a flush names: a reconciler key (``subscribers.Key``: version, prefix length, address
#: text as ``inet_ntop`` writes it) or a network.
Target: TypeAlias = tuple[int, int, str] | Network
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

NETLINK_NETFILTER = 12
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_CT_NEW, _CT_GET, _CT_DELETE = 1 << 8, (1 << 8) | 1, (1 << 8) | 2      # NFNL_SUBSYS_CTNETLINK << 8 | msg
_CTA_TUPLE_ORIG, _CTA_MARK, _CTA_ZONE, _CTA_MARK_MASK, _CTA_FILTER = 1, 8, 18, 21, 25
_CTA_TUPLE_IP, _CTA_IP_V4_SRC, _CTA_IP_V6_SRC = 1, 1, 3
_CTA_FILTER_ORIG_FLAGS, _CTA_FILTER_REPLY_FLAGS, _CTA_FILTER_F_IP_SRC = 1, 2, 1
_NESTED, _TYPE_MASK = 0x8000, 0x3FFF
_HEADER = struct.Struct("=IHHII")
_SOL_NETLINK, _NETLINK_CAP_ACK, _SO_RCVBUFFORCE = 270, 10, 33
#: Deletes per write; each chunk's acknowledgements are read before the next is sent.
DELETE_CHUNK = 256
#: A kernel that stops answering must not hang every later flush (and the webhooks waiting on them).
RECV_TIMEOUT = 10.0
#: A dump's cost before one was measured: an empty table's walk (262,144 buckets) here.
GUESS = 0.02
_COST_KEY: dict[int, str] = {socket.AF_UNSPEC: "all", socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class CtnetlinkError(OSError):
    pass


def target_parts(target: Target) -> tuple[int, int, int]:
    """(IP version, network address as an integer, prefix length) of one target; a key's text
    goes through ``inet_pton`` (no ``ipaddress`` object)."""
    if isinstance(target, tuple):
        version, plen, text = target
        return version, int.from_bytes(socket.inet_pton(_FAMILIES[version], text), "big"), plen
    return target.version, int(target.network_address), target.prefixlen


class NetworkIndex:
    """The asked targets as integers: ``(version, prefix length) → network addresses``, and
    ``source address → the longest asked prefix length that contains it`` by masked lookups."""

    def __init__(self, targets: Iterable[Target]) -> None:
        self.tables: dict[tuple[int, int], set[int]] = {}
        for target in targets:
            version, address, plen = target_parts(target)
            self.tables.setdefault((version, plen), set()).add(address)
        self.by_length: dict[int, list[tuple[int, int, set[int]]]] = {4: [], 6: []}
        for (version, plen), table in sorted(self.tables.items(), key=lambda item: -item[0][1]):
            width = 32 if version == 4 else 128
            self.by_length[version].append((width - plen, plen, table))

    def count(self, version: int) -> int:
        """How many distinct networks of ``version`` were asked."""
        return sum(len(table) for (v, _), table in self.tables.items() if v == version)

    def exact(self, version: int) -> bool:
        """Are all asked networks of ``version`` single addresses?"""
        width = 32 if version == 4 else 128
        return all(plen == width for v, plen in self.tables if v == version)

    def find(self, version: int, address: int) -> int | None:
        """The prefix length of the longest asked network holding ``address``, or None."""
        for shift, plen, table in self.by_length[version]:
            if address >> shift << shift in table:
                return plen
        return None

    def match(self, source: tuple[int, int]) -> bool:
        """``parse_dump``'s filter: is (version, address) in an asked network? (``find``
        inlined: it runs once per entry of a full dump, 200,000 on a busy gateway)"""
        version, address = source
        for shift, _, table in self.by_length[version]:  # noqa: SIM110 - any() builds a generator per entry
            if address >> shift << shift in table:
                return True
        return False


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload offset, payload end) of the attributes in ``data[offset:end]``.

    ``end`` must lie within ``data``. An attribute shorter than its header or running past
    ``end`` raises ``CtnetlinkError``; trailing bytes too few for a header are padding."""
    while offset + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4 or offset + size > end:
            raise CtnetlinkError(errno.EBADMSG, f"conntrack message: attribute of type {kind & _TYPE_MASK} "
                                                f"at byte {offset} has length {size}, {end - offset} bytes left")
        yield kind & _TYPE_MASK, offset + 4, offset + size
        offset += (size + 3) & ~3


_FIRST = struct.Struct("=HHHHHH")      # CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_IP_V*_SRC: length, type each


def _source(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(IP version, original source address) of one entry's attributes.

    The kernel writes the original tuple first, its IP part first, the source first; that
    layout is read with one unpack (a 200,000-entry dump parses in a fraction of a second).
    Anything else is walked attribute by attribute. An address of the wrong size is no address.
    """
    if start + 12 <= end:
        _, outer, _, inner, size, kind = _FIRST.unpack_from(data, start)
        if outer & _TYPE_MASK == _CTA_TUPLE_ORIG and inner & _TYPE_MASK == _CTA_TUPLE_IP:
            if kind == _CTA_IP_V4_SRC and size == 8 and start + 16 <= end:
                return 4, int.from_bytes(data[start + 12:start + 16], "big")
            if kind == _CTA_IP_V6_SRC and size == 20 and start + 28 <= end:
                return 6, int.from_bytes(data[start + 12:start + 28], "big")
    for kind, offset, stop in _attrs(data, start, end):
        if kind == _CTA_TUPLE_ORIG:
            for ip_kind, ip_offset, ip_stop in _attrs(data, offset, stop):
                if ip_kind == _CTA_TUPLE_IP:
                    for addr_kind, addr_offset, addr_stop in _attrs(data, ip_offset, ip_stop):
                        width = {_CTA_IP_V4_SRC: 4, _CTA_IP_V6_SRC: 16}.get(addr_kind)
                        if width is not None:
                            if addr_stop - addr_offset != width:
                                return None
                            return (4 if width == 4 else 6), int.from_bytes(data[addr_offset:addr_stop], "big")
            return None
    return None


def _mark(data: bytes, start: int, end: int) -> int:
    """One entry's ct mark (0 when it has none: a kernel without marks, or none set)."""
    for kind, offset, stop in _attrs(data, start, end):
        if kind == _CTA_MARK:
            if stop - offset != 4:
                raise CtnetlinkError(errno.EBADMSG,
                                     f"conntrack message: CTA_MARK of {stop - offset} bytes at byte {offset}")
            return int.from_bytes(data[offset:stop], "big")
    return 0


def _identity(data: bytes, start: int, end: int) -> bytes:
    """The attributes that name one entry for a delete: original tuple and zone, as sent
    (the delete also needs the entry's family, from its message header)."""
    family = data[start - 4:start - 3]
    return family + b"".join(data[offset - 4:(stop + 3) & ~3] for kind, offset, stop in _attrs(data, start, end)
                             if kind in (_CTA_TUPLE_ORIG, _CTA_ZONE))


def parse_dump(data: bytes, seq: int, match: Callable[[tuple[int, int]], bool] | None = None,
               keep_mark: int = 0) -> tuple[list[bytes], bool]:
    """Read one ``recv`` of a dump answering request ``seq``: (identities, finished).

    An identity is the family byte plus the attributes a delete needs (``_identity``) of each
    entry whose (version, original source) satisfies ``match`` (all when None) and whose
    mark has no bit of ``keep_mark``. Messages of other sequence numbers are late answers to
    earlier requests and skipped. Lengths are checked against ``data`` before any read:
    anything malformed raises ``CtnetlinkError``, an error answer too.
    """
    found: list[bytes] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise CtnetlinkError(errno.EBADMSG, f"conntrack dump: malformed netlink message at byte {offset} "
                                    f"(length {length}, {len(data) - offset} bytes received)")
        end, start = offset + length, offset + _HEADER.size + 4
        offset += (length + 3) & ~3
        if msg_seq != seq:
            continue                      # a late answer to an earlier request
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            if start > end:
                raise CtnetlinkError(errno.EBADMSG,
                                     f"conntrack dump: error message of {length} bytes has no error code")
            error = struct.unpack_from("=i", data, start - 4)[0]
            if error:
                raise CtnetlinkError(-error if error < 0 else error,
                                     f"conntrack dump failed: {errno.errorcode.get(-error, error)}")
            return found, True
        if kind == _CT_NEW:
            if start > end:
                raise CtnetlinkError(errno.EBADMSG, f"conntrack dump: entry of {length} bytes has no family header")
            if match is not None:
                source = _source(data, start, end)
                if source is None or not match(source):
                    continue
            if keep_mark and _mark(data, start, end) & keep_mark:
                continue
            found.append(_identity(data, start, end))
    return found, False


class Ctnetlink:
    """A ctnetlink socket in this process's network namespace (needs CAP_NET_ADMIN to delete)."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self.sock.bind((0, 0))
            try:   # past net.core.rmem_max: we have CAP_NET_ADMIN anyway, or deletes fail
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 1 << 22)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)   # acks without the request echoed
            self.sock.settimeout(RECV_TIMEOUT)
        except OSError as exc:
            raise CtnetlinkError(exc.errno, f"ctnetlink socket: {exc.strerror}") from None
        self._seq = int(time.time())
        #: Seconds per dump of both families / of one / per kernel-filtered address, as last measured.
        self.costs = {"all": GUESS, "ipv4": GUESS, "ipv6": GUESS, "filtered": GUESS}
        self.last_pass = ""

    def close(self) -> None:
        self.sock.close()

    def flush(self, targets: Iterable[Target], filtered: bool | None = None, keep_mark: int = 0) -> int:
        """Delete every entry whose original source lies in ``targets`` and whose ct mark
        has no bit of ``keep_mark``; returns how many.

        The pass is planned by the costs measured so far (``costs``, seconds; each updated
        when its kind of dump runs): one dump of both families, or the IPv4 addresses by
        kernel-filtered dumps plus one IPv6-only dump. An empty table makes every walk cost
        the same, so a flood of mixed events takes one dump per pass; a big table makes the
        full dump slow, so single events take the filtered ones. ``filtered`` forces the
        filtered IPv4 dumps (tests; exact IPv4 addresses only).
        """
        index = NetworkIndex(targets)
        v4, v6 = index.count(4), index.count(6)
        exact4 = index.exact(4)
        if filtered and not (exact4 and not v6):
            raise ValueError("kernel-filtered dumps match exact IPv4 addresses only")
        if not 0 <= keep_mark <= 0xFFFFFFFF:
            raise ValueError(f"keep_mark {keep_mark!r} is not a 32-bit ct mark mask")
        split = (v4 * self.costs["filtered"] if exact4 else self.costs["ipv4"]) + \
            (self.costs["ipv6"] if v6 else 0.0)
        if filtered is None:
            filtered = exact4 and bool(v4) and split <= (self.costs["all"] if v6 else self.costs["ipv4"])
        found: list[bytes] = []
        if filtered:
            started = time.perf_counter()
            found += [identity for address in index.tables.get((4, 32), ())
                      for identity in self._dump(socket.AF_INET, keep_mark, address.to_bytes(4, "big"))]
            self.costs["filtered"] = (time.perf_counter() - started) / v4
            if v6:
                found += self._full(socket.AF_INET6, index, keep_mark)
        elif v4 and v6:
            found += self._full(socket.AF_UNSPEC, index, keep_mark)
        elif v4 or v6:
            found += self._full(socket.AF_INET if v4 else socket.AF_INET6, index, keep_mark)
        self.last_pass = "filtered" if filtered else "full"
        return self._delete(found)

    def _full(self, family: int, index: NetworkIndex, keep_mark: int) -> list[bytes]:
        """The entries from ``index``'s networks found by one dump of ``family``; records its cost."""
        started = time.perf_counter()
        found = list(self._dump(family, keep_mark, match=index.match))
        self.costs[_COST_KEY[family]] = time.perf_counter() - started
        return found

    def _request(self, kind: int, flags: int, family: int, body: bytes = b"") -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        payload = struct.pack("=BBH", family, 0, 0) + body
        self.sock.send(_HEADER.pack(16 + len(payload), kind, flags, self._seq, 0) + payload)
        return self._seq

    def _dump(self, family: int, keep_mark: int, source: bytes | None = None,
              match: Callable[[tuple[int, int]], bool] | None = None) -> Iterator[bytes]:
        """The identity of each entry from ``source`` (4 bytes, kernel-filtered), or of each entry
        whose (version, original source) satisfies ``match``; entries marked with a bit of
        ``keep_mark`` are left out (by the kernel, and again in ``parse_dump``)."""
        body = b""
        if source is not None:
            body = _attr(_CTA_TUPLE_ORIG | _NESTED,
                         _attr(_CTA_TUPLE_IP | _NESTED, _attr(_CTA_IP_V4_SRC, source)))
            body += _attr(_CTA_FILTER | _NESTED, _attr(_CTA_FILTER_ORIG_FLAGS, struct.pack("=I", _CTA_FILTER_F_IP_SRC))
                          + _attr(_CTA_FILTER_REPLY_FLAGS, struct.pack("=I", 0)))
        if keep_mark:   # the kernel sends entries with (mark & mask) == value: here mark & keep == 0
            body += _attr(_CTA_MARK, struct.pack(">I", 0)) + _attr(_CTA_MARK_MASK, struct.pack(">I", keep_mark))
        seq = self._request(_CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, family, body)
        while True:
            found, finished = parse_dump(self.sock.recv(1 << 20), seq, match, keep_mark)
            yield from found
            if finished:
                return

    def _delete(self, identities: list[bytes]) -> int:
        """Delete the entries (family byte + attributes each); returns how many went.

        In chunks, each acknowledged before the next is sent: 20,000 deletes written at once
        overflowed the socket's receive buffer with their acknowledgements (ENOBUFS, tested).
        An entry that vanished meanwhile is not an error.
        """
        deleted = 0
        for start in range(0, len(identities), DELETE_CHUNK):
            messages, sequences = [], set()
            for identity in identities[start:start + DELETE_CHUNK]:
                self._seq = (self._seq + 1) & 0xFFFFFFFF
                payload = struct.pack("=BBH", identity[0], 0, 0) + identity[1:]
                messages.append(_HEADER.pack(16 + len(payload), _CT_DELETE, _NLM_F_REQUEST | _NLM_F_ACK, self._seq, 0)
                                + payload)
                sequences.add(self._seq)
            self.sock.sendall(b"".join(messages))
            deleted += self._acknowledged(sequences)
        return deleted

    def _acknowledged(self, sequences: set[int]) -> int:
        """Read the acknowledgements of ``sequences``; returns how many report success."""
        ok = 0
        while sequences:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, msg_seq, _pid = _HEADER.unpack_from(data, offset)
                if kind == _NLMSG_ERROR and msg_seq in sequences:
                    if offset + _HEADER.size + 4 > len(data):
                        raise CtnetlinkError(errno.EBADMSG,
                                             f"conntrack delete: acknowledgement at byte {offset} is truncated")
                    sequences.discard(msg_seq)
                    ok += struct.unpack_from("=i", data, offset + _HEADER.size)[0] == 0
                offset += (max(length, _HEADER.size) + 3) & ~3
        return ok
