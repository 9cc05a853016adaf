"""How the enforcer's sockets are served: the control socket on a Unix socket usable by owner
and group only, and the TCP listeners (webhooks, metrics) guarded against the network.

aiohttp's server has no header or body timeout of its own (only ``keepalive_timeout``, which
also closes a connection that never sent a request, but not one that trickles a header a byte
at a time) and no connection cap. So a thin ``asyncio.Protocol`` wraps aiohttp's
per-connection protocol and keeps one deadline per connection: a complete request head within
``HEAD_TIMEOUT`` seconds of connecting (or of the previous answer), the body within
``BODY_TIMEOUT`` of the head; at most ``max_connections()`` connections are open, and one
beyond that closes the oldest connection that is still waiting for or reading its request
(never one whose request is being handled). So a few hundred idle or slow clients cannot hold
the file descriptors that billing's next request needs.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from . import json_response

log = logging.getLogger("walled_garden.api")
#: At most one log line about refused requests or shed connections per this many seconds;
#: the next says how many were held back.
REJECT_LOG_EVERY = 10.0
#: A TCP connection must deliver a complete request head within this many seconds of opening
#: (or of its previous answer on a kept-alive connection), and then its body within BODY_TIMEOUT.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
#: Most connections a TCP listener keeps open at once (see ``max_connections``); file
#: descriptors kept free for everything else the process opens.
MAX_CONNECTIONS = 1000
FD_RESERVE = 64


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


class SocketInUse(OSError):
    """``api.socket`` is answered by a live process, or is not a socket: never unlinked.
    ``str()`` is the one line ``run`` prints."""


def socket_problem(path: str) -> str | None:
    """Why the control socket at ``path`` must not be replaced, or None (nothing there, or a
    socket file nobody answers on: what a stopped or killed run leaves behind).

    A live one belongs to a daemon started with another state directory (the state lock keeps
    out a second one on the same): unlinking it would leave that daemon unreachable, for the
    portal too, for good. A file that is not a socket is the operator's, not ours to delete."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        return f"api.socket: {path} exists and is not a socket; not removing it"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None   # stale: nobody listens
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):   # EAGAIN: a listener whose backlog is full
            return f"api.socket: {path} cannot be probed ({exc.strerror}); not removing it"
    finally:
        probe.close()
    return f"api.socket: {path} is answered by another process (another walled-garden run?); stop it first"


async def start_unix_site(app: web.Application, path: str, group: str = "") -> web.AppRunner:
    """Serve ``app`` on a Unix socket usable by owner and group only (``group``, if named).

    A socket file left behind by an earlier run is replaced; a live one, or a file that is not
    a socket, raises ``SocketInUse`` (``socket_problem``) and is left alone. Changing the group
    needs no capability when we are a member of it (the unit's
    ``SupplementaryGroups=walled-garden``).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    problem = socket_problem(path)
    if problem is not None:
        raise SocketInUse(problem)
    try:
        os.unlink(path)   # the stale socket file a previous run left behind
    except FileNotFoundError:
        pass
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    old = os.umask(0o117)
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, OSError) as exc:
            await runner.cleanup()
            raise OSError(f"{path}: cannot give the control socket to group {group!r}: {exc}") from None
    return runner


def max_connections() -> int:
    """``MAX_CONNECTIONS``, or fewer when the open-files limit (``LimitNOFILE=``) is lower:
    past that limit ``accept`` fails and billing could not connect at all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return min(MAX_CONNECTIONS, max(8, soft - FD_RESERVE))


class GuardedConnection(asyncio.Protocol):
    """One TCP connection: aiohttp's protocol inside, this connection's deadline outside."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.handling = False        # a complete request is being answered: never shed
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.inner.connection_made(transport)
        self.expect(HEAD_TIMEOUT, "head")
        self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.guard.closed(self)
        self.inner.connection_lost(exc)

    def expect(self, seconds: float, what: str) -> None:
        """The next part of the request (``head`` or ``body``) must arrive within ``seconds``."""
        self._cancel()
        self._deadline = asyncio.get_running_loop().call_later(seconds, self.shed, f"{what}_timeout")

    def busy(self) -> None:
        self._cancel()
        self.handling = True

    def idle(self) -> None:
        self.handling = False
        self.expect(HEAD_TIMEOUT, "head")

    def shed(self, why: str) -> None:
        """Close at once (nothing of ours is unsent: the request is not complete)."""
        self._cancel()
        self.guard.closed(self)
        self.guard.shed(why)
        if self.transport is not None:
            self.transport.abort()

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class ConnectionGuard:
    """Deadlines and a cap for one TCP listener's connections (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: dict[GuardedConnection, None] = {}   # oldest first
        self.shed_counts: dict[str, int] = {}
        self._log = LogLimiter(REJECT_LOG_EVERY)

    def protocol(self, inner: asyncio.Protocol) -> GuardedConnection:
        return GuardedConnection(self, inner)

    def opened(self, connection: GuardedConnection) -> None:
        self.connections[connection] = None
        if len(self.connections) <= max_connections():
            return
        victim = next((c for c in self.connections if not c.handling and c is not connection), connection)
        victim.shed("connection_cap")

    def closed(self, connection: GuardedConnection) -> None:
        self.connections.pop(connection, None)

    def shed(self, why: str) -> None:
        self.shed_counts[why] = self.shed_counts.get(why, 0) + 1
        held = self._log.allow()
        if held is not None:
            log.warning("event=connection_shed listener=%s why=%s open=%d held_back=%d totals=%s", self.name, why,
                        len(self.connections), held, ",".join(f"{k}:{v}" for k, v in sorted(self.shed_counts.items())))

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The head is in: read the body under its deadline, then answer with no deadline."""
        connection = request.transport.get_protocol() if request.transport is not None else None
        if not isinstance(connection, GuardedConnection):
            return await handler(request)
        connection.expect(BODY_TIMEOUT, "body")
        length = request.content_length
        if length is None or length <= request.client_max_size:  # a handler answers the oversized
            try:
                await request.read()   # kept by aiohttp: the handler's read returns it
            except web.HTTPRequestEntityTooLarge:
                return json_response(413, {"error": f"body larger than {request.client_max_size} bytes"})
        connection.busy()
        try:
            return await handler(request)
        finally:
            connection.idle()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a ``ConnectionGuard``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self.guard.protocol(server()), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address)


async def start_tcp_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on TCP, each connection guarded (deadlines, cap: the module docstring)."""
    guard = ConnectionGuard(f"{host}:{port}")
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await GuardedSite(runner, host, port, guard).start()
    return runner
