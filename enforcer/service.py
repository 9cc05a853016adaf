"""``walled-garden run``: start-up order, reload and shutdown of the enforcer process.

Order matters: enforcement is restored from saved state before anything else (after a
reboot the kernel table is empty), then the list source and the APIs start, and systemd
hears READY=1 only after that first sync. The watchdog is petted from the event loop from
the first moment, so a loop that hangs anywhere (start-up included) gets the process restarted.

``SIGHUP`` re-reads the configuration: an invalid one is logged and changes nothing; a valid
one is applied as far as it can be without a restart (``Engine.reload``), and the list
source, the garden hostname resolver and the webhook secret are renewed here.

Before all of that, ``run`` makes sure the start can harm nobody, touching nothing until it
knows (``start_problem``): it takes the state directory's lock (``state_lock``: one daemon per
state directory), and refuses, exit 1 with one line, when ``api.socket`` is answered by a live
process or ``inet <gateway.table>`` is someone else's table (SPEC 7: the first sync would replace
it, wiping their rules).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from . import garden_hosts, state_lock, systemd_notify
from .api.control import control_app
from .api.listeners import SocketInUse, socket_problem, start_tcp_site, start_unix_site
from .api.scrape import metrics_app
from .api.webhooks import SecretError, Verifier, load_webhook_secret
from .backend_switch import BackendSwitch
from .config import Config, ConfigError, load_config
from .daemon import Enforcer
from .dataplane.backend import DataplaneError
from .dns_garden.bridge import ForwarderBridge
from .dns_garden.settings import ForwarderSettings
from .garden_hosts import GardenHosts
from .logs import setup_logging
from .outbox import Outbox
from .sources import FileSource, UrlSource
from .supervisor import Supervisor
from .webhook_worker import WorkerBridge

__all__ = ["run", "sd_notify", "serve", "setup_logging", "start_problem"]

log = logging.getLogger("walled_garden.enforcer")
#: How often the kernel is asked whether our table is still there; the longest gap after
#: someone else flushes the ruleset.
TABLE_CHECK_SECONDS = 5.0
sd_notify = systemd_notify.notify
#: How long start-up waits for the DNS forwarder to listen before READY=1 (``dns: gateway``).
DNS_READY_TIMEOUT = 10.0
#: How long a stop waits for the list source's first read to finish saving its list.
CHECK_CLOSE_TIMEOUT = 30.0
#: Retry of a TCP listener whose address is not there yet (1 s, doubling to 30 s).
LISTEN_RETRY_FIRST = 1.0
LISTEN_RETRY_MAX = 30.0


def address_present(host: str) -> bool:
    """Whether ``host`` (an IP address) can be bound now: wildcard, loopback, or an address
    some interface has. At boot the enforcer runs before the network (docs/reference.md, Safety
    rules 6), so a specific address may not be there yet (``EADDRNOTAVAIL``)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True   # a name: not ours to judge here; the listener reports what binding it does
    if ip.is_unspecified or ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def outbox_for(enforcer: Enforcer, config: Config) -> Outbox:
    """The outbox delivering the portal's promises to billing with ``config``'s URL and secret."""
    return Outbox(enforcer.engine.store, config.policy.promise_to_pay, enforcer.metrics, enforcer.engine.clock,
                  enforcer.portal.outbox_wake, load_webhook_secret)


class Service:
    """The enforcer's long-running parts around one ``Enforcer``: APIs, list source, resolver."""

    def __init__(self, config: Config, enforcer: Enforcer, stop: asyncio.Event,
                 webhooks: WorkerBridge | None = None) -> None:
        """``webhooks``: the webhook worker's bridge when ``serve`` started it before the restore."""
        self.config = config
        self.enforcer = enforcer
        self.stop = stop
        self.verifier = Verifier(None)
        self.webhooks: WorkerBridge | None = webhooks
        self.dns: ForwarderBridge | None = None
        self.runners: list[web.AppRunner] = []
        self._checks: set[asyncio.Future[None]] = set()   # a list source's first read, finishing its save
        self.supervisor = Supervisor(stop, enforcer.metrics.task_failures)
        enforcer.engine.reports["tasks"] = self.supervisor.status

    def _task(self, name: str, factory: Callable[[], Awaitable[Any]] | None) -> None:
        """Run ``factory()`` as ``name`` under the supervisor, replacing the task of that name."""
        self.supervisor.start(name, factory)

    async def start(self) -> None:
        self.enforcer.lists.started.clear()
        try:
            await self._start()
        finally:
            self.enforcer.lists.started.set()   # READY=1 follows at once

    async def _start(self) -> None:
        config, enforcer = self.config, self.enforcer
        self.verifier.webhook = self._load_secret(config)
        self.runners.append(await start_unix_site(control_app(enforcer), config.api.socket,
                                                  config.api.socket_group))
        if config.api.listen is not None:  # in a worker process (see webhook_worker); starts meanwhile
            if self.webhooks is None:
                self.webhooks = WorkerBridge(enforcer.sink, config.api.listen.host, config.api.listen.port,
                                             config.api.webhook_secret_file)
            else:
                self.webhooks.attach(enforcer.sink)   # events waiting since the early start go first
            webhooks = self.webhooks
            self._task("webhooks", lambda: webhooks.run(self.stop))
        if config.metrics.listen is not None:
            host, port = config.metrics.listen.host, config.metrics.listen.port
            self._task("metrics_listener", lambda: self._serve_metrics(host, port))
        await self._start_source(config)
        for source in enforcer.sessions.sources:
            self._task(f"sessions_{source.name}", functools.partial(source.run, enforcer.session_sink))
        self._task("timers", lambda: enforcer.timers.run(self.stop))
        self._start_outbox(config)
        self._task("table_check", self._check_table)
        await self._start_hosts(config)
        await self._start_dns(config)
        enforcer.lists.started.set()   # the fleet's catch-up needs the engine's lock: the save goes first
        await self._start_fleet(config)
        # READY=1 (after start) means billing can reach us, if its address exists yet: the unit
        # is ordered before the network (docs/reference.md, Safety rules 6), and the network waits
        # for READY=1.
        if self.webhooks is not None and config.api.listen is not None:
            if address_present(config.api.listen.host):
                await self.webhooks.wait_ready()
            else:
                log.warning("event=listen_address_absent listen=%s:%d (the webhook worker binds it once the "
                            "network brings it up; ready without it meanwhile)", config.api.listen.host,
                            config.api.listen.port)

    async def _start_fleet(self, config: Config) -> None:
        """In a fleet: follow the stream, and catch up on what this gateway missed (bounded)
        before READY=1, so it never answers from a past the others have left."""
        fleet = self.enforcer.fleet
        if fleet is None or config.fleet is None:
            return
        self._task("fleet", lambda: fleet.run(self.stop))
        systemd_notify.notify("STATUS=catching up with the fleet's stream")
        if await fleet.caught_up(config.fleet.catch_up_timeout):
            log.info("event=fleet_caught_up applied=%d", fleet.applier.applied)
        elif fleet.unreachable.is_set():
            log.error("event=fleet_unreachable_at_start applied=%d error=%r (ready with the local state; it catches "
                      "up when NATS answers)", fleet.applier.applied, fleet.error or "-")
        else:
            log.error("event=fleet_not_caught_up timeout=%.0fs applied=%d error=%r (ready with the local state; it "
                      "catches up when NATS answers)", config.fleet.catch_up_timeout, fleet.applier.applied,
                      fleet.error or "-")

    def _start_outbox(self, config: Config) -> None:
        """The outbox task, when promises are sent to billing (it has nothing to do otherwise)."""
        if config.policy.promise_to_pay.webhook_url:
            outbox = outbox_for(self.enforcer, config)
            self._task("outbox", lambda: outbox.run(self.stop))
        else:
            self._task("outbox", None)

    async def _serve_metrics(self, host: str, port: int) -> None:
        """Serve /metrics until stopped; an address that is not there yet (the unit starts
        before the network) is retried, never fatal: enforcement must not wait for it."""
        delay = LISTEN_RETRY_FIRST
        while True:
            try:
                runner = await start_tcp_site(metrics_app(self.enforcer.metrics, self.enforcer.health.counters),
                                              host, port)
                break
            except OSError as exc:
                log.warning("event=listen_failed listener=metrics listen=%s:%d error=%r retry_in=%.0fs",
                            host, port, str(exc), delay)
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
                return
            except TimeoutError:
                delay = min(delay * 2, LISTEN_RETRY_MAX)
        try:
            await self.stop.wait()
        finally:
            await runner.cleanup()

    @staticmethod
    def _load_secret(config: Config) -> Any:
        try:
            return load_webhook_secret(config.api.webhook_secret_file)
        except SecretError as exc:
            log.error("event=webhook_disabled error=%r (events answer 503 until fixed)", str(exc))
            return None

    async def _check_table(self) -> None:
        """Every few seconds, one small listing: is our table still there (``TableHealth``)?"""
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), TABLE_CHECK_SECONDS)
                return
            except TimeoutError:
                pass
            try:
                await self.enforcer.health.verify()
            except DataplaneError as exc:
                log.warning("event=table_check_failed error=%r", str(exc))

    async def _start_source(self, config: Config) -> None:
        lists, space = self.enforcer.lists, self.enforcer.engine.space
        if config.subscribers.is_url:
            url_source = UrlSource(config.subscribers, lists.on_list, lists.on_source_failure,
                                   lists.on_source_unchanged, space=space, applied=lists.applied_digest)
            self._task("source", lambda: url_source.run(self.stop))
        else:
            self._task("source", None)
            source = FileSource(config.subscribers.source, lists.on_list, lists.on_source_failure, space=space,
                                applied=lists.applied_digest, on_unchanged=lists.on_source_unchanged)
            # The first read goes on until its list is saved; the start waits only until the kernel
            # enforces it (a first list of 100k is saved after, ~2 s: ListIntake._enforce_first).
            lists.enforced.clear()
            check = asyncio.ensure_future(source.check())
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
            enforced = asyncio.ensure_future(lists.enforced.wait())
            try:
                await asyncio.wait({check, enforced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                enforced.cancel()
            self._task("source", lambda: source.run(self.stop))

    async def _start_hosts(self, config: Config) -> None:
        if config.walled_garden.allow_hosts:
            hosts = GardenHosts(config.walled_garden.allow_hosts,
                                functools.partial(garden_hosts.install, self.enforcer.engine))
            self._task("hosts", lambda: hosts.run(self.stop))
        else:
            self._task("hosts", None)

    async def _start_dns(self, config: Config) -> None:
        """The DNS forwarder process (``dns: gateway``), started after the table holds its sets;
        waits (bounded) until it listens, so a restricted subscriber's first query is answered."""
        settings = ForwarderSettings.from_config(config)
        await self.supervisor.end("dns_forwarder")   # the old child must free the port first
        self.enforcer.engine.reports.pop("dns_forwarder", None)
        self.dns = None
        self.enforcer.metrics.dns_forwarder_enabled.set(0 if settings is None else 1)
        if settings is None:
            self.enforcer.metrics.dns_forwarder_up.set(0)
            return
        self.dns = bridge = ForwarderBridge(settings, self.enforcer.metrics)
        self.enforcer.engine.reports["dns_forwarder"] = bridge.status
        self._task("dns_forwarder", lambda: bridge.run(self.stop))
        try:
            await asyncio.wait_for(bridge.ready.wait(), DNS_READY_TIMEOUT)
        except TimeoutError:
            log.error("event=dns_forwarder_not_ready timeout=%.0fs (restricted subscribers' DNS is not answered "
                      "until it is; see status and the log)", DNS_READY_TIMEOUT)

    async def reload(self) -> bool:
        """Re-read the configuration file; True when a valid one was applied."""
        old = self.enforcer.engine.config
        try:
            new = await asyncio.to_thread(load_config, old.path)
        except ConfigError as exc:
            self.enforcer.metrics.reloads.labels("rejected").inc()
            for issue in exc.issues:
                log.error("event=reload_problem problem=%r", str(issue))
            log.error("event=reload_rejected path=%s errors=%d (still running with the previous configuration)",
                      old.path, len(exc.issues))
            return False
        webhook = self.verifier.webhook
        try:
            webhook = await asyncio.to_thread(load_webhook_secret, new.api.webhook_secret_file)
        except SecretError as exc:
            if webhook is not None:  # never trade a working secret for a broken one
                self.enforcer.metrics.reloads.labels("rejected").inc()
                log.error("event=reload_rejected path=%s error=%r (still running with the previous configuration)",
                          old.path, str(exc))
                return False
            log.error("event=webhook_disabled error=%r (events answer 503 until fixed)", str(exc))
        restart = await self.enforcer.engine.reload(new)
        if new.policy.promise_to_pay != old.policy.promise_to_pay:  # the outbox reads its URL and secret at start
            self._start_outbox(new)
        self.verifier.webhook = webhook
        if self.webhooks is not None and webhook is not None:
            self.webhooks.reload_secret(new.api.webhook_secret_file)
        if replace(new.subscribers, guard=old.subscribers.guard) != old.subscribers:  # the guard is read live
            await self._start_source(new)
        if new.walled_garden.allow_hosts != old.walled_garden.allow_hosts:
            await self._start_hosts(new)
            if not new.walled_garden.allow_hosts:
                await garden_hosts.install(self.enforcer.engine, set())
        applied = self.enforcer.engine.config   # what engine.reload took (e.g. the table name stays)
        if ForwarderSettings.from_config(applied) != ForwarderSettings.from_config(old):
            await self._start_dns(applied)   # after engine.reload: the table has the sets it needs
        changed = [name for name in ("state_dir", "subscribers", "gateway", "walled_garden", "portal", "api",
                                     "metrics", "policy") if getattr(new, name) != getattr(old, name)]
        self.enforcer.metrics.reloads.labels("applied").inc()
        log.info("event=reloaded path=%s changed=%s needs_restart=%s", old.path, ",".join(changed) or "-",
                 ",".join(restart) or "-")
        if restart:
            log.warning("event=reload_needs_restart keys=%s (kept the running values: systemctl restart "
                        "walled-garden)", ",".join(restart))
        if new.portal != old.portal or new.metrics.portal_listen != old.metrics.portal_listen:
            log.warning("event=reload_portal_settings_changed (the portal reads them at start: systemctl restart "
                        "walled-garden-portal)")
        return True

    async def close(self) -> None:
        if self._checks:   # a first list being saved is let finish (bounded), not cut off half-way
            await asyncio.wait(set(self._checks), timeout=CHECK_CLOSE_TIMEOUT)
        await self.supervisor.close()
        for runner in self.runners:
            await runner.cleanup()


async def _reloads(service: Service, requests: asyncio.Event) -> None:
    """One reload at a time, however many SIGHUPs arrive meanwhile."""
    while True:
        await requests.wait()
        requests.clear()
        systemd_notify.reloading()
        try:
            await service.reload()
        except Exception:  # a reload must never take the running daemon down
            log.exception("event=reload_failed (still running)")
        systemd_notify.notify("READY=1")


async def serve(config: Config, stop: asyncio.Event, enforcer: Enforcer | None = None,
                reload_requests: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set; each time ``reload_requests`` is set, reload the configuration."""
    watchdog = asyncio.create_task(systemd_notify.watchdog(), name="watchdog")
    early: WorkerBridge | None = None
    if config.api.listen is not None:
        # Started before the state is read: the worker's start-up (its own interpreter, on the
        # other core) overlaps the restore, and webhooks wait for it rather than for both.
        early = WorkerBridge(None, config.api.listen.host, config.api.listen.port, config.api.webhook_secret_file)
        await early.spawn_early()
    try:
        enforcer = enforcer or Enforcer(config)
    except BaseException:
        if early is not None:
            await early.discard_early()
        raise
    service = Service(config, enforcer, stop, early)
    reloader: asyncio.Task[None] | None = None
    try:
        systemd_notify.notify("STATUS=restoring enforcement from saved state")
        while True:
            try:
                await enforcer.engine.restore()
                break
            except DataplaneError as exc:
                log.error("event=restore_failed error=%r retry_in=2s", str(exc))
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                    return
                except TimeoutError:
                    continue
        await service.start()
        if reload_requests is not None:
            reloader = asyncio.create_task(_reloads(service, reload_requests), name="reload")
        restricted = sum(enforcer.engine.record.mode_counts.values())
        systemd_notify.notify(f"READY=1\nSTATUS=enforcing: {restricted} subscriber(s) restricted")
        log.info("event=started table=%s api=%s control=%s metrics=%s restricted=%d", config.gateway.table,
                 config.api.listen, config.api.socket, config.metrics.listen, restricted)
        # Ours are in place: the backend not configured must not keep anyone walled (``backend_switch``).
        # In the background: a slow tool neither delays a stop nor, failing, ends the daemon.
        # What could not be removed (an ipset a rule not ours names) is in ``status``.
        switch = BackendSwitch(config)
        enforcer.engine.reports["backend_switch"] = switch.status
        enforcer.engine.spawn(asyncio.to_thread(switch.run), "backend_switch")
        await stop.wait()
    finally:
        systemd_notify.notify("STOPPING=1")
        for task in (reloader, watchdog):
            if task is not None:
                task.cancel()
        await service.close()
        if early is not None:
            await early.discard_early()   # still ours when stopped before the service started
        await enforcer.close()
        log.info("event=stopped (restrictions stay in the kernel)")


def table_problem(config: Config) -> str | None:
    """Why ``inet <gateway.table>`` must not be taken, or None (absent, ours, or empty).

    Asked whatever the backend: with ``ipset`` the daemon deletes that table once its own sets
    are in place (``backend_switch``). Without libnftables there is no nftables table to lose
    (and the nftables backend itself then fails to start, naming the library)."""
    from .dataplane.kernel import Ownership, table_owner  # libnftables' binding: imported when asked
    from .dataplane.libnftables import NftError

    table = config.gateway.table
    try:
        owner = table_owner(table)
    except NftError:
        return None
    except DataplaneError as exc:
        error = " ".join(str(exc).split())   # nft's message spans lines: the refusal is one
        return f"gateway.table: cannot tell whether table inet {table} is ours ({error}); nothing touched"
    if owner is Ownership.FOREIGN:
        return (f"gateway.table: table inet {table} exists and is not walled-garden's (its first sync would "
                f"replace it, wiping its rules); set gateway.table to a table of our own (default walled_garden)")
    if owner is Ownership.EMPTY:
        log.warning("event=empty_table_taken table=%s (an empty inet %s, nobody's rules: it becomes ours)", table,
                    table)
    return None


def start_problem(config: Config) -> str | None:
    """Why this ``run`` must not start, or None; asked with the state lock held and before anything
    touches the kernel, the state or a socket. A live ``api.socket`` belongs to a daemon with
    another state directory; replacing it would leave that one unreachable."""
    return socket_problem(config.api.socket) or table_problem(config)


def _refuse(line: str) -> int:
    """``run``'s refusal: one line, exit 1 (systemd retries; the line says what to do)."""
    print(line, file=sys.stderr, flush=True)
    return 1


def run(config: Config) -> int:
    setup_logging()
    try:
        lock = state_lock.acquire(config.state_dir)
    except state_lock.StateLocked as exc:
        return _refuse(str(exc))
    except OSError as exc:
        return _refuse(f"state_dir: cannot lock {config.state_dir}/{state_lock.LOCK_NAME}: {exc.strerror or exc}")

    async def main() -> None:
        stop, hup = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        handlers: dict[signal.Signals, Callable[[], None]] = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set,
                                                              signal.SIGHUP: hup.set}
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        await serve(config, stop, reload_requests=hup)

    with lock:   # held until the process is done with the state (serve has closed everything)
        problem = start_problem(config)
        if problem is not None:
            return _refuse(problem)
        try:
            asyncio.run(main())
        except SocketInUse as exc:   # someone bound api.socket after start_problem looked
            return _refuse(str(exc))
    return 0
