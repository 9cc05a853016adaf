"""Asking the upstream resolvers: UDP for UDP clients, TCP for TCP clients.

UDP (``UdpUpstream``): the forwarder sits on the subscribers' path to every name they resolve,
and it admits addresses into the garden from what the upstream answers; a spoofed answer
accepted here would both poison a client and open the garden. So, as a resolver does against
Kaminsky-style spoofing (RFC 5452): each resolver gets a pool of ``POOL_SIZE`` connected
non-blocking sockets on kernel-chosen random source ports (each re-opened after
``REOPEN_AFTER`` queries, so the ports keep moving), each query gets a fresh random ID (never one
outstanding on that socket), and an answer is accepted only from that resolver's address and port
(the connected socket's kernel filter, checked again here), with an outstanding ID and the
same question section (``_is_answer_to``: the name compared without regard to letter case, as
RFC 4343 compares names, since some resolvers and middleboxes answer with the name lowered; type
and class exactly), or with no question at all when it is an error that RFC 1035 lets a server
send without one (``_is_bare_error``). Anything else is dropped and counted
(``upstream_answers_dropped``). The client's ID is put back in the answer, which otherwise passes
byte for byte. A resolver that does not answer within ``timeout`` (or reports an ICMP error)
is counted (``upstream_failures``) and the next one in ``settings.resolvers`` order is asked;
when all failed the caller answers SERVFAIL.

TCP (``TcpUpstreamSession``): one session per client connection; it keeps one upstream
connection per resolver, opened on first use, RFC 7766 framing (2-byte length), queries
pipelined with fresh IDs and answers matched by ID (and question), so a client's pipeline maps
onto one upstream connection. An upstream that closes an idle connection is simply reconnected.

Both report the seconds spent waiting on upstreams with the answer (``Answer.waited``), so the
forwarder can report its own added latency (total minus that wait).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from .stats import Stats

__all__ = ["BARE_ERRORS", "POOL_SIZE", "RECV_BATCH", "REOPEN_AFTER", "UDP_RECEIVE_BUFFER", "Answer",
           "TcpUpstreamSession", "UdpUpstream", "UpstreamFailed", "large_receive_buffer", "resolver_label"]

log = logging.getLogger("walled_garden.dns")

#: Connected UDP sockets per resolver.
POOL_SIZE = 8
#: Queries a UDP socket sends before it is replaced by one on a new random port.
REOPEN_AFTER = 4096
#: Largest DNS message (TCP length field; also the UDP receive size).
MAX_MESSAGE = 65535
#: Queries at most in flight on one TCP upstream connection (the client's pipeline beyond waits).
TCP_PIPELINE = 64
#: Datagrams read per readiness callback before yielding to the loop.
RECV_BATCH = 64
#: Receive buffer of every UDP socket: ~1 s of queries at 5,000/s, so a pause of the process (a
#: busy CPU) delays answers instead of dropping them (the kernel's default, ~200 KB, holds
#: ~50 ms). Set with SO_RCVBUFFORCE (the forwarder has CAP_NET_ADMIN), else as far as allowed.
UDP_RECEIVE_BUFFER = 4 << 20
#: Seconds between two log lines about one resolver's sockets failing to open.
WARN_EVERY = 10.0
#: Linux's SO_RCVBUFFORCE (<asm-generic/socket.h>); Python's socket module does not name it.
SO_RCVBUFFORCE = 33


def large_receive_buffer(sock: socket.socket) -> None:
    """Give ``sock`` a ``UDP_RECEIVE_BUFFER`` receive buffer, or the largest the system allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)
    except OSError:   # no CAP_NET_ADMIN (tests): capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)


class UpstreamFailed(Exception):
    """No resolver answered in time; the client gets SERVFAIL."""


@dataclass(frozen=True, slots=True)
class Answer:
    wire: bytes      # the resolver's answer, the client's ID restored
    waited: float    # seconds spent waiting on resolvers (failed attempts included)
    resolver: str    # "addr:port" of the resolver that answered


def resolver_label(resolver: tuple[str, int]) -> str:
    host, port = resolver
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _with_id(wire: bytes, qid: int) -> bytes:
    return qid.to_bytes(2, "big") + wire[2:]


class _Entropy:
    """The kernel's CSPRNG (``os.urandom``) read 4 KiB at a time: a query takes four bytes (its ID
    and its socket), and a ``getrandom`` call for each, through ``secrets``, cost more than the
    rest of choosing them (3.3 µs a query, measured)."""

    __slots__ = ("_buffer", "_next")

    def __init__(self) -> None:
        self._buffer = b""
        self._next = 0

    def u16(self) -> int:
        if self._next + 2 > len(self._buffer):
            self._buffer, self._next = os.urandom(4096), 0
        value = (self._buffer[self._next] << 8) | self._buffer[self._next + 1]
        self._next += 2
        return value

    def below(self, n: int) -> int:
        """Uniform in ``range(n)`` (``0 < n <= 65536``), by rejection: no modulo bias."""
        limit = 65536 - 65536 % n
        while True:
            value = self.u16()
            if value < limit:
                return value % n


_entropy = _Entropy()


def _fresh_id(outstanding: Container[int]) -> int:
    """A random 16-bit ID not outstanding in ``outstanding`` (callers keep it below 65536 entries)."""
    while True:
        qid = _entropy.u16()
        if qid not in outstanding:
            return qid


#: RCODEs an upstream may send without the question (QDCOUNT 0): FORMERR, SERVFAIL, NOTIMP, REFUSED.
BARE_ERRORS = frozenset({1, 2, 4, 5})


def _is_answer_to(data: bytes, question: bytes) -> bool:
    """Whether ``data`` (its ID and source already checked) answers ``question``: a response (QR
    set) with that one question, or an error without any (``_is_bare_error``).

    Byte-equal is the common case and is tested first; else the name is compared label by label
    without regard to ASCII letter case (``_same_question``). A resolver or middlebox that lowers
    the name (undoing a client's 0x20 mixed case) answers the same question (RFC 4343), and
    dropping its answer would cost the client a SERVFAIL after ``upstream_timeout`` and the
    resolver a failure it did not commit. The answer still passes as the resolver sent it."""
    if len(data) < 12 or not data[2] & 0x80:
        return False
    if data[4:6] == b"\x00\x01":
        end = 12 + len(question)
        if len(data) < end:
            return False
        echoed = data[12:end]
        return echoed == question or _same_question(echoed, question)
    return data[4:6] == b"\x00\x00" and _is_bare_error(data)


def _same_question(echoed: bytes, question: bytes) -> bool:
    """``echoed`` (as long as ``question``) is ``question`` but for the ASCII letter case of its name.

    Walked label by label over ``question`` (uncompressed: name, type, class): each length octet
    equal exactly, each label's bytes equal after ``bytes.lower`` (which changes A-Z only, so no
    other byte can come to match), the final type and class equal exactly (lowering them would
    make type 0x0041 match 0x0061). A length octet is never lowered: only label bytes are."""
    end = len(question) - 4
    pos = 0
    while pos < end:
        size = question[pos]
        if echoed[pos] != size or size > 63:
            return False
        if size == 0:
            return pos + 1 == end and echoed[end:] == question[end:]
        label, pos = pos + 1, pos + 1 + size
        if echoed[label:pos].lower() != question[label:pos].lower():
            return False
    return False


def _is_bare_error(data: bytes) -> bool:
    """An error answer without a question section: RFC 1035 (4.1.1) lets a server that could not
    read the query leave it out. Taken only when its RCODE is one of ``BARE_ERRORS`` and it holds
    no record but, at most, one OPT (RFC 6891: a server that read the query's OPT answers with
    one) with extended RCODE 0, and nothing after it: an error with nothing in it to admit or
    to poison a cache with, passed to the client as it came (the forwarder admits nothing from it).
    Its source and ID are checked by the caller, as for any answer."""
    if data[3] & 0x0F not in BARE_ERRORS or data[6:10] != b"\x00\x00\x00\x00":
        return False
    if data[10:12] == b"\x00\x00":
        return len(data) == 12
    # One OPT: root owner, type 41, class (payload size), TTL (extended RCODE, version, flags), RDLENGTH.
    return (data[10:12] == b"\x00\x01" and len(data) >= 23 and data[12:15] == b"\x00\x00\x29" and data[17] == 0
            and len(data) == 23 + int.from_bytes(data[21:23], "big"))


class _Pending:
    """A TCP query waiting for its answer."""

    __slots__ = ("future", "question")

    def __init__(self, future: asyncio.Future[bytes], question: bytes) -> None:
        self.future = future
        self.question = question


#: Called once per forwarded UDP query: (the answer with the client's ID, or None when every
#: resolver failed; seconds spent waiting on resolvers; the label of the resolver that answered).
Done = Callable[[bytes | None, float, str], None]


class _UdpQuery:
    """One client query on its way through the resolvers (UDP): no task, no timer of its own."""

    __slots__ = ("deadline", "done", "index", "qid", "question", "sent", "sock", "waited", "wire")

    def __init__(self, wire: bytes, question: bytes, done: Done) -> None:
        self.wire = wire
        self.question = question
        self.done: Done | None = done     # None once answered or failed
        self.index = 0                    # the resolver asked now
        self.waited = 0.0
        self.sent = 0.0
        self.deadline = 0.0
        self.sock: _UdpSocket | None = None
        self.qid = 0


class _UdpSocket:
    """One connected UDP socket to one resolver, its outstanding queries keyed by upstream ID."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolver: tuple[str, int], label: str,
                 upstream: UdpUpstream) -> None:
        self.loop = loop
        self.resolver = resolver
        self.label = label
        self.upstream = upstream
        self.stats = upstream.stats
        host, port = resolver
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            large_receive_buffer(self.sock)
            self.sock.connect((host, port))   # binds a random ephemeral port; the kernel filters the peer
            self.peer = self.sock.getpeername()[:2]
        except OSError:
            self.sock.close()
            raise
        self.outstanding: dict[int, _UdpQuery] = {}
        self.sent = 0
        self.retired = False
        self.closed = False
        loop.add_reader(self.sock.fileno(), self._readable)

    def send(self, query: _UdpQuery) -> bool:
        """Send ``query`` with a fresh ID; False (nothing outstanding) when the send failed."""
        qid = _fresh_id(self.outstanding)
        try:
            self.sock.send(qid.to_bytes(2, "big") + query.wire[2:])
        except OSError:   # buffer full, ICMP error pending, no route: this resolver failed
            return False
        self.sent += 1
        self.outstanding[qid] = query
        query.sock, query.qid = self, qid
        return True

    def forget(self, qid: int) -> None:
        self.outstanding.pop(qid, None)
        if self.retired and not self.outstanding:
            self.close()

    def _readable(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, peer = self.sock.recvfrom(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # An ICMP error (port unreachable...) for this connected socket: the resolver
                # refused; what waits here goes to the next resolver now, not at its timeout.
                for query in list(self.outstanding.values()):
                    self.upstream._failed(query, "error")
                return
            self._received(data, peer)

    def _received(self, data: bytes, peer: tuple[str, int]) -> None:
        query = self.outstanding.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
        if (query is None or query.done is None or tuple(peer[:2]) != tuple(self.peer)
                or not _is_answer_to(data, query.question)):
            self.stats.count("upstream_answers_dropped", (self.label,))
            return
        self.upstream._answered(query, data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for query in list(self.outstanding.values()):
            self.upstream._failed(query, "error")
        self.outstanding.clear()


class UdpUpstream:
    """The UDP resolvers, tried in order.

    ``forward`` is the forwarder's hot path: a query is a small object in a socket's outstanding
    map and in one deadline queue, and ``done`` is called from the socket's read callback (or the
    sweep), with no task, future or timer per query: at 5,000 queries/s those cost more than the
    rest of the forwarder's work (measured, docs/benchmarks.md). All queries share one timeout,
    so the deadline queue is in send order and one sweep timer (at the oldest deadline) serves
    them all. ``ask`` is the awaitable form, for the forwarder's slower paths.
    """

    def __init__(self, resolvers: Sequence[tuple[str, int]], timeout: float, stats: Stats,
                 pool_size: int = POOL_SIZE, reopen_after: int = REOPEN_AFTER) -> None:
        if not resolvers:
            raise ValueError("DNS forwarder: no upstream resolvers")
        self.resolvers = tuple(resolvers)
        self.labels = tuple(resolver_label(resolver) for resolver in self.resolvers)
        self.timeout = timeout
        self.stats = stats
        self.pool_size = pool_size
        self.reopen_after = reopen_after
        self._pools: list[list[_UdpSocket]] = [[] for _ in self.resolvers]
        self._retired: set[_UdpSocket] = set()
        #: (deadline, query) in send order; an entry is stale once its query was answered or re-sent.
        self._deadlines: deque[tuple[float, _UdpQuery]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._warned: dict[int, float] = {}   # resolver index -> when its socket failure was last logged

    def _socket(self, index: int) -> _UdpSocket:
        pool = self._pools[index]
        if len(pool) < self.pool_size:
            sock = _UdpSocket(asyncio.get_running_loop(), self.resolvers[index], self.labels[index], self)
            pool.append(sock)
            return sock
        slot = _entropy.below(len(pool))
        sock = pool[slot]
        if sock.sent >= self.reopen_after or sock.closed or len(sock.outstanding) >= 60000:
            sock.retired = True
            if sock.outstanding:
                self._retired.add(sock)
            else:
                sock.close()
            self._retired = {old for old in self._retired if not old.closed}
            sock = pool[slot] = _UdpSocket(asyncio.get_running_loop(), self.resolvers[index],
                                           self.labels[index], self)
        return sock

    def forward(self, wire: bytes, question: bytes, done: Done) -> None:
        """Ask the resolvers in order for ``wire``; ``done`` gets the first answer, or None."""
        self._ask(_UdpQuery(wire, question, done), 0)

    async def ask(self, wire: bytes, question: bytes) -> Answer:
        """``wire`` (a client's query) answered by the first resolver that answers in time."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

        def done(data: bytes | None, waited: float, label: str) -> None:
            if future.done():
                return
            if data is None:
                future.set_exception(UpstreamFailed(f"no answer from {', '.join(self.labels)}"))
            else:
                future.set_result(Answer(data, waited, label))

        query = _UdpQuery(wire, question, done)
        self._ask(query, 0)
        try:
            return await future
        finally:
            if query.done is not None:   # cancelled while waiting: forget it
                query.done = None
                if query.sock is not None:
                    query.sock.forget(query.qid)

    def _ask(self, query: _UdpQuery, index: int) -> None:
        """Send ``query`` to resolver ``index`` or, failing that, to the ones after it."""
        loop = None
        while index < len(self.resolvers):
            query.index = index
            try:
                sock = self._socket(index)
            except OSError as exc:
                now = time.monotonic()
                if now - self._warned.get(index, -WARN_EVERY) >= WARN_EVERY:   # not once per query
                    self._warned[index] = now
                    # Counted in walled_garden_dns_upstream_failures_total; said again WARN_EVERY later at the earliest.
                    log.warning("event=dns_upstream_socket_failed resolver=%s error=%s quiet_for=%.0fs",
                                self.labels[index], exc, WARN_EVERY)
                self.stats.count("upstream_failures", (self.labels[index], "error"))
                index += 1
                continue
            loop = sock.loop
            query.sent = now = loop.time()
            if sock.send(query):
                query.deadline = now + self.timeout
                self._deadlines.append((query.deadline, query))
                if self._sweep is None:
                    self._sweep = loop.call_at(query.deadline, self._expire)
                return
            self.stats.count("upstream_failures", (self.labels[index], "error"))
            index += 1
        done, query.done = query.done, None
        if done is not None:
            done(None, query.waited, "")

    def _answered(self, query: _UdpQuery, data: bytes) -> None:
        done, query.done = query.done, None
        sock = query.sock
        assert done is not None and sock is not None
        sock.forget(query.qid)
        done(query.wire[:2] + data[2:], query.waited + sock.loop.time() - query.sent, sock.label)

    def _failed(self, query: _UdpQuery, reason: str) -> None:
        """The resolver asked now failed ``query`` (timeout or error): ask the next one."""
        sock = query.sock
        if query.done is None or sock is None:
            return
        sock.forget(query.qid)
        query.sock = None
        query.waited += sock.loop.time() - query.sent
        self.stats.count("upstream_failures", (self.labels[query.index], reason))
        self._ask(query, query.index + 1)

    def _expire(self) -> None:
        """The sweep: fail every query whose deadline passed; schedule at the next deadline."""
        self._sweep = None
        deadlines = self._deadlines
        if not deadlines:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        while deadlines:
            deadline, query = deadlines[0]
            if query.done is None or query.deadline != deadline:   # answered, or re-sent since
                deadlines.popleft()
                continue
            if deadline > now:
                break
            deadlines.popleft()
            self._failed(query, "timeout")
        if self._sweep is not None:   # set by a re-send above, maybe later than the oldest deadline
            self._sweep.cancel()
            self._sweep = None
        if deadlines:
            self._sweep = loop.call_at(max(deadlines[0][0], now + 0.01), self._expire)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._deadlines.clear()
        for pool in self._pools:
            for sock in pool:
                for query in sock.outstanding.values():
                    query.done = None
                sock.close()
            pool.clear()
        for sock in self._retired:
            for query in sock.outstanding.values():
                query.done = None
            sock.close()
        self._retired.clear()


class _TcpConnection:
    """One pipelined RFC 7766 connection to one resolver."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str,
                 stats: Stats) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self.stats = stats
        self.outstanding: dict[int, _Pending] = {}
        self.slots = asyncio.Semaphore(TCP_PIPELINE)
        self.closed = False
        self.used = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                size = int.from_bytes(await self.reader.readexactly(2), "big")
                data = await self.reader.readexactly(size)
                pending = self.outstanding.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
                if pending is None or pending.future.done() or not _is_answer_to(data, pending.question):
                    self.stats.count("upstream_answers_dropped", (self.label,))
                    continue
                pending.future.set_result(data)
        except (asyncio.IncompleteReadError, OSError) as exc:
            self._fail(ConnectionResetError(f"upstream {self.label} closed the connection: {exc}"))
        finally:
            self.close()

    def _fail(self, exc: BaseException) -> None:
        for pending in self.outstanding.values():
            if not pending.future.done():
                pending.future.set_exception(exc)

    async def ask(self, wire: bytes, question: bytes, timeout: float) -> bytes:
        async with self.slots:
            if self.closed:
                raise ConnectionResetError(f"upstream {self.label} connection closed")
            qid = _fresh_id(self.outstanding)
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.outstanding[qid] = _Pending(future, question)
            self.used = True
            try:
                self.writer.write(len(wire).to_bytes(2, "big") + _with_id(wire, qid))
                async with asyncio.timeout(timeout):
                    await self.writer.drain()
                    return await future
            finally:
                self.outstanding.pop(qid, None)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail(ConnectionAbortedError(f"upstream {self.label} connection closed"))
        self.writer.close()
        if self.task is not asyncio.current_task():
            self.task.cancel()


class TcpUpstreamSession:
    """A TCP client connection's upstream side: one pipelined connection per resolver, on demand."""

    def __init__(self, resolvers: Sequence[tuple[str, int]], timeout: float, stats: Stats) -> None:
        self.resolvers = tuple(resolvers)
        self.labels = tuple(resolver_label(resolver) for resolver in self.resolvers)
        self.timeout = timeout
        self.stats = stats
        self._connections: dict[int, _TcpConnection] = {}
        self._connecting: dict[int, asyncio.Future[_TcpConnection]] = {}
        self.closed = False

    async def _connection(self, index: int) -> _TcpConnection:
        connection = self._connections.get(index)
        if connection is not None and not connection.closed:
            return connection
        pending = self._connecting.get(index)
        if pending is not None:   # pipelined queries share one connection attempt
            return await asyncio.shield(pending)
        future: asyncio.Future[_TcpConnection] = asyncio.get_running_loop().create_future()
        self._connecting[index] = future
        try:
            host, port = self.resolvers[index]
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE + 2)
            connection = _TcpConnection(reader, writer, self.labels[index], self.stats)
            if self.closed:
                connection.close()
                raise ConnectionAbortedError("session closed")
            self._connections[index] = connection
            future.set_result(connection)
            return connection
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionAbortedError(str(exc)))
            future.exception()   # retrieved: a lone connect needs no other waiter
            raise
        finally:
            del self._connecting[index]

    async def ask(self, wire: bytes, question: bytes) -> Answer:
        waited = 0.0
        for index, label in enumerate(self.labels):
            started = time.perf_counter()
            try:
                for attempt in range(2):
                    connection = await self._connection(index)
                    reused = connection.used
                    try:
                        data = await connection.ask(wire, question, self.timeout)
                        break
                    except (ConnectionError, asyncio.IncompleteReadError):
                        # An upstream may close an idle connection (RFC 7766 6.2.3) just as we
                        # reuse it: one retry on a fresh connection before blaming the resolver.
                        if attempt or not reused:
                            raise
                        connection.close()
                else:   # pragma: no cover - the loop always breaks or raises
                    raise ConnectionAbortedError("unreachable")
            except TimeoutError:
                self.stats.count("upstream_failures", (label, "timeout"))
                continue
            except OSError:
                self.stats.count("upstream_failures", (label, "error"))
                continue
            finally:
                waited += time.perf_counter() - started
            return Answer(wire[:2] + data[2:], waited, label)
        raise UpstreamFailed(f"no answer from {', '.join(self.labels)} over TCP")

    def close(self) -> None:
        self.closed = True
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
