"""The DNS forwarder's process: ``python -m enforcer.dns_garden.process --fd N --settings JSON``.

Started and supervised by the daemon (``bridge.ForwarderBridge``), never by hand. It builds the
kernel writer (``garden_set.GardenSet``, seeded from what the sets hold, so a restart keeps
tracking the addresses its predecessor added), starts the forwarder's listeners, and talks to the
daemon over the socketpair end ``--fd`` in JSON lines:

  child → daemon: ``{"stats": Stats.drain()}`` at once and then every ``STATS_EVERY`` s, idle or
  not, from the moment it is connected (while it loads, seeds and binds too), and ``{"ready":
  true}`` once it listens (stats are deltas: a restarted child starts from zero without the
  daemon's counters going backwards). The stats lines are also its heartbeat: the daemon kills a
  child that misses five of them as hung (``bridge.SILENT_LIMIT``).

It reads nothing from the daemon but EOF: when the daemon's end closes (the daemon stopped or
died) it closes its listeners and exits, as it does on SIGTERM. A failure to start (a listener
cannot bind, the table or its dnsgarden sets are missing) is one line on stderr and exit code
``EXIT_START_FAILED``; the daemon restarts it with backoff (the daemon may be recreating the
table right now).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from .settings import ForwarderSettings

log = logging.getLogger("walled_garden.dns")

#: Seconds between two stats lines.
STATS_EVERY = 1.0
#: Exit code when the forwarder cannot start (bind failure, missing table).
EXIT_START_FAILED = 3
#: Exit code when one of its background tasks failed (logged with its traceback).
EXIT_TASK_FAILED = 4
#: The GIL switch interval here (CPython's default is 5 ms). The kernel writer runs nft in a
#: thread; when it comes back wanting the GIL, every query on the loop could wait up to the
#: interval behind it, which alone is five times the forwarder's p99 budget of 1 ms.
SWITCH_INTERVAL = 0.0005


class StartFailed(Exception):
    """The forwarder cannot start; ``str()`` says what and where."""


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


async def child_main(fd: int, settings: ForwarderSettings) -> int:
    from .stats import Stats

    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    stats = Stats()
    stop = asyncio.Event()
    # The heartbeat first: the daemon hears from the child before it imports, seeds and binds.
    report = asyncio.create_task(_report(writer, stats, stop), name="stats_report")
    await asyncio.sleep(0)   # its first line goes out now, not after the imports below
    try:
        return await _run(reader, writer, stats, stop, report, settings)
    finally:
        report.cancel()


async def _run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Any, stop: asyncio.Event,
               report: asyncio.Task[None], settings: ForwarderSettings) -> int:
    """Build the forwarder and run it until ``stop``; ``report`` (the stats) already runs."""
    from ..dataplane.libnftables import Nftables, NftError
    from .forwarder import Forwarder
    from .garden_set import GardenSet, GardenSetError

    try:
        nft = Nftables()
    except NftError as exc:
        return _start_failed(f"libnftables: {exc}")
    garden = GardenSet(nft, settings, stats)
    try:
        await garden.seed()
    except GardenSetError as exc:
        return _start_failed(str(exc))
    forwarder = Forwarder(settings, garden.admit, stats, held=garden.holds, covered=garden.covers)
    try:
        await forwarder.start()
    except OSError as exc:
        return _start_failed(f"cannot listen on {', '.join(settings.listen)} port {settings.port}: {exc}")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):   # SIGINT: a Ctrl-C on the daemon's terminal reaches us too
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(garden.watch(stop), name="marker_watch"), report,
             asyncio.create_task(_until_eof(reader, stop), name="daemon_eof")]
    failed: list[BaseException] = []

    def ended(task: asyncio.Task[Any]) -> None:
        """A task that raises (a bug: each handles what it expects) ends the process loudly, so the
        daemon logs the exit and starts a fresh one, rather than the marker checks or the stats
        stopping without a trace."""
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("event=dns_forwarder_task_failed task=%s", task.get_name(), exc_info=error)
            if error is not None:
                failed.append(error)
            stop.set()

    for task in tasks:
        task.add_done_callback(ended)
    # Everything built so far lives as long as the process: out of the collector's way, so a
    # full collection walks only what queries allocate (a gen-2 pass over the modules and
    # dnspython's tables would be a pause of milliseconds in some query's answer).
    gc.freeze()
    _send(writer, {"ready": True})
    log.info("event=dns_forwarder_started listen=%s port=%d resolvers=%s pid=%d", ",".join(settings.listen),
             settings.port, ",".join(f"{host}:{port}" for host, port in settings.resolvers), os.getpid())
    try:
        await stop.wait()
    finally:
        await forwarder.close()
        await garden.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _send(writer, {"stats": stats.drain()})   # the last counts, if the daemon still reads
        writer.close()
        nft.close()
    log.info("event=dns_forwarder_stopped pid=%d", os.getpid())
    return EXIT_TASK_FAILED if failed else 0


async def _until_eof(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """The daemon sends nothing; its end closing (EOF) means it is gone: stop."""
    while await reader.read(4096):
        pass
    stop.set()


async def _report(writer: asyncio.StreamWriter, stats: Any, stop: asyncio.Event) -> None:
    """A stats line now and every ``STATS_EVERY`` s, empty or not: the daemon's sign of life."""
    while not stop.is_set():
        _send(writer, {"stats": stats.drain()})
        try:
            await writer.drain()
        except (ConnectionError, OSError):   # the daemon is gone: _until_eof sees it too
            stop.set()
            return
        await asyncio.sleep(STATS_EVERY)


def _start_failed(error: str) -> int:
    print(f"level=ERROR logger=walled_garden.dns event=dns_forwarder_start_failed error={error!r}",
          file=sys.stderr, flush=True)
    return EXIT_START_FAILED


def main(argv: list[str] | None = None) -> int:
    from ..logs import setup_logging

    parser = argparse.ArgumentParser(description="walled-garden DNS forwarder (started by the enforcer)")
    parser.add_argument("--fd", type=int, required=True, help="the daemon's socketpair end")
    parser.add_argument("--settings", required=True, help="ForwarderSettings.to_json()")
    args = parser.parse_args(argv)
    setup_logging()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        settings = ForwarderSettings.from_json(args.settings)
    except (ValueError, KeyError, TypeError) as exc:
        return _start_failed(f"--settings is not ForwarderSettings JSON: {exc}")
    return asyncio.run(child_main(args.fd, settings))


if __name__ == "__main__":
    sys.exit(main())
