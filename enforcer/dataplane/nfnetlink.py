"""nftables over netlink directly, for the few requests that must be fast and exact.

libnftables parses text and keeps a cache of the ruleset, which is what the table's
transactions want. Two kinds of request want neither:

* ``ElementLookup``: ``get element`` and the ruleset's generation id. nft 1.0.6 answers ``get
  element`` only after loading every set's elements into its cache whenever the ruleset changed
  since its last command, and again after a miss: ~0.5 s and ~60 MB of C heap at 125k elements
  (measured), on every check after a payment and at every start (``Reconciler._carries``).
* ``TableStructure``: the table's structure (flags, chains, rules, set declarations, the
  elements of the sets the layout fills itself) as the kernel holds it, for the table check.
  ``nft -t list table`` (terse) would say the same in text, but nft 1.0.6 loads every set's
  elements into its cache first, terse or not: ~0.6 s at 100k subscribers (measured), where
  these dumps of the table's own objects take a few ms whatever the sets hold.
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
import hashlib
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

from .backend import DataplaneError
from .state import Structure, fingerprint, marked_fingerprint

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLM_F_DUMP, NLM_F_DUMP_INTR = 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET = 1
NEWGEN, GETGEN = (NFNL_SUBSYS_NFTABLES << 8) | 15, (NFNL_SUBSYS_NFTABLES << 8) | 16
NEWSETELEM, GETSETELEM, DELSETELEM = ((NFNL_SUBSYS_NFTABLES << 8) | kind for kind in (12, 13, 14))
NEWTABLE, GETTABLE, NEWCHAIN, GETCHAIN, NEWRULE, GETRULE, NEWSET, GETSET = (
    (NFNL_SUBSYS_NFTABLES << 8) | kind for kind in (0, 1, 3, 4, 6, 7, 9, 10))
NEWOBJ, GETOBJ, NEWFLOWTABLE, GETFLOWTABLE = ((NFNL_SUBSYS_NFTABLES << 8) | kind for kind in (18, 19, 22, 23))
NESTED = 0x8000
HEADER = struct.Struct("=IHHII")          # nlmsghdr: length, type, flags, seq, pid
#: Answers read for one request at most: a bound, never a busy loop.
MAX_ANSWERS = 1000
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
#: The largest batch sent at once (the socket's send buffer is ~200 KiB by default).
MAX_BATCH_BYTES = 128 * 1024
#: Elements per message: an attribute's length is 16 bits (~40 bytes per IPv6 element).
ELEMENTS_PER_MESSAGE = 1000
#: The receive buffer of one dump datagram (the kernel fills at most 32 KiB per datagram).
DUMP_BUFFER = 256 * 1024
#: Attempts at a reading of the structure that no commit interrupted (``TableStructure.read``).
STRUCTURE_ATTEMPTS = 5


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

    def dump(self, kind: int, body: bytes, what: str) -> list[bytes] | None:
        """One dump request (``NLM_F_DUMP``): every message of the answer until ``NLMSG_DONE``;
        None when the kernel says ENOENT (no such table or set). ``Interrupted`` when the kernel
        marks the dump inconsistent (a commit during it); ``DataplaneError`` for anything else.

        The socket never blocks here either: the kernel queues the dump's first datagram within
        the ``send`` and each next one within the ``recv`` that makes room for it."""
        with self._lock:
            try:
                sock = self._socket()
                seq = self._next_seq(1)
                sock.send(HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
                out: list[bytes] = []
                for _ in range(MAX_ANSWERS):
                    try:
                        data, _, flags, _ = sock.recvmsg(DUMP_BUFFER)
                    except BlockingIOError:
                        raise OSError(errno.EPROTO, f"netlink: the dump of {what} stopped before its end") from None
                    if flags & socket.MSG_TRUNC:
                        raise OSError(errno.EPROTO, f"netlink: a datagram of the dump of {what} was cut")
                    for message_kind, answer_seq, message in _messages(data):
                        if answer_seq != seq:
                            continue
                        if struct.unpack_from("=H", message, 6)[0] & NLM_F_DUMP_INTR:
                            raise Interrupted(f"{what}: the ruleset changed during the dump")
                        if message_kind == NLMSG_DONE:
                            return out
                        if message_kind == NLMSG_ERROR:
                            error = -struct.unpack_from("=i", message, 16)[0]
                            if error == errno.ENOENT:
                                return None
                            raise OSError(error, os.strerror(error))
                        out.append(message)
                raise OSError(errno.EPROTO, f"netlink: more than {MAX_ANSWERS} datagrams in the dump of {what}")
            except Interrupted:
                self._close()   # the rest of that dump is never read by the next request
                raise
            except (OSError, struct.error) as exc:
                self._close()
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


class Interrupted(DataplaneError):
    """A dump the kernel marked inconsistent: a commit happened while it was being read."""


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

    @property
    def session(self) -> NetlinkSession:
        return self._session

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


def _attributes(data: bytes, offset: int = 0) -> list[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute from ``offset`` on; the type without its
    ``NESTED``/byte-order flag bits."""
    out: list[tuple[int, bytes]] = []
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise OSError(errno.EPROTO, "netlink: malformed attribute")
        out.append((kind & 0x3FFF, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def _encode(attrs: Iterable[tuple[int, bytes]]) -> bytes:
    """A canonical byte string of attributes (type, length, payload), for hashing."""
    return b"".join(struct.pack("=HI", kind, len(value)) + value for kind, value in attrs)


def _first(attrs: Iterable[tuple[int, bytes]], kind: int) -> bytes | None:
    return next((value for k, value in attrs if k == kind), None)


def _text(value: bytes | None) -> str:
    return (value or b"").rstrip(b"\0").decode(errors="replace")


def _u32(value: bytes | None) -> int:
    return int(struct.unpack(">I", value)[0]) if value is not None and len(value) == 4 else 0


#: What of an expression's data is state, not configuration (``linux/netfilter/nf_tables.h``):
#: None, all of it (a counter's packets and bytes, ``last``'s time); else the attribute types
#: dropped: the 64-bit alignment padding (present on some architectures only, by position) and a
#: quota's consumed bytes. Everything else an expression dumps is what the rule says.
_EXPRESSION_STATE: dict[str, frozenset[int] | None] = {
    "counter": None, "last": None, "limit": frozenset({6}), "quota": frozenset({3, 4}),
    "dynset": frozenset({8}), "connlimit": frozenset(),
}
#: ``dynset`` attributes holding expressions of their own (NFTA_DYNSET_EXPR, NFTA_DYNSET_EXPRESSIONS).
_DYNSET_EXPR, _DYNSET_EXPRESSIONS = 7, 10


def _expression(payload: bytes) -> bytes:
    """One NFTA_LIST_ELEM of expressions (NFTA_EXPR_NAME, NFTA_EXPR_DATA) without its state."""
    attrs = _attributes(payload)
    name = _text(_first(attrs, 1))
    out = [(1, name.encode())]
    data = _first(attrs, 2)
    dropped = _EXPRESSION_STATE.get(name, frozenset())
    if data is not None and dropped is not None:
        kept: list[tuple[int, bytes]] = []
        for kind, value in _attributes(data):
            if kind in dropped:
                continue
            if name == "dynset" and kind == _DYNSET_EXPR:
                value = _expression(value)
            elif name == "dynset" and kind == _DYNSET_EXPRESSIONS:
                value = _expressions(value)
            kept.append((kind, value))
        out.append((2, _encode(kept)))
    return _encode(out)


#: The names of the expressions with state, as a dump spells them (NUL-terminated).
_STATEFUL_NAMES = tuple(name.encode() + b"\0" for name in _EXPRESSION_STATE)


def _expressions(payload: bytes) -> bytes:
    """A list of expressions (NFTA_RULE_EXPRESSIONS, NFTA_SET_EXPRESSIONS), each without its
    state; as dumped when none has any (most rules: the walk costs ~4x the dump)."""
    if not any(name in payload for name in _STATEFUL_NAMES):
        return payload
    return _encode((1, _expression(value)) for kind, value in _attributes(payload) if kind == 1)


def _kept(attrs: Iterable[tuple[int, bytes]], keep: frozenset[int]) -> list[tuple[int, bytes]]:
    return [(kind, value) for kind, value in attrs if kind in keep]


def _digest(*chunks: bytes) -> str:
    out = hashlib.blake2b(digest_size=8)
    for chunk in chunks:
        out.update(struct.pack("=I", len(chunk)) + chunk)
    return out.hexdigest()


# What each object's dump keeps: its configuration, not its handle, use count, table name, the
# chain's packet counters or alignment padding (linux/netfilter/nf_tables.h, by attribute number).
_TABLE_KEEP = frozenset({1, 2, 6})                          # name, flags, userdata (comment)
_CHAIN_KEEP = frozenset({3, 4, 5, 7, 10, 12})               # name, hook, policy, type, flags, userdata
_RULE_KEEP = frozenset({5, 7})                              # compat, userdata (expressions apart)
_SET_KEEP = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15})   # name ... obj type (expressions apart)
_ELEMENT_KEEP = frozenset({1, 2, 3, 4, 6, 9, 10})           # key, data, flags, timeout, userdata, objref, key end
_OBJECT_KEEP = frozenset({2, 3, 8})                         # name, type, userdata (data apart)
_FLOWTABLE_KEEP = frozenset({2, 3, 7})                      # name, hook, flags
_SET_ANONYMOUS = 0x1
_TABLE_DORMANT = 0x1
#: Object types whose data is state (NFT_OBJECT_COUNTER, NFT_OBJECT_QUOTA).
_STATEFUL_OBJECTS = frozenset({1, 2})
#: nftnl's userdata tag of an element's comment (NFTNL_UDATA_SET_ELEM_COMMENT).
_UDATA_COMMENT = 0


class TableStructure:
    """The structure of one ``inet`` table as the kernel holds it (``state.Structure``), read with
    netlink dumps of the table's own objects, so its cost does not grow with the sets' elements:
    the table, its chains, rules, sets (declarations, and the elements of anonymous sets and of
    ``static`` named sets), named objects and flowtables, each part without its state (counters,
    handles, use counts). Elements of other sets are never read. Plus the comment of one element
    (``mark``: the layout tag's, which carries the fingerprint of our own install).

    A reading is one generation of the ruleset: the generation id before and after the dumps must
    agree and no dump may be marked interrupted, else it is read again (``STRUCTURE_ATTEMPTS``)."""

    def __init__(self, table: str, session: NetlinkSession) -> None:
        self.table = table
        self._name = table.encode() + b"\0"
        self._session = session

    def read(self, static: Iterable[str], mark: tuple[str, str] | None = None) -> Structure | None:
        """The structure now; None when the table is gone. ``static``: named sets whose elements
        belong to the structure; ``mark``: (set, address) whose element's comment is the mark."""
        wanted = frozenset(static)
        for _ in range(STRUCTURE_ATTEMPTS):
            before = self._generation()
            try:
                structure = self._read(wanted, mark)
            except Interrupted:
                continue
            if self._generation() == before:
                return structure
        raise DataplaneError(f"structure of table inet {self.table}: the ruleset changed during each of "
                             f"{STRUCTURE_ATTEMPTS} readings")

    def _generation(self) -> int:
        return ElementLookup(self.table, self._session).generation()

    def _head(self, family: int = NFPROTO_INET) -> bytes:
        return struct.pack("=BBH", family, 0, 0)

    def _dump(self, kind: int, what: str, extra: bytes = b"") -> list[list[tuple[int, bytes]]] | None:
        """The attributes of each answer of one dump that belongs to our table (attribute 1 is
        the table's name in every kind dumped here); None when the kernel has no such table."""
        messages = self._session.dump(kind, self._head() + attr(1, self._name) + extra, what)
        if messages is None:
            return None
        out = []
        for message in messages:
            attrs = _attributes(message, 20)
            if _first(attrs, 1) == self._name:
                out.append(attrs)
        return out

    def _read(self, static: frozenset[str], mark: tuple[str, str] | None) -> Structure | None:
        table = self._session.ask(GETTABLE, self._head() + attr(1, self._name), (NEWTABLE,), f"get table {self.table}")
        if table is None:
            return None
        table_attrs = _attributes(table, 20)
        parts = {"table": _digest(_encode(_kept(table_attrs, _TABLE_KEEP)))}
        dormant = bool(_u32(_first(table_attrs, 2)) & _TABLE_DORMANT)
        chains = self._dump(GETCHAIN, f"chains of {self.table}")
        rules = self._dump(GETRULE, f"rules of {self.table}")
        sets = self._dump(GETSET, f"sets of {self.table}")
        objects = self._dump(GETOBJ, f"objects of {self.table}")
        flowtables = self._dump(GETFLOWTABLE, f"flowtables of {self.table}")
        if chains is None or rules is None or sets is None or objects is None or flowtables is None:
            return None   # deleted while we looked
        by_chain: dict[str, list[bytes]] = {}
        for attrs in rules:
            expressions = _first(attrs, 4)
            by_chain.setdefault(_text(_first(attrs, 2)), []).append(
                _encode([*_kept(attrs, _RULE_KEEP), (4, _expressions(expressions or b""))]))
        counts: dict[str, int] = {}
        for attrs in chains:
            name = _text(_first(attrs, 3))
            body = by_chain.pop(name, [])
            counts[name] = len(body)
            parts[f"chain {name}"] = _digest(_encode(_kept(attrs, _CHAIN_KEEP)), *body)
        for name, body in by_chain.items():   # rules of a chain the chain dump did not list
            parts[f"rules of {name}"] = _digest(*body)
        for attrs in sets:
            name = _text(_first(attrs, 2))
            declared = _kept(attrs, _SET_KEEP) + [(kind, _expressions(value) if kind == 18 else _expression(value))
                                                 for kind, value in attrs if kind in (17, 18)]
            chunks = [_encode(declared)]
            if _u32(_first(attrs, 3)) & _SET_ANONYMOUS or name in static:
                elements = self._elements(name)
                if elements is None:
                    return None
                chunks += sorted(elements)
            parts[f"set {name}"] = _digest(*chunks)
        for attrs in objects:
            kind = _u32(_first(attrs, 3))
            data = [] if kind in _STATEFUL_OBJECTS else _kept(attrs, frozenset({4}))
            parts[f"object {kind} {_text(_first(attrs, 2))}"] = _digest(_encode(_kept(attrs, _OBJECT_KEEP) + data))
        for attrs in flowtables:
            parts[f"flowtable {_text(_first(attrs, 2))}"] = _digest(_encode(_kept(attrs, _FLOWTABLE_KEEP)))
        marked = self._comment(*mark) if mark is not None else None
        return Structure(fingerprint(parts), parts, counts, dormant, marked_fingerprint(marked))

    def _elements(self, name: str) -> list[bytes] | None:
        """Each element of set ``name``, canonical (no expiry, no counters)."""
        messages = self._session.dump(GETSETELEM, self._head() + attr(1, self._name) + attr(2, name.encode() + b"\0"),
                                      f"elements of {self.table} {name}")
        if messages is None:
            return None
        out: list[bytes] = []
        for message in messages:
            listed = _first(_attributes(message, 20), 3)
            for kind, element in _attributes(listed or b""):
                if kind == 1:
                    out.append(_encode(_kept(_attributes(element), _ELEMENT_KEEP)))
        return out

    def _comment(self, container: str, address: str) -> str | None:
        """The comment of one element (``nft add element ... { <address> comment "..." }``), None
        when it has none or is missing."""
        key = _element(ipaddress.ip_address(address), None)
        body = self._head() + attr(1, self._name) + attr(2, container.encode() + b"\0") + attr(3 | NESTED, key)
        answer = self._session.ask(GETSETELEM, body, (NEWSETELEM,), f"get element {address} in {container}")
        if answer is None:
            return None
        for kind, element in _attributes(_first(_attributes(answer, 20), 3) or b""):
            userdata = _first(_attributes(element), 6) if kind == 1 else None
            offset = 0
            while userdata is not None and offset + 2 <= len(userdata):
                tag, length = userdata[offset], userdata[offset + 1]
                if tag == _UDATA_COMMENT:
                    return _text(userdata[offset + 2:offset + 2 + length])
                offset += 2 + length
        return None


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
