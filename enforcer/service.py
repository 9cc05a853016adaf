"""``walled-garden run``: start-up order and shutdown of the enforcer process.

Order matters: enforcement is restored from saved state before anything else (after a
reboot the kernel table is empty), then the list source and the APIs start, and systemd
hears READY=1 only after that first sync.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from aiohttp import web

from .api import SecretError, control_app, load_webhook_secret, metrics_app, start_tcp_site, start_unix_site, \
    webhook_app
from .config import Config
from .daemon import Enforcer
from .dataplane.backend import DataplaneError
from .garden_hosts import GardenHosts
from .sources import FileSource, UrlSource

log = logging.getLogger("walled_garden.enforcer")


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event, key=value, to stdout: journald adds time and unit."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; silent when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), path)
        except OSError as exc:
            log.warning("event=sd_notify_failed error=%r", str(exc))


async def serve(config: Config, stop: asyncio.Event, enforcer: Enforcer | None = None) -> None:
    enforcer = enforcer or Enforcer(config)
    runners: list[web.AppRunner] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                await enforcer.restore()
                break
            except DataplaneError as exc:
                log.error("event=restore_failed error=%r retry_in=2s", str(exc))
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                    return
                except asyncio.TimeoutError:
                    continue
        try:
            verifier = load_webhook_secret(config.api.webhook_secret_file)
        except SecretError as exc:
            verifier = None
            log.error("event=webhook_disabled error=%r (events answer 503 until fixed)", str(exc))
        runners.append(await start_unix_site(control_app(enforcer), config.api.socket))
        if config.api.listen is not None:
            runners.append(await start_tcp_site(webhook_app(enforcer, verifier), config.api.listen.host,
                                                config.api.listen.port))
        if config.metrics.listen is not None:
            runners.append(await start_tcp_site(metrics_app(enforcer), config.metrics.listen.host,
                                                config.metrics.listen.port))
        if config.subscribers.is_url:
            url_source = UrlSource(config.subscribers, enforcer.on_list, enforcer.on_source_failure,
                                   enforcer.on_source_unchanged)
            tasks.append(asyncio.create_task(url_source.run(stop)))
        else:
            source = FileSource(config.subscribers.source, enforcer.on_list, enforcer.on_source_failure)
            await source.check()
            tasks.append(asyncio.create_task(source.run(stop)))
        tasks.append(asyncio.create_task(enforcer.timers(stop)))
        if config.walled_garden.allow_hosts:
            hosts = GardenHosts(config.walled_garden.allow_hosts, enforcer.set_garden_addresses)
            tasks.append(asyncio.create_task(hosts.run(stop)))
        sd_notify("READY=1")
        log.info("event=started table=%s api=%s control=%s metrics=%s", config.gateway.table, config.api.listen,
                 config.api.socket, config.metrics.listen)
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        await enforcer.close()
        log.info("event=stopped (restrictions stay in the kernel)")


def run(config: Config) -> int:
    setup_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(main())
    return 0
