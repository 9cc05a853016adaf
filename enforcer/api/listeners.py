"""How the enforcer's sockets are served: the control socket on a Unix socket usable by owner
and group only, and the TCP listeners (webhooks, metrics) guarded against the network.

The guard (deadlines for a request's head and body, a connection cap under the open-files
limit, sparing logs) is ``enforcer.listener_guard``, shared with the captive portal: a few
hundred idle or slow clients cannot hold the file descriptors that billing's next request
needs. The enforcer's listeners take no per-source cap (billing's requests may all come from
one address) and no request byte bound (aiohttp's line limits and ``client_max_size`` apply).
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

from aiohttp import web

from ..listener_guard import (
    REJECT_LOG_EVERY,
    ConnectionGuard,
    GuardedSite,
    Limits,
    LogLimiter,
    RequestErrorLog,
    bind_socket,
)
from . import json_response

__all__ = ["LIMITS", "REJECT_LOG_EVERY", "LogLimiter", "SocketInUse", "socket_problem", "start_tcp_site",
           "start_unix_site"]

#: The webhook and metrics listeners: a request head within 10 s, its body within 10 s, at most
#: 1000 connections (fewer under a lower open-files limit).
LIMITS = Limits()


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


def _too_large(request: web.Request) -> web.StreamResponse:
    return json_response(413, {"error": f"body larger than {request.client_max_size} bytes"})


async def start_tcp_site(app: web.Application, host: str, port: int, limits: Limits = LIMITS) -> web.AppRunner:
    """Serve ``app`` on TCP, each connection guarded (``enforcer.listener_guard``)."""
    sock = bind_socket(host, port)
    guard = ConnectionGuard(f"{host}:{port}", limits, too_large=_too_large)
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None, logger=RequestErrorLog(guard.name))
    try:
        await runner.setup()
        await GuardedSite(runner, sock, guard).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner
