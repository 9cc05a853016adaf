"""Serving a TCP listener that faces the network: the enforcer's webhook and metrics listeners
(``api.listeners``) and the captive portal's (``captive_portal.server``). It lives outside
``enforcer.api``, and imports no other enforcer module, so the unprivileged portal may use it
(import-linter contract ``portal-core``).

aiohttp's server has no header or body timeout of its own (only ``keepalive_timeout``, which
also closes a connection that never sent a request, but not one that trickles a header a byte
at a time), no connection cap and no bound on a request head's total size (128 lines of
``max_field_size`` each). So a thin ``asyncio.Protocol`` (``GuardedConnection``) wraps
aiohttp's per-connection protocol and a ``ConnectionGuard`` keeps, per ``Limits``:

- one deadline per connection: a complete request head within ``head_timeout`` of accepting it
  (a TLS handshake included) or of the previous answer, then its body within ``body_timeout``;
- a cap on open connections (``max_connections``, lower when the open-files limit is), and
  optionally one per source (an IPv4 address, an IPv6 /64: one subscriber's devices share it),
  so one subscriber cannot take everybody else's places. A connection beyond a cap makes room
  by shedding the oldest connection of that source (or of all) that is not being answered;
  when every one is being answered, the new one is closed instead;
- optionally at most ``max_request_bytes`` received per request (head and body), which bounds
  what aiohttp's parser buffers for one connection.

Connections are accepted here (``GuardedServer``), not by ``loop.create_server``: asyncio
accepts up to ``backlog`` connections a loop turn before any protocol sees one, and when
``accept`` fails for want of descriptors it keeps looping, logging the error and scheduling a
retry each time (CPython issue 151615): one subscriber's 1,100 idle connections made 265,000
log lines in 45 s. Here a loop turn accepts at most ``ACCEPT_BATCH`` a socket, a connection
beyond a cap is refused before aiohttp builds anything for it, and a failing ``accept`` is
counted and pauses that socket for ``ACCEPT_PAUSE``.

Sheds and refusals are counted (``ConnectionGuard.on_shed``, by reason: ``SHED_REASONS``) and
logged at most once per ``REJECT_LOG_EVERY``; so are requests aiohttp cannot parse
(``RequestErrorLog``), without quoting what they sent.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import resource
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("walled_garden.listener")
#: At most one log line about refused requests or shed connections per this many seconds;
#: the next says how many were held back.
REJECT_LOG_EVERY = 10.0
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
#: Most connections a guard keeps open at once, unless the open-files limit allows fewer.
MAX_CONNECTIONS = 1000
#: Descriptors kept free for everything else the process opens (its log, the control socket,
#: state files, listening sockets), besides ``ACCEPT_BATCH`` a listening socket.
FD_RESERVE = 64
#: Connections one listening socket accepts in one loop turn: they hold descriptors before a
#: shed connection's is released (that happens a turn later), so the cap leaves room for them.
ACCEPT_BATCH = 64
#: How long a listening socket waits after ``accept`` failed (no descriptor, no memory).
ACCEPT_PAUSE = 0.5
#: Why a connection was shed, refused or not accepted: the ``reason`` of a guard's count.
SHED_REASONS = ("head_timeout", "body_timeout", "source_cap", "connection_cap", "too_large", "accept_failed")
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_V4_MAPPED = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class Limits:
    """What a guarded listener allows (the module docstring); None: no such limit."""

    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    per_source: int | None = None
    max_request_bytes: int | None = None


class LogLimiter:
    """Allows one log line per ``every`` seconds and counts the ones it holds back.

    A flood of bad requests must not turn into a flood of journal lines (disk, CPU, and the
    operator's signal lost in noise); the metric counts every one of them anyway."""

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.next_at = float("-inf")
        self.held = 0

    def allow(self) -> int | None:
        """None: hold this line back; else log it, with this many held back since the last one."""
        now = self.clock()
        if now < self.next_at:
            self.held += 1
            return None
        held, self.held = self.held, 0
        self.next_at = now + self.every
        return held


def open_files_cap(maximum: int, listening: int) -> int:
    """``maximum``, or fewer when the open-files limit (``LimitNOFILE=``) is lower: past that
    limit ``accept`` fails and nobody can connect at all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return maximum
    return min(maximum, max(8, soft - FD_RESERVE - ACCEPT_BATCH * max(1, listening)))


def source_of(peer: Any) -> Hashable:
    """Whose share a connection from ``peer`` (``accept``'s address) takes: the IPv4 address,
    or the IPv6 /64 (a subscriber's devices pick addresses from their prefix at will); an
    IPv4-mapped IPv6 address is its IPv4 address."""
    host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    return socket.inet_ntop(socket.AF_INET, packed[12:]) if packed[:12] == _V4_MAPPED else packed[:8]


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound, non-blocking TCP socket on a literal address (``ValueError`` for a name: we never
    resolve); IPv6 ones ``IPV6_V6ONLY``, so ``0.0.0.0`` and ``::`` can share a port."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class GuardedConnection(asyncio.Protocol):
    """One TCP connection: aiohttp's protocol (made once the connection is, TLS included)
    inside, this connection's deadline and byte count outside."""

    def __init__(self, guard: ConnectionGuard, source: Hashable, factory: Callable[[], asyncio.Protocol]) -> None:
        self.guard, self.source, self.factory = guard, source, factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.opening: asyncio.Task[Any] | None = None   # until connection_made: the TLS handshake
        self.handling = False        # a complete request is being answered: never shed
        self.done = False            # closed or shed: no deadline, no count any more
        self.received = 0            # bytes since the last answer
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.opening = transport, None
        if self.done:   # shed during its TLS handshake
            transport.abort()
            return
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        limit = self.guard.limits.max_request_bytes
        if limit is not None:
            self.received += len(data)
            if self.received > limit:
                if not self.handling and self.transport is not None:
                    self.transport.write(_TOO_LARGE)   # best effort: nothing else is being written
                self.shed("too_large")
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.forget()
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def expect(self, seconds: float, what: str) -> None:
        """The next part of the request (``head`` or ``body``) must arrive within ``seconds``."""
        self._cancel()
        if self.done:   # an answer finished after its connection was lost
            return
        self._deadline = asyncio.get_running_loop().call_later(seconds, self.shed, f"{what}_timeout")

    def busy(self) -> None:
        self._cancel()
        self.handling = True

    def idle(self) -> None:
        self.handling = False
        self.received = 0
        self.expect(self.guard.limits.head_timeout, "head")

    def shed(self, why: str) -> None:
        """Close at once (nothing of ours is unsent: the request is not complete)."""
        if self.done:
            return
        self.forget()
        self.guard.shed(why)
        if self.transport is not None:
            self.transport.abort()
        elif self.opening is not None:
            self.opening.cancel()   # GuardedServer closes the socket

    def forget(self) -> None:
        """No longer counted: closed, shed, or never opened."""
        self._cancel()
        self.done = True
        self.guard.closed(self)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class ConnectionGuard:
    """Deadlines and caps for the connections of one process's listeners (the module
    docstring); one guard may serve several sockets, which then share its caps."""

    def __init__(self, name: str, limits: Limits | None = None, on_shed: Callable[[str], None] | None = None,
                 too_large: Callable[[web.Request], web.StreamResponse] | None = None) -> None:
        """``on_shed(reason)`` counts; ``too_large`` answers a body over the app's
        ``client_max_size`` (None: the app answers, still under the body deadline)."""
        self.name = name
        self.limits = limits if limits is not None else Limits()
        self.on_shed, self.too_large = on_shed, too_large
        self.connections: dict[GuardedConnection, None] = {}   # oldest first
        self.sources: dict[Hashable, dict[GuardedConnection, None]] = {}
        self.listening = 0
        self.shed_counts: dict[str, int] = {}
        self._log = LogLimiter(REJECT_LOG_EVERY)

    def cap(self) -> int:
        return open_files_cap(self.limits.max_connections, self.listening)

    def admit(self, source: Hashable, factory: Callable[[], asyncio.Protocol]) -> GuardedConnection | None:
        """A new connection from ``source``, room made for it; None: there is none (every one
        is being answered), and the caller closes it."""
        own = self.sources.get(source)
        per_source = self.limits.per_source
        if per_source is not None and own is not None and len(own) >= per_source \
                and not self._make_room(own, "source_cap"):
            return None
        if len(self.connections) >= self.cap() and not self._make_room(self.connections, "connection_cap"):
            return None
        connection = GuardedConnection(self, source, factory)
        self.connections[connection] = None
        self.sources.setdefault(source, {})[connection] = None
        connection.expect(self.limits.head_timeout, "head")
        return connection

    def _make_room(self, among: dict[GuardedConnection, None], why: str) -> bool:
        victim = next((c for c in among if not c.handling), None)
        if victim is None:
            self.shed(why)   # the new one
            return False
        victim.shed(why)
        return True

    def closed(self, connection: GuardedConnection) -> None:
        if connection not in self.connections:
            return
        del self.connections[connection]
        own = self.sources[connection.source]
        del own[connection]
        if not own:
            del self.sources[connection.source]

    def shed(self, why: str) -> None:
        self.shed_counts[why] = self.shed_counts.get(why, 0) + 1
        if self.on_shed is not None:
            self.on_shed(why)
        held = self._log.allow()
        if held is not None:
            log.warning("event=connection_shed listener=%s why=%s open=%d held_back=%d totals=%s", self.name, why,
                        len(self.connections), held, ",".join(f"{k}:{v}" for k, v in sorted(self.shed_counts.items())))

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The head is in: read the body under its deadline, then answer with no deadline. A
        body over ``client_max_size`` is not read here: the app answers under the deadline."""
        connection = request.transport.get_protocol() if request.transport is not None else None
        if not isinstance(connection, GuardedConnection):
            return await handler(request)
        connection.expect(self.limits.body_timeout, "body")
        try:
            length = request.content_length
            if length is not None and length > request.client_max_size:
                return await handler(request)
            try:
                await request.read()   # kept by aiohttp: the handler's read returns it
            except web.HTTPRequestEntityTooLarge:
                return self.too_large(request) if self.too_large is not None else await handler(request)
            connection.busy()
            return await handler(request)
        finally:
            connection.idle()


class GuardedServer(asyncio.AbstractServer):
    """Accepts connections on one listening socket for a ``ConnectionGuard`` (why not
    ``loop.create_server``: the module docstring)."""

    def __init__(self, guard: ConnectionGuard, sock: socket.socket, factory: Callable[[], asyncio.Protocol],
                 ssl_context: ssl.SSLContext | None, backlog: int) -> None:
        self.guard, self.sock, self.factory, self.ssl_context = guard, sock, factory, ssl_context
        self.loop = asyncio.get_running_loop()
        self.opening: set[asyncio.Task[Any]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        sock.listen(backlog)
        guard.listening += 1
        self._resume()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self.sock,)

    def _resume(self) -> None:
        self._retry = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # No descriptor or memory for it: the connection stays queued and the socket
                # readable; spinning on it would only burn the CPU the others need.
                log.debug("event=accept_failed listener=%s error=%r", self.guard.name, exc.strerror)
                self.guard.shed("accept_failed")
                self.loop.remove_reader(self.sock.fileno())
                self._retry = self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            connection = self.guard.admit(source_of(peer), self.factory)
            if connection is None:
                conn.close()
            else:
                self._open(connection, conn)

    def _open(self, connection: GuardedConnection, conn: socket.socket) -> None:
        """Make the transport (after the TLS handshake, with TLS) in a task of its own."""
        def protocol() -> asyncio.Protocol:
            return connection

        handshake = self.guard.limits.head_timeout if self.ssl_context is not None else None
        opening = self.loop.create_task(self.loop.connect_accepted_socket(
            protocol, conn, ssl=self.ssl_context, ssl_handshake_timeout=handshake))
        connection.opening = opening
        self.opening.add(opening)
        opening.add_done_callback(functools.partial(self._opened, connection, conn))

    def _opened(self, connection: GuardedConnection, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self.opening.discard(task)
        if task.cancelled() or task.exception() is not None:   # shed, or a failed TLS handshake
            conn.close()
            connection.forget()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.guard.listening -= 1
        for task in list(self.opening):
            task.cancel()

    async def wait_closed(self) -> None:
        return None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return not self._closed

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        raise NotImplementedError("served by the event loop once started")


class GuardedSite(web.SockSite):
    """``web.SockSite`` whose connections a ``ConnectionGuard`` accepts and guards."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard, *,
                 ssl_context: ssl.SSLContext | None = None, backlog: int = 128) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = GuardedServer(self.guard, self._sock, server, self._ssl_context, self._backlog)


class RequestErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger for a guarded listener (``AppRunner(logger=...)``).

    aiohttp logs every request it cannot parse (a 70 KB cookie line, 129 headers, a ``BREW``
    method, two ``Host`` headers) as an ERROR with a traceback whose message quotes ~100 bytes
    of the offending line or URL: unbounded under a flood, and on the portal a piece of what a
    subscriber's browser sent (the portal keeps no access log on purpose). Here such a request
    is counted (``on_bad_request``) and logged at most once per ``REJECT_LOG_EVERY`` with its
    kind and source address only. Any other error (a handler's bug) keeps its traceback, rate
    limited on its own.
    """

    def __init__(self, listener: str, on_bad_request: Callable[[], None] | None = None) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.listener, self.on_bad_request = listener, on_bad_request
        self._bad = LogLimiter(REJECT_LOG_EVERY)
        self._failed = LogLimiter(REJECT_LOG_EVERY)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(exc, HttpProcessingError):
            if self.on_bad_request is not None:
                self.on_bad_request()
            held = self._bad.allow()
            if held is not None:
                source = args[0] if args and str(msg).startswith("Error handling request from") else "-"
                log.info("event=bad_request listener=%s kind=%s source=%s held_back=%d", self.listener,
                         type(exc).__name__, source, held)
            return
        if level < logging.WARNING:
            self.logger.log(level, msg, *args, **kwargs)
            return
        held = self._failed.allow()
        if held is not None:
            self.logger.log(level, f"{msg} (listener={self.listener} held_back={held})", *args, **kwargs)
