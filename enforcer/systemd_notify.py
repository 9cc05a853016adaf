"""systemd's service notification protocol (sd_notify(3)): readiness, reload, stop and the watchdog.

Shared by the enforcer and the portal. The protocol is one datagram on the Unix socket named by
``$NOTIFY_SOCKET``, so it is done here with the standard library: ``sdnotify`` on PyPI has had
no release since 2017 and has no watchdog helper, and ``systemd-python`` needs libsystemd
headers to build, for what is ten lines.

The watchdog is petted by a task on the asyncio loop, never by a thread: if the loop blocks,
the pets stop and systemd restarts the service (``WatchdogSec=`` in the unit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("walled_garden.systemd")


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``, ...); False when not run by systemd or refused.

    Never blocks: a full socket drops the message rather than stalling the event loop.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, path)
    except OSError as exc:
        log.warning("event=sd_notify_failed message=%s error=%s", message.split("=", 1)[0], str(exc))
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the timestamp systemd 253+ wants; follow it with ``READY=1``."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_seconds(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd expects us to beat, or None (like ``sd_watchdog_enabled``).

    ``$WATCHDOG_PID``, when set, must be our pid: a child that inherited the environment is
    not the one being watched.
    """
    env = os.environ if environ is None else environ
    usec, owner = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 1_000_000


async def watchdog(timeout: float | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Send ``WATCHDOG=1`` every half ``timeout`` until cancelled; returns at once without a watchdog."""
    timeout = watchdog_seconds(environ) if timeout is None else timeout
    if not timeout:
        return
    log.info("event=watchdog_enabled timeout=%gs interval=%gs", timeout, timeout / 2)
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(timeout / 2)
