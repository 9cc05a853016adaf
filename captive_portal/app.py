"""Routes and middlewares of the portal (SPEC §5).

Request flow, outermost first:

1. ``count_requests``: every request lands in ``walled_garden_portal_requests_total{kind}``.
2. ``redirect_other_hosts``: a Host that is not ``portal.url``'s is a redirected subscriber
   trying to reach some other site: ``302`` to ``portal.url``, no lookup, no routing. 302 rather
   than 511 because that is what makes Android, Apple, Windows and Firefox offer "sign in to
   network". It must stay cheap: it answers every HTTP request of every restricted subscriber.
3. ``portal_not_found``: the portal host, but no such page: a small HTML 404.
4. The handlers: the page at ``portal.url``'s path and the RFC 8908 API at ``/api/captive``.
   Only these ask the enforcer about the caller.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from typing import Awaitable, Callable

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from enforcer.config import Config

from .enforcer_client import EnforcerClient, EnforcerUnavailable, Lookup, LookupClient
from .language import choose_language
from .messages import DEFAULT_LANGUAGE, MESSAGES
from .metrics import PortalMetrics, RequestKind
from .page import escape, render_page
from .portal_url import PortalUrl

log = logging.getLogger(__name__)

CAPTIVE_API_PATH = "/api/captive"
CAPTIVE_JSON = "application/captive+json"  # RFC 8908 §5

CONFIG_KEY = web.AppKey("config", Config)
PORTAL_URL_KEY = web.AppKey("portal_url", PortalUrl)
CLIENT_KEY = web.AppKey("client", LookupClient)
METRICS_KEY = web.AppKey("metrics", PortalMetrics)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
#: Set by whoever answers a request; read by ``count_requests`` for the ``kind`` label.
KIND_KEY = web.RequestKey("kind", RequestKind)

#: Nothing the portal says may be cached: the same URL answers differently once the
#: subscriber has paid, and a cached redirect would keep sending them here.
NO_STORE = "no-store"
#: The page loads nothing from anywhere (and the policy makes that a promise the browser keeps);
#: ``form-action 'self'`` leaves room for the portal's own forms.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: Config, client: LookupClient | None = None) -> web.Application:
    """The portal app; without ``client`` it makes an ``EnforcerClient`` and closes it on cleanup.

    A client passed in (tests, or a caller sharing one) stays the caller's to close.
    """
    portal = PortalUrl.parse(config.portal.url)
    metrics = PortalMetrics()
    app = web.Application(middlewares=[count_requests(metrics), redirect_other_hosts(portal),
                                       portal_not_found])
    app[CONFIG_KEY] = config
    app[PORTAL_URL_KEY] = portal
    app[METRICS_KEY] = metrics
    app[REGISTRY_KEY] = metrics.registry
    if client is None:
        owned = EnforcerClient(config.api.socket)

        async def close_client(_app: web.Application) -> None:
            await owned.close()

        app.on_cleanup.append(close_client)
        client = owned
    app[CLIENT_KEY] = client
    app[_FAILURES_KEY] = _FailureLog()
    app.router.add_get(portal.path, portal_page)
    if portal.path != CAPTIVE_API_PATH:
        app.router.add_get(CAPTIVE_API_PATH, captive_api)
    return app


# --- middlewares -----------------------------------------------------------------------------

def count_requests(metrics: PortalMetrics) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Count each request once, by what it turned out to be; 5xx of any kind counts as error."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.count(_kind(request, exc.status))
            raise
        except Exception:
            metrics.count(RequestKind.ERROR)
            raise
        metrics.count(_kind(request, response.status))
        return response

    return middleware


def _kind(request: web.Request, status: int) -> RequestKind:
    if status >= 500:
        return RequestKind.ERROR
    kind = request.get(KIND_KEY)
    if kind is not None:
        return kind
    if status in (404, 405):
        return RequestKind.NOT_FOUND
    return RequestKind.ERROR


def redirect_other_hosts(portal: PortalUrl) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Send every request for another host to the portal, whatever its method or path."""
    link = escape(portal.url)
    body = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{link}</title></head>\n'
            f'<body><p><a href="{link}">{link}</a></p></body></html>\n').encode()
    headers = {hdrs.LOCATION: portal.url, hdrs.CACHE_CONTROL: NO_STORE, **SECURITY_HEADERS}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if portal.is_addressed_by(request.headers.get(hdrs.HOST)):
            return await handler(request)
        request[KIND_KEY] = RequestKind.REDIRECT
        return web.Response(status=302, body=body, content_type="text/html", charset="utf-8",
                            headers=headers)

    return middleware


_NOT_FOUND_BODY = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                   '<meta name="viewport" content="width=device-width, initial-scale=1">'
                   '<title>Not found</title></head>\n<body><h1>Not found</h1>'
                   '<p><a href="{home}">{home}</a></p></body></html>\n')


@web.middleware
async def portal_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A small HTML 404 with a way back to the page, instead of aiohttp's plain-text one."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        request[KIND_KEY] = RequestKind.NOT_FOUND
        home = escape(request.app[PORTAL_URL_KEY].url)
        return web.Response(status=404, text=_NOT_FOUND_BODY.format(home=home), content_type="text/html",
                            headers={hdrs.CACHE_CONTROL: NO_STORE, **SECURITY_HEADERS})


# --- handlers --------------------------------------------------------------------------------

async def portal_page(request: web.Request) -> web.Response:
    """The page, in the caller's language; never an error page, even without the enforcer."""
    request[KIND_KEY] = RequestKind.PAGE
    lookup = await lookup_caller(request)
    language = choose_language(request.headers.get(hdrs.ACCEPT_LANGUAGE), MESSAGES, DEFAULT_LANGUAGE)
    text = render_page(lookup, request.app[CONFIG_KEY].portal.provider, language)
    return web.Response(text=text, content_type="text/html", charset="utf-8", headers={
        hdrs.CACHE_CONTROL: NO_STORE, hdrs.CONTENT_LANGUAGE: language, hdrs.VARY: hdrs.ACCEPT_LANGUAGE,
        **SECURITY_HEADERS})


async def captive_api(request: web.Request) -> web.Response:
    """RFC 8908 status for the caller's address.

    Without the enforcer's answer there is no right guess (``false`` hides the portal from a
    restricted user, ``true`` traps a paying one behind "sign in"), so say 503 and let the
    client fall back to its own probes.
    """
    request[KIND_KEY] = RequestKind.CAPTIVE_API
    headers = {hdrs.CACHE_CONTROL: "private, no-store"}
    lookup = await lookup_caller(request)
    if lookup is None:
        return web.json_response({"error": "enforcer-unavailable",
                                  "message": "Cannot tell whether this address is restricted; try again."},
                                 status=503, headers={**headers, hdrs.RETRY_AFTER: "5"})
    portal = request.app[PORTAL_URL_KEY]
    # Bytes, so aiohttp adds no charset parameter: the media type defines none (JSON is UTF-8).
    body = json.dumps({"captive": lookup.restricted, "user-portal-url": portal.url}).encode()
    return web.Response(body=body, content_type=CAPTIVE_JSON, headers=headers)


# --- asking the enforcer ---------------------------------------------------------------------

async def lookup_caller(request: web.Request) -> Lookup | None:
    """The enforcer's answer for the caller's address, or None when there is none to be had."""
    failures = request.app[_FAILURES_KEY]
    address = caller_address(request)
    if address is None:
        failures.failed(f"cannot look up a caller without an IP address (peer {request.remote!r})")
        return None
    try:
        lookup = await request.app[CLIENT_KEY].lookup(address)
    except EnforcerUnavailable as exc:
        request.app[METRICS_KEY].lookup_failures.inc()
        failures.failed(str(exc))
        return None
    failures.succeeded()
    return lookup


def caller_address(request: web.Request) -> str | None:
    """The peer's IP as the enforcer knows it: IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class _FailureLog:
    """Log enforcer trouble without a line per request: every caller fails while it is down."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def failed(self, message: str) -> None:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        log.warning("enforcer lookup failed: %s%s", message, more)
        self._last, self._suppressed = now, 0

    def succeeded(self) -> None:
        if self._last is not None:
            more = f" ({self._suppressed} failures not reported)" if self._suppressed else ""
            log.info("enforcer lookups work again%s", more)
            self._last, self._suppressed = None, 0


_FAILURES_KEY = web.AppKey("failures", _FailureLog)
