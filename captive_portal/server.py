"""Running the portal: listening sockets, the metrics endpoint, signals (``walled-garden portal``).

The gateway redirects restricted subscribers' port 80, and every subscriber's port 80 to the
gateway's own addresses (port 443 to ``portal.tls.listen`` likewise), to ``portal.listen`` on
the primary address of the interface the packet arrived at, IPv4 or IPv6. A wildcard listen address therefore binds
both families, as two sockets (the IPv6 one ``IPV6_V6ONLY``, so they do not clash and IPv4
callers keep plain IPv4 peer addresses for the lookup). Sockets are built here from literal
addresses only: start-up never waits on name resolution.

With ``portal.tls`` the same app is also served over HTTPS on ``tls.listen`` (same rules for
wildcards), from the certificate and key files named there. ``SIGHUP`` reloads them, so a
renewed certificate needs no restart (connections already open keep the old one).

Every socket is served through ``enforcer.listener_guard`` with one guard for the process
(``LIMITS``): the portal answers every restricted subscriber, so one of them must not be able to
take it away from the others (SPEC §5: the portal keeps working). A request head is due within
10 s of connecting, its body within 10 s more; one IPv4 address or IPv6 /64 holds at most
``PER_SOURCE`` connections (its oldest idle one is shed for its next); all of them at most
``MAX_CONNECTIONS``, fewer under the open-files limit; a request sends at most
``app.MAX_REQUEST_BYTES``. Sheds are counted in
``walled_garden_portal_connections_shed_total{reason}``, requests aiohttp cannot parse in
``walled_garden_portal_requests_total{kind="bad_request"}``, and both are logged at most once
per 10 s, without what the request said.

Under systemd (``Type=notify``) the portal says READY=1 once every socket is bound and pets
the watchdog from its event loop, so a hung loop is restarted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl

from aiohttp import web

from enforcer import systemd_notify
from enforcer.config import Config, Listen, PortalTls
from enforcer.listener_guard import ConnectionGuard, GuardedSite, Limits, RequestErrorLog, bind_socket
from enforcer.logs import setup_logging

from .app import MAX_REQUEST_BYTES, METRICS_KEY, REGISTRY_KEY, create_app
from .enforcer_client import LookupClient
from .metrics import create_metrics_app

log = logging.getLogger(__name__)

WILDCARDS = ("0.0.0.0", "::")
#: Long enough for an in-flight page (its lookup times out after 2 s), short enough for systemd.
SHUTDOWN_TIMEOUT = 5.0
BACKLOG = 1024
#: Connections one IPv4 address or IPv6 /64 may hold: a household's browsers and apps, each
#: redirect closing its connection, need a handful; past this its oldest idle one is shed.
PER_SOURCE = 32
#: Connections the portal keeps open in all (fewer when ``LimitNOFILE=`` is lower); with
#: ``MAX_REQUEST_BYTES`` this bounds what the connections can make the portal hold.
MAX_CONNECTIONS = 2048
LIMITS = Limits(head_timeout=10.0, body_timeout=10.0, max_connections=MAX_CONNECTIONS, per_source=PER_SOURCE,
                max_request_bytes=MAX_REQUEST_BYTES)
#: What binding ``::`` fails with on a kernel or container without IPv6.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def bind_sockets(listen: Listen) -> list[socket.socket]:
    """Bound, non-blocking TCP sockets for ``listen``; a wildcard gets one per address family.

    A host without IPv6 still serves IPv4 (logged); any other bind failure is raised, with the
    sockets already made closed.
    """
    if listen.host not in WILDCARDS:
        return [bind_socket(listen.host, listen.port)]  # ValueError for a name: we never resolve
    first = bind_socket("0.0.0.0", listen.port)
    port = first.getsockname()[1]  # the same port on both, even when asked for port 0
    try:
        second = bind_socket("::", port)
    except OSError as exc:
        if exc.errno not in _NO_IPV6:
            first.close()
            raise
        log.warning("event=no_ipv6 error=%r (listening on IPv4 only)", exc.strerror or str(exc))
        return [first]
    return [first, second]


def describe(sockets: list[socket.socket]) -> str:
    """``0.0.0.0:8080, [::]:8080`` from what was actually bound."""
    names = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


def tls_context(tls: PortalTls) -> ssl.SSLContext:
    """A server context with the configured certificate chain; TLS 1.2 at least."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(tls.cert, tls.key)
    return context


class PortalServer:
    """The portal app (HTTP, and HTTPS with ``portal.tls``) and its metrics app on their
    sockets: ``start()``, later ``close()``.

    Tests use it directly (port 0, then read ``sockets``); ``serve`` wraps it for the CLI.
    """

    def __init__(self, config: Config, client: LookupClient | None = None) -> None:
        self.config = config
        self.app = create_app(config, client)
        metrics = self.app[METRICS_KEY]
        self.guard = ConnectionGuard("portal", LIMITS, on_shed=metrics.connection_shed)
        self.errors = RequestErrorLog("portal", on_bad_request=metrics.bad_request)
        self.sockets: list[socket.socket] = []
        self.tls_sockets: list[socket.socket] = []
        self.metrics_sockets: list[socket.socket] = []
        self.tls: ssl.SSLContext | None = None
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        """Bind and serve; on failure whatever was started is closed again before raising."""
        tls = self.config.portal.tls
        try:
            if tls is not None:  # before binding anything: a bad certificate fails start-up at once
                self.tls = tls_context(tls)
            runner = await self._runner(self.app, SHUTDOWN_TIMEOUT)
            self.sockets = await self._serve(runner, self.config.portal.listen)
            if tls is not None:
                self.tls_sockets = await self._serve(runner, tls.listen, self.tls)
            if self.config.metrics.portal_listen is not None:
                fleet = self.config.fleet
                labels = {"gateway": fleet.gateway} if fleet is not None else None
                metrics = await self._runner(create_metrics_app(self.app[REGISTRY_KEY], labels), 1.0)
                self.metrics_sockets = await self._serve(metrics, self.config.metrics.portal_listen)
        except BaseException:
            await self.close()
            raise
        log.info("event=portal_started url=%s listen=%s https=%s metrics=%s enforcer_socket=%s",
                 self.config.portal.url, _joined(self.sockets), _joined(self.tls_sockets),
                 _joined(self.metrics_sockets), self.config.api.socket)

    def reload_tls(self) -> None:
        """Load the certificate and key again (after renewal); a failure keeps the old ones."""
        tls = self.config.portal.tls
        if tls is None or self.tls is None:
            return
        try:
            self.tls.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("event=tls_reload_failed cert=%s error=%r (still serving the old certificate)", tls.cert,
                      str(exc))
            return
        log.info("event=tls_reloaded cert=%s", tls.cert)

    async def close(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()

    async def _runner(self, app: web.Application, shutdown_timeout: float) -> web.AppRunner:
        # No access log: it would record every subscriber's browsing while restricted, at volume.
        # The parser's size limits travel with the app (app.HANDLER_ARGS), so a redirected
        # request with an 8 KB cookie or a long URL still gets its 302 here and in tests alike.
        # Every listener of the process shares one guard (its caps are the process's) and one
        # log for the requests aiohttp cannot parse.
        app.middlewares.insert(0, self.guard.middleware)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                               logger=self.errors)
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _serve(self, runner: web.AppRunner, listen: Listen,
                     ssl_context: ssl.SSLContext | None = None) -> list[socket.socket]:
        sockets = bind_sockets(listen)
        started = 0
        try:
            for sock in sockets:
                await GuardedSite(runner, sock, self.guard, backlog=BACKLOG, ssl_context=ssl_context).start()
                started += 1
        except BaseException:
            for sock in sockets[started:]:  # sites already started close theirs on cleanup
                sock.close()
            raise
        return sockets


async def serve(config: Config, stop: asyncio.Event, client: LookupClient | None = None) -> None:
    """Serve the portal until ``stop`` is set; SIGHUP reloads the TLS certificate."""
    watchdog = asyncio.create_task(systemd_notify.watchdog(), name="watchdog")
    server = PortalServer(config, client)
    loop = asyncio.get_running_loop()
    hup = False
    try:
        await server.start()
        try:
            loop.add_signal_handler(signal.SIGHUP, _on_hup, server)
            hup = True
        except (ValueError, RuntimeError):  # not the main thread: no signals, no reload
            log.debug("event=sighup_unhandled (not the main thread)")
        systemd_notify.notify(f"READY=1\nSTATUS=serving {config.portal.url}")
        await stop.wait()
        log.info("event=portal_stopping")
    finally:
        systemd_notify.notify("STOPPING=1")
        watchdog.cancel()
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        await server.close()


def _on_hup(server: PortalServer) -> None:
    if server.tls is None:
        log.info("event=reload_ignored (no TLS certificate to reload; other portal settings need a restart)")
        return
    systemd_notify.reloading()
    server.reload_tls()
    systemd_notify.notify("READY=1")


def _joined(sockets: list[socket.socket]) -> str:
    return describe(sockets).replace(" ", "") or "-"


def run(config: Config) -> None:
    """Blocking entry point of ``walled-garden portal``: serve until SIGTERM or SIGINT."""
    if not logging.getLogger().handlers:  # one line per event on stdout, unless the caller set logging up
        setup_logging()
    asyncio.run(_main(config))


async def _main(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(config, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
