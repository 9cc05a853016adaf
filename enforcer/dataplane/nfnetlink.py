"""nftables over netlink directly, for the few requests that must be fast and exact.

libnftables parses text and keeps a cache of the ruleset, which is what the table's
transactions want. Two kinds of request want neither:

* ``ElementLookup``: ``get element`` and the ruleset's generation id. nft 1.0.6 answers ``get
  element`` only after loading every set's elements into its cache whenever the ruleset changed
  since its last command, and again after a miss: ~0.5 s and ~60 MB of C heap at 125k elements
  (measured), on every check after a payment and at every start (``Reconciler._carries``).
* ``ElementWriter``: adding (with a timeout) and deleting elements of one set in one batch, for
  the DNS forwarder, which must put an allowed name's addresses in the kernel before it answers.
  Through libnftables that is a text parse plus a cache check, ~0.5 ms idle and several ms on a
  busy machine, run in a thread; over netlink it is one ``sendmsg`` and one ``recv`` that the
  kernel answers within the call (tens of µs: ``tests/bench/bench_dns_set.py``), so it runs on
  the forwarder's loop without a thread.

Why not a library: pyroute2's nftables support builds rules, not set elements with timeouts,
and is a large dependency for three message kinds; the messages here are a few attributes
each (``linux/netfilter/nf_tables.h``, ``nfnetlink.h``), and the kernel tests check every one
against real nftables. A socket is opened on first use, so in the network namespace of the
thread that uses it (``open`` opens it now, e.g. on a thread that entered a namespace); calls
on one object are serialised.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

from .backend import DataplaneError

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET = 1
NEWGEN, GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | 15, (NFNL_SUBSYS_NFTABLES << 8) | 16
NEWSETELEM, GETSETELEM, DELSETELEM = ((NFNL_SUBSYS_NFTABLES << 8) | kind for kind in (12, 13, 14))
NESTED = 0x8000
HEADER = struct.Struct("=IHHII")          # nlmsghdr: length, type, flags, seq, pid
#: Answers read for one request at most: a bound, never a busy loop.
MAX_ANSWERS = 1000
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
#: The largest batch sent at once (the socket's send buffer is ~200 KiB by default).
MAX_BATCH_BYTES = 128 * 1024
#: Elements per message: an attribute's length is 16 bits (~40 bytes per IPv6 element).
ELEMENTS_PER_MESSAGE = 1000


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _element(address: IPv4Address | IPv6Address, timeout_ms: int | None) -> bytes:
    """NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }, NFTA_SET_ELEM_TIMEOUT (be64 ms) }."""
    body = attr(1 | NESTED, attr(1, address.packed))
    if timeout_ms is not None:
        body += attr(4, struct.pack(">Q", timeout_ms))
    return attr(1 | NESTED, body)


class NetlinkSession:
    """One NETLINK_NETFILTER socket with its sequence numbers: single requests and batches.

    The socket never blocks: nfnetlink handles a request, and a whole batch, within the
    ``send``, so every answer is queued when it returns, and an answer missing then never
    comes (a batch the kernel refused as a whole may leave some unsent). Waiting for it would
    stall the caller, the DNS forwarder's event loop among them. Acknowledgements carry only
    the request's header (``NETLINK_CAP_ACK``), so a big batch's acks fit the receive buffer."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open the socket now, in the calling thread's network namespace."""
        with self._lock:
            self._socket()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.setblocking(False)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock

    def _next_seq(self, count: int) -> int:
        """The first of ``count`` fresh sequence numbers (they wrap before 32 bits run out)."""
        if self._seq + count >= 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += count
        return first

    def ask(self, kind: int, body: bytes, answers: tuple[int, ...], what: str) -> bytes | None:
        """One request; the answer's message of a type in ``answers`` (None when the kernel says
        ENOENT). ``DataplaneError`` for any other error."""
        with self._lock:
            try:
                sock = self._socket()
                seq = self._next_seq(1)
                sock.send(HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
                found: bytes | None = None
                for data in self._answers(sock, what):
                    for message_kind, answer_seq, message in _messages(data):
                        if answer_seq != seq:
                            continue
                        if message_kind in answers:
                            found = message
                        elif message_kind == NLMSG_ERROR:
                            error = -struct.unpack_from("=i", message, 16)[0]
                            if error == 0:
                                return found
                            if error == errno.ENOENT:
                                return None
                            raise OSError(error, os.strerror(error))
                raise OSError(errno.EPROTO, "netlink: no acknowledgement")
            except (OSError, struct.error) as exc:
                self._close()   # a fresh socket next time: no answer of this one is read late
                raise DataplaneError(f"{what}: {exc}") from None

    def batch(self, messages: Sequence[tuple[int, int, bytes]], what: str) -> None:
        """Send ``messages`` ((type, flags, body), each acknowledged) as one nftables transaction:
        all applied, or none and ``BatchRefused`` with the first error's errno and message index
        (-1: the kernel refused the batch as a whole, e.g. its commit failed). ``DataplaneError``
        when the socket itself fails or an answer is missing."""
        with self._lock:
            try:
                self._batch(messages, what)
            except BatchRefused as refused:
                if refused.index < 0:
                    self._close()   # its other answers may still come: never read by the next request
                raise
            except (OSError, struct.error) as exc:
                self._close()
                raise DataplaneError(f"{what}: {exc}") from None

    def _batch(self, messages: Sequence[tuple[int, int, bytes]], what: str) -> None:
        sock = self._socket()
        frame = struct.pack("=BBH", 0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        first = self._next_seq(len(messages) + 2)
        last = first + len(messages) + 1
        parts = [HEADER.pack(16 + len(frame), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first, 0) + frame]
        for index, (kind, flags, body) in enumerate(messages, 1):
            parts.append(HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, first + index, 0)
                         + body)
        parts.append(HEADER.pack(16 + len(frame), NFNL_MSG_BATCH_END, NLM_F_REQUEST, last, 0) + frame)
        if sum(len(part) for part in parts) > MAX_BATCH_BYTES:
            raise OSError(errno.EMSGSIZE, f"netlink: a batch of over {MAX_BATCH_BYTES} bytes (split it)")
        sock.sendmsg(parts)
        # Every acknowledged message is answered once the whole batch is processed: committed,
        # or aborted on the first error (then the others' answers say 0). An error on the
        # batch's own begin or end (a failed commit) refuses all of it, whatever else follows.
        pending = set(range(first + 1, last))
        refused: BatchRefused | None = None
        for data in self._answers(sock, what):
            for message_kind, seq, message in _messages(data):
                if message_kind != NLMSG_ERROR:
                    continue
                error = -struct.unpack_from("=i", message, 16)[0]
                if seq in (first, last) and error:
                    raise BatchRefused(error, -1, f"{what}: {os.strerror(error)} (the batch as a whole)")
                if seq not in pending:
                    continue
                pending.discard(seq)
                if error and refused is None:
                    refused = BatchRefused(error, seq - first - 1, f"{what}: {os.strerror(error)}")
            if not pending:
                break
        if pending:
            raise OSError(errno.EPROTO, f"netlink: {len(pending)} message(s) of the batch not answered")
        if refused is not None:
            raise refused

    @staticmethod
    def _answers(sock: socket.socket, what: str) -> Iterable[bytes]:
        """The datagrams queued for us now; none queued is no answer (see the class)."""
        for _ in range(MAX_ANSWERS):
            try:
                yield sock.recv(65536)
            except BlockingIOError:
                raise OSError(errno.EPROTO, f"netlink: no answer queued for {what}") from None
        raise OSError(errno.EPROTO, f"netlink: more than {MAX_ANSWERS} answers to {what}")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _messages(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(type, seq, message) of each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
        if length < 16:
            raise OSError(errno.EPROTO, "netlink: malformed answer")
        yield kind, seq, data[offset:offset + length]
        offset += (length + 3) & ~3


class BatchRefused(DataplaneError):
    """The kernel refused a batch (nothing of it applied): ``errno`` of the first refused message
    and its ``index`` in the batch."""

    def __init__(self, error: int, index: int, text: str) -> None:
        super().__init__(text)
        self.errno = error
        self.index = index


class ElementLookup:
    """Two nftables questions, each one exact kernel answer: ``holds`` is ``nft get element inet
    <table> <set> { <address> }`` (NFT_MSG_GETSETELEM with the key, a hash lookup, ~20 µs) and
    ``generation`` the ruleset's generation id (NFT_MSG_GETGEN), which every committed nftables
    transaction in the namespace moves on by one."""

    def __init__(self, table: str, session: NetlinkSession | None = None) -> None:
        self._table = table.encode() + b"\0"
        self._session = session or NetlinkSession()

    def holds(self, container: str, address: str) -> bool:
        """Does ``container`` of our table hold ``address``? False when the element, the set or
        the table is missing; ``DataplaneError`` for any other answer."""
        key = _element(ipaddress.ip_address(address), None)
        body = (struct.pack("=BBH", NFPROTO_INET, 0, 0)
                + attr(1, self._table) + attr(2, container.encode() + b"\0") + attr(3 | NESTED, key))
        return self._session.ask(GETSETELEM, body, (NEWSETELEM,), f"get element {address} in {container}") is not None

    def generation(self) -> int:
        """The ruleset's generation id now."""
        answer = self._session.ask(GETGEN, struct.pack("=BBH", 0, 0, 0), (NEWGEN,), "get generation")
        offset = 20   # nlmsghdr + nfgenmsg, then the attributes
        while answer is not None and offset + 4 <= len(answer):
            length, kind = struct.unpack_from("=HH", answer, offset)
            if kind & ~NESTED == 1 and length == 8:   # NFTA_GEN_ID, a big-endian u32
                return int(struct.unpack_from(">I", answer, offset + 4)[0])
            offset += max((length + 3) & ~3, 4)
        raise DataplaneError("get generation: no generation id in the kernel's answer")

    def close(self) -> None:
        self._session.close()


class ElementWriter:
    """Deletes and adds (with timeouts) of elements of sets of one ``inet`` table, as one
    transaction: ``write`` applies all of them or none (``BatchRefused`` with the kernel's errno:
    ENOENT for a delete of an element that is gone, ENFILE when an add does not fit the set's
    ``size``). An add of an element the set holds already is not an error (``nft add element``).
    One write holds at most ~3,000 elements (``MAX_BATCH_BYTES``): callers split bigger ones.
    ``holds`` is ``ElementLookup.holds`` on the same socket."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._table = table.encode() + b"\0"
        self._session = NetlinkSession()
        self.holds = ElementLookup(table, self._session).holds

    def open(self) -> None:
        self._session.open()

    def write(self, changes: Iterable[tuple[str, Sequence[IPv4Address | IPv6Address],
                                            Sequence[tuple[IPv4Address | IPv6Address, int]]]]) -> None:
        """``changes``: (set, addresses to delete, (address, timeout seconds) to add) per set; the
        deletes of a set go before its adds (a refresh is a delete and an add in one batch)."""
        head = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr(1, self._table)
        messages: list[tuple[int, int, bytes]] = []
        step = ELEMENTS_PER_MESSAGE
        for name, gone, added in changes:
            named = head + attr(2, name.encode() + b"\0")
            for at in range(0, len(gone), step):
                messages.append((DELSETELEM, 0, named + attr(
                    3 | NESTED, b"".join(_element(a, None) for a in gone[at:at + step]))))
            for at in range(0, len(added), step):
                messages.append((NEWSETELEM, NLM_F_CREATE, named + attr(
                    3 | NESTED, b"".join(_element(a, seconds * 1000) for a, seconds in added[at:at + step]))))
        if messages:
            self._session.batch(messages, f"write elements of table inet {self.table}")

    def close(self) -> None:
        self._session.close()
