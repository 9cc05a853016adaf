"""The DNS forwarder: restricted subscribers' DNS in, answers out, garden addresses admitted first.

With ``dns: gateway`` every DNS packet of a restricted subscriber is redirected here (SPEC §10).
Each query is rate-limited per client address (REFUSED beyond), forwarded raw to the upstream
resolvers (``upstream``), and the answer goes back to the client. When the question name is an
allowed one (``names``), the answer's addresses for that name and its CNAME chain (``answers``)
are admitted into the kernel's garden sets (``admit``, the kernel writer) BEFORE the answer is
sent, so the client's first connection to the address already finds it open. An admit slower
than ``admit_timeout`` does not hold the answer any longer (counted ``admit_timeouts``; the add
still completes behind it).

Why raw pass-through rather than parsing and re-rendering with dnspython: the client gets
byte for byte what the resolver said (only the ID is put back), so EDNS options, DNSSEC records
and the DO/AD/CD/TC bits are untouched and nothing is ever forged; and it is fast. The queries are
parsed by hand only as far as the question (a label walk: ~1 µs against ~50 µs for dnspython's
question-only parse, measured), answers only for allowed names (dnspython, ``answers``). The
forwarder's own answers (REFUSED, FORMERR, SERVFAIL) are built from the query's header and
question, without records but an OPT when the query had one (RFC 6891 6.1.1).

Bounds: at most ``MAX_OUTSTANDING`` queries in flight (beyond: REFUSED, counted "refused"),
``settings.tcp_clients`` TCP connections (beyond: closed at once), ``TCP_PIPELINE`` queries in
flight per TCP connection (the rest wait unread), ``TCP_IDLE`` seconds of silence per TCP
connection, messages of at most 65535 bytes. Zone transfers (AXFR/IXFR) and opcodes other than
QUERY are refused: they are not name resolution, and a transfer's multi-message answer does not
fit the one-question-one-answer model.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import dns.exception
import dns.name

from .answers import Address, AnswerError, garden_addresses
from .limits import RateLimiter
from .names import AllowedNames
from .settings import ForwarderSettings
from .stats import Stats
from .upstream import (
    MAX_MESSAGE,
    RECV_BATCH,
    TcpUpstreamSession,
    UdpUpstream,
    UpstreamFailed,
    large_receive_buffer,
)

__all__ = ["ADMIT_TIMEOUT", "EDNS_PAYLOAD", "MAX_OUTSTANDING", "TCP_IDLE", "TCP_PIPELINE", "Admit", "Forwarder",
           "Query", "parse_query", "reply"]

log = logging.getLogger("walled_garden.dns")

Admit = Callable[[list[tuple[IPv4Address | IPv6Address, int]]], Awaitable[None]]

#: Seconds an answer waits at most for its addresses to be admitted.
ADMIT_TIMEOUT = 1.0
#: Queries in flight at most (UDP and TCP together).
MAX_OUTSTANDING = 4096
#: Seconds a TCP client connection may stay silent with nothing in flight (RFC 7766 6.2.3).
TCP_IDLE = 10.0
#: Queries in flight at most per TCP client connection.
TCP_PIPELINE = 32

RCODE_FORMERR, RCODE_SERVFAIL, RCODE_REFUSED = 1, 2, 5
#: The UDP payload size the forwarder's own answers advertise in their OPT (RFC 6891 6.2.5): 1232,
#: the DNS Flag Day 2020 value, which no usual path fragments.
EDNS_PAYLOAD = 1232
#: The DNSSEC OK bit of an OPT's flags (RFC 3225), copied from the query into the answer.
EDNS_DO = 0x8000
QTYPE_IXFR, QTYPE_AXFR = 251, 252


@dataclass(frozen=True, slots=True)
class Query:
    """What the forwarder reads of a query: its header fields and its question, uncompressed."""

    wire: bytes
    question: bytes   # the question section: name (wire form) + type + class
    opcode: int
    qtype: int

    @property
    def name(self) -> bytes:
        return self.question[:-4]


def parse_query(wire: bytes) -> Query | None:
    """``wire`` as a query with one uncompressed question, or None when it is not one.

    A response (QR set), a question count other than one, a compressed or over-long question
    name, or a message cut inside its question is not a query the forwarder forwards.
    """
    end = len(wire)
    if end < 17 or end > MAX_MESSAGE or wire[2] & 0x80 or wire[4:6] != b"\x00\x01":
        return None
    pos = 12
    while True:
        if pos >= end:
            return None
        size = wire[pos]
        if size == 0:
            break
        if size > 63:   # a compression pointer or an extended label type: not in a query's question
            return None
        pos += size + 1
    pos += 1
    if pos - 12 > 255 or pos + 4 > end:
        return None
    return Query(wire, wire[12:pos + 4], (wire[2] >> 3) & 0x0F, int.from_bytes(wire[pos:pos + 2], "big"))


def reply(wire: bytes, rcode: int, question: bytes = b"") -> bytes:
    """The forwarder's own answer to ``wire``: same ID, opcode and RD, ``rcode``, the question, and
    an OPT when the query had one (RFC 6891 6.1.1: a responder MUST answer an OPT with an OPT;
    ``_edns_flags``): ``EDNS_PAYLOAD``, version 0, the query's DO bit (RFC 3225 3), no options."""
    flags = 0x80 | (wire[2] & 0x79)   # QR + the query's opcode and RD
    edns = _edns_flags(wire)
    opt = b"" if edns is None else (b"\x00\x00\x29" + EDNS_PAYLOAD.to_bytes(2, "big") + b"\x00\x00"
                                    + (edns & EDNS_DO).to_bytes(2, "big") + b"\x00\x00")
    return (wire[:2] + bytes((flags, rcode & 0x0F)) + (b"\x00\x01" if question else b"\x00\x00")
            + b"\x00\x00\x00\x00" + (b"\x00\x01" if opt else b"\x00\x00") + question + opt)


def _edns_flags(wire: bytes) -> int | None:
    """The flags of ``wire``'s OPT record (its TTL's low 16 bits), or None when it has none.

    Walked record by record (names skipped, compression pointers included; every step checked
    against the message's end): the forwarder answers malformed queries too, and a FORMERR to one
    whose OPT is readable carries an OPT as well. Anything unreadable before the OPT: None."""
    end = len(wire)
    if end < 12:
        return None
    counts = [int.from_bytes(wire[at:at + 2], "big") for at in (4, 6, 8, 10)]
    if not counts[3]:
        return None
    questions, additional = counts[0], counts[0] + counts[1] + counts[2]
    pos = 12
    for index in range(additional + counts[3]):   # each step moves ``pos`` on: bounded by ``end`` too
        pos = _past_name(wire, pos)
        if pos < 0:
            return None
        if index < questions:
            pos += 4
            continue
        if pos + 10 > end:
            return None
        if index >= additional and wire[pos:pos + 2] == b"\x00\x29":
            return int.from_bytes(wire[pos + 6:pos + 8], "big")
        pos += 10 + int.from_bytes(wire[pos + 8:pos + 10], "big")
    return None


def _past_name(wire: bytes, pos: int) -> int:
    """Where the name at ``pos`` ends (a pointer ends it), or -1 when it does not within ``wire``."""
    end = len(wire)
    while pos < end:
        size = wire[pos]
        if size == 0:
            return pos + 1
        if size >= 0xC0:
            return pos + 2 if pos + 2 <= end else -1
        if size > 63:
            return -1
        pos += size + 1
    return -1


#: ``IP_PKTINFO`` (<linux/in.h>); Python's socket module names only the IPv6 one.
IP_PKTINFO = 8


class _UdpListener:
    """One bound UDP socket read straight from the loop's selector: up to ``RECV_BATCH`` datagrams
    per readiness callback, answers sent on the same socket. Not an asyncio datagram transport:
    its per-datagram bookkeeping (a callback per packet, a send buffer for a socket that never
    blocks in practice) was a tenth of the forwarder's CPU at 5,000 queries/s. An answer the
    kernel has no room for is dropped and counted; the client asks again.

    Each answer leaves from the address its query was sent to (``IP_PKTINFO``/``IPV6_PKTINFO``,
    as dnsmasq and unbound do): the socket listens on the wildcard, the nat hook redirected the
    query to the first address of the interface it came in on, and on an interface with several
    subnets the route back to the client may prefer another source. An answer from that other
    address would match no conntrack entry, would not be translated back to the resolver the
    client asked, and the client would drop it. So the client's address tuple handed to the
    forwarder carries, as its last item, the ancillary data to send the answer with."""

    def __init__(self, forwarder: Forwarder, sock: socket.socket) -> None:
        self.forwarder = forwarder
        self.sock = sock
        self.closed = False
        self.v6 = sock.family == socket.AF_INET6
        if self.v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        recvmsg, query = self.sock.recvmsg, self.forwarder._udp_query
        for _ in range(RECV_BATCH):
            try:
                data, ancillary, _flags, addr = recvmsg(MAX_MESSAGE, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # e.g. an ICMP error queued for an earlier answer: not fatal
                log.debug("event=dns_udp_receive_failed error=%s", exc)
                continue
            query(data, (*addr, self._reply_from(ancillary)), self)

    def _reply_from(self, ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
        """The ancillary data that sends an answer from the query's destination address."""
        for level, kind, value in ancillary:
            if self.v6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= 20:
                return [(level, kind, value[:20])]   # in6_pktinfo: that address, that interface
            if not self.v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                # in_pktinfo {ifindex, spec_dst, addr}: leave from addr (the query's destination)
                return [(level, kind, b"\0\0\0\0" + value[8:12] + b"\0\0\0\0")]
        return []

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.closed:
            return
        try:
            self.sock.sendmsg([data], addr[-1], 0, addr[:-1])
        except OSError as exc:
            self.forwarder.stats.count("answers_dropped")
            log.debug("event=dns_answer_not_sent client=%s error=%s", addr[0], exc)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Forwarder:
    """UDP and TCP DNS listeners on ``settings.listen`` × ``settings.port`` forwarding upstream."""

    def __init__(self, settings: ForwarderSettings, admit: Admit, stats: Stats, *,
                 limiter: RateLimiter | None = None, admit_timeout: float = ADMIT_TIMEOUT,
                 max_outstanding: int = MAX_OUTSTANDING, tcp_idle: float = TCP_IDLE,
                 held: Callable[[list[tuple[IPv4Address | IPv6Address, int]]], bool] | None = None,
                 covered: Callable[[list[tuple[IPv4Address | IPv6Address, int]]], bool] | None = None) -> None:
        """``held`` (the kernel writer's): whether addresses are already in long enough, so an
        answer needs no ``admit`` at all; ``covered``: whether they are in for the answer's TTL
        (and a little more) though not as long as wanted, so the answer goes at once and the
        refresh follows it (``GardenSet.covers``)."""
        self.settings = settings
        self.admit = admit
        self.held = held
        self.covered = covered
        self.stats = stats
        self.names = AllowedNames(settings.names, settings.suffixes)
        self.limiter = limiter or RateLimiter(settings.query_rate, settings.query_burst)
        # Allowed names have a bucket of their own: a household whose apps hammer blocked
        # services must still resolve the payment page.
        self.garden_limiter = RateLimiter(settings.query_rate, settings.query_burst)
        self.refused = tuple(ip_network(prefix) for prefix in settings.refused)
        self.admit_timeout = admit_timeout
        self.max_outstanding = max_outstanding
        self.tcp_idle = tcp_idle
        self.udp_upstream = UdpUpstream(settings.resolvers, settings.upstream_timeout, stats)
        self._udp: list[_UdpListener] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tcp_clients: set[asyncio.Task[Any]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self.bound: list[tuple[str, int]] = []   # (address, port) actually bound, for tests and logs
        self._inflight = 0   # UDP queries on the callback path (``_udp_query``), not tasks

    @property
    def outstanding(self) -> int:
        return len(self._tasks) + self._inflight

    @property
    def tcp_clients(self) -> int:
        return len(self._tcp_clients)

    # --- start / close -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on every listen address; OSError naming the address if one fails.

        The IPv6 wildcard on a machine without IPv6 (``ipv6.disable=1``: no AF_INET6 sockets) is
        skipped with a warning when another address binds: there is no IPv6 DNS to redirect."""
        try:
            for host in self.settings.listen:
                try:
                    udp_sock, tcp_sock = _bound_sockets(host, self.settings.port)
                except OSError as exc:
                    if host == "::" and exc.errno == errno.EAFNOSUPPORT and len(self.settings.listen) > 1:
                        # IPv6 is disabled on this machine.
                        log.warning("event=dns_forwarder_no_ipv6 listening=ipv4_only")
                        continue
                    raise
                self._udp.append(_UdpListener(self, udp_sock))
                server = await asyncio.start_server(self._tcp_client, sock=tcp_sock, limit=MAX_MESSAGE + 2)
                self._servers.append(server)
                self.bound.append((host, udp_sock.getsockname()[1]))
        except BaseException:
            await self.close()
            raise
        log.info("event=dns_forwarder_listening listen=%s transports=udp,tcp resolvers=%s",
                 ",".join(f"{host}:{port}" for host, port in self.bound), ",".join(self.udp_upstream.labels))

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        self._udp.clear()
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        # TCP client handlers end on their own once their connection is closed (asyncio's server
        # logs a handler task that ends cancelled as an error).
        for writer in self._tcp_writers:
            writer.close()
        if self._tasks or self._tcp_clients:
            await asyncio.gather(*self._tasks, *self._tcp_clients, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self.udp_upstream.close()

    # --- per query -----------------------------------------------------------------------------

    def _admission(self, wire: bytes, client: str, transport: str) -> tuple[Query | None, bytes | None, bool]:
        """The query to forward, or the answer (possibly none) the forwarder gives itself; and
        whether the query's name is an allowed one (read once, here)."""
        if len(wire) < 12 or wire[2] & 0x80:   # no header, or a response: never answered
            self.stats.count("queries", (transport, "malformed"))
            return None, None, False
        query = parse_query(wire)
        allowed = query is not None and self.names.allows_wire(query.name)
        limiter = self.garden_limiter if allowed else self.limiter
        if not limiter.allow(client_key(client)):
            self.stats.count("queries", (transport, "rate_limited"))
            return None, reply(wire, RCODE_REFUSED, query.question if query else b""), False
        if query is None:
            self.stats.count("queries", (transport, "malformed"))
            return None, reply(wire, RCODE_FORMERR), False
        if query.opcode != 0 or query.qtype in (QTYPE_AXFR, QTYPE_IXFR) or self.outstanding >= self.max_outstanding:
            self.stats.count("queries", (transport, "refused"))
            return None, reply(wire, RCODE_REFUSED, query.question), False
        return query, None, allowed

    def _udp_query(self, data: bytes, addr: tuple[Any, ...], transport: _UdpListener) -> None:
        started = time.perf_counter()
        query, answer, allowed = self._admission(data, addr[0], "udp")
        if answer is not None:
            transport.sendto(answer, addr)
        if query is None:
            return
        # Callbacks only, no task per query (see ``UdpUpstream``); an allowed name's answer whose
        # addresses the kernel does not hold yet waits for them in a task of its own.
        self._inflight += 1

        def answered(wire: bytes | None, waited: float, resolver: str) -> None:
            self._inflight -= 1
            if transport.is_closing():   # shutting down: no answer, and no task ``close`` would miss
                return
            if wire is None:
                self.stats.count("queries", ("udp", "upstream_failed"))
                wire = reply(query.wire, RCODE_SERVFAIL, query.question)
            elif allowed and (kept := self._guarded_to_admit(query, wire, resolver)):
                task = asyncio.get_running_loop().create_task(
                    self._send_admitted(kept, wire, addr, transport, started, waited))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            else:
                self.stats.count("queries", ("udp", "forwarded"))
                self.stats.observe_added(max(0.0, time.perf_counter() - started - waited))
            transport.sendto(wire, addr)

        self.udp_upstream.forward(query.wire, query.question, answered)

    async def _send_admitted(self, kept: list[tuple[Address, int]], wire: bytes, addr: tuple[Any, ...],
                             transport: _UdpListener, started: float, waited: float) -> None:
        await self._admit(kept)
        self.stats.count("queries", ("udp", "forwarded"))
        self.stats.observe_added(max(0.0, time.perf_counter() - started - waited))
        if not transport.is_closing():
            transport.sendto(wire, addr)

    async def _resolve(self, query: Query, upstream: UdpUpstream | TcpUpstreamSession, transport: str,
                       started: float) -> bytes:
        """The answer to send for ``query``: the upstream's (after admission) or SERVFAIL."""
        try:
            answer = await upstream.ask(query.wire, query.question)
        except UpstreamFailed:
            self.stats.count("queries", (transport, "upstream_failed"))
            return reply(query.wire, RCODE_SERVFAIL, query.question)
        if self.names.allows_wire(query.name) and (kept := self._to_admit(query, answer.wire, answer.resolver)):
            await self._admit(kept)
        self.stats.count("queries", (transport, "forwarded"))
        self.stats.observe_added(max(0.0, time.perf_counter() - started - answer.waited))
        return answer.wire

    def _guarded_to_admit(self, query: Query, wire: bytes, resolver: str) -> list[tuple[Address, int]]:
        """``_to_admit`` in the upstream's read callback: a bug in it must not cost this query its
        answer, nor the rest of the read batch its turn (logged and counted; the answer goes)."""
        try:
            return self._to_admit(query, wire, resolver)
        except Exception as exc:
            log.error("event=dns_garden_admit_failed resolver=%s error=%s", resolver, exc, exc_info=exc)
            self.stats.count("admit_failures")
            return []

    def _to_admit(self, query: Query, wire: bytes, resolver: str) -> list[tuple[Address, int]]:
        """The addresses of an allowed name's answer that the kernel must hold before it is sent:
        none when it holds them all long enough already (the common case: the answer goes at once)."""
        self.stats.count("garden_answers")
        try:
            qname = dns.name.from_wire(query.question, 0)[0]
            addresses = garden_addresses(wire, qname, self.settings.max_ttl, self.settings.ttl_margin)
        except (AnswerError, dns.name.NameTooLong, dns.exception.FormError) as exc:
            log.debug("event=dns_garden_answer_unparsable resolver=%s error=%s", resolver, exc)
            self.stats.count("garden_answers_unparsable")
            return []
        kept = [(address, seconds) for address, seconds in addresses if self._admissible(address)]
        if len(kept) < len(addresses):
            self.stats.count("garden_addresses_refused", by=len(addresses) - len(kept))
        if not kept or (self.held is not None and self.held(kept)):
            return []
        if self.covered is not None and self.covered(kept):
            refresh = asyncio.ensure_future(self.admit(kept))   # behind the answer, not before it
            self._tasks.add(refresh)
            refresh.add_done_callback(self._tasks.discard)
            refresh.add_done_callback(self._admitted)
            return []
        return kept

    async def _admit(self, kept: list[tuple[Address, int]]) -> None:
        """Wait (at most ``admit_timeout``) for the kernel to hold ``kept``."""
        task = asyncio.ensure_future(self.admit(kept))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.admit_timeout)
        except asyncio.CancelledError:
            task.add_done_callback(self._admitted)
            raise
        if not done:
            # The answer goes now; the add completes (or fails, logged) behind it.
            self.stats.count("admit_timeouts")
        task.add_done_callback(self._admitted)

    def _admissible(self, address: IPv4Address | IPv6Address) -> bool:
        """Whether an allowed name's address may open the garden: never a subscriber's own (an
        allowed name pointing there would let every restricted subscriber reach that one on all
        ports), nor loopback, link-local, multicast, unspecified or reserved space."""
        if (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified
                or address.is_reserved):
            return False
        return not any(address in prefix for prefix in self.refused)

    def _admitted(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The kernel writer counts and logs its own failures; this is a bug in it: say so loudly.
            log.error("event=dns_garden_admit_failed error=%s", exc, exc_info=exc)
            self.stats.count("admit_failures")

    # --- TCP -----------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tcp_clients) >= self.settings.tcp_clients:
            writer.close()
            self.stats.count("tcp_clients_refused")
            return
        self._tcp_clients.add(task)
        self._tcp_writers.add(writer)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        upstream = TcpUpstreamSession(self.settings.resolvers, self.settings.upstream_timeout, self.stats)
        slots = asyncio.Semaphore(TCP_PIPELINE)
        mine: set[asyncio.Task[Any]] = set()
        try:
            while True:
                await slots.acquire()   # a full pipeline: stop reading until one answer left
                try:
                    head = await self._tcp_head(reader, mine)
                    if head is None:
                        break
                    started = time.perf_counter()
                    # A message cut short for this long is a dead or hostile client: close.
                    async with asyncio.timeout(self.tcp_idle):
                        data = await reader.readexactly(int.from_bytes(head, "big"))
                except BaseException:
                    slots.release()
                    raise
                query, answer, _ = self._admission(data, client, "tcp")
                if answer is not None:
                    writer.write(len(answer).to_bytes(2, "big") + answer)
                    # A client that does not read what it is refused does not pile it up here.
                    async with asyncio.timeout(self.tcp_idle):
                        await writer.drain()
                if query is None:
                    slots.release()
                    continue
                job = asyncio.get_running_loop().create_task(self._forward_tcp(query, upstream, writer, started))
                for group in (mine, self._tasks):
                    group.add(job)
                    job.add_done_callback(group.discard)
                job.add_done_callback(lambda _job: slots.release())
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass   # the client closed, reset or stalled mid-message: its answers have nowhere to go
        finally:
            for job in mine:
                job.cancel()
            if mine:
                await asyncio.gather(*mine, return_exceptions=True)
            upstream.close()
            writer.close()
            self._tcp_clients.discard(task)
            self._tcp_writers.discard(writer)

    async def _tcp_head(self, reader: asyncio.StreamReader, mine: set[asyncio.Task[Any]]) -> bytes | None:
        """The next message's length field, or None once the client is idle (nothing in flight)."""
        while True:
            try:
                async with asyncio.timeout(self.tcp_idle):
                    return await reader.readexactly(2)   # consumes nothing if cancelled
            except TimeoutError:
                if not mine:
                    return None

    async def _forward_tcp(self, query: Query, upstream: TcpUpstreamSession, writer: asyncio.StreamWriter,
                           started: float) -> None:
        answer = await self._resolve(query, upstream, "tcp", started)
        if writer.is_closing():
            return
        writer.write(len(answer).to_bytes(2, "big") + answer)
        try:
            # A client that does not read its answers does not get to pile them up here.
            async with asyncio.timeout(self.tcp_idle):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            writer.close()


def client_key(address: str) -> str | bytes:
    """Whose bucket a query takes: the IPv4 address, or the IPv6 /64 (a subscriber picks any
    address of its prefix at will)."""
    if ":" not in address:
        return address
    try:
        return socket.inet_pton(socket.AF_INET6, address)[:8]
    except OSError:   # a scoped link-local ("fe80::1%eth1"): the address itself
        return address


def _bound_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to ``host``:``port`` (v6: IPV6_V6ONLY); OSError names them.

    Port 0 (tests) takes a free UDP port and the same TCP port, trying a few times: the UDP
    port's TCP twin may be in use.
    """
    for _ in range(19 if port == 0 else 0):
        try:
            return _bind_pair(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    return _bind_pair(host, port)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    try:
        family = socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
    except ValueError as exc:
        raise OSError(f"DNS forwarder: listen address {host!r} is not an IP address") from exc
    sockets: list[socket.socket] = []
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(family, kind)
            sockets.append(sock)
            sock.setblocking(False)
            if kind == socket.SOCK_DGRAM:
                large_receive_buffer(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Port 0 (tests): TCP takes the port the UDP socket got.
            sock.bind((host, port or (sockets[0].getsockname()[1] if kind == socket.SOCK_STREAM else 0)))
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(exc.errno, f"DNS forwarder: cannot bind {host} port {port} "
                                 f"({'TCP' if len(sockets) == 2 else 'UDP'}): {exc.strerror or exc}") from exc
    return sockets[0], sockets[1]
