"""Routes and middlewares of the portal (docs/reference.md, Portal).

Request flow, outermost first:

1. ``redirect_other_hosts``: a Host that is not ``portal.url``'s is a redirected subscriber
   trying to reach some other site (or any subscriber naming the gateway some other way, since
   the gateway's own port 80 lands here for everyone): ``302`` to ``portal.url``, no lookup, no
   routing. 302 rather
   than 511 because that is what makes Android, Apple, Windows and Firefox offer "sign in to
   network". It must stay cheap: it answers every HTTP request of every restricted subscriber,
   so it is outermost and counts its own requests. It notes the URL asked for
   (``original_urls``, per device: address and ``User-Agent``), so a notice subscriber who
   presses "Continue" goes back there, and closes the connection: a browser must not keep a
   connection that is really to the portal under another site's name once it is let out.
   Its requests may carry long URLs and headers (``HANDLER_ARGS``, ``MAX_REQUEST_BYTES``): a
   site's 8 KB cookie must still get the ``302``, not aiohttp's plain ``400``.
2. ``count_requests``: every other request lands in ``walled_garden_portal_requests_total{kind}``.
3. ``portal_not_found``: the portal host, but no such page or a method the route does not take:
   a small HTML 404 or 405.
4. ``guard_posts``: every POST the portal answers is rate limited per address (429), must not
   come from another origin and must carry a CSRF token issued in the last hour to the same
   IPv4 address or IPv6 /64, or to the subscriber the enforcer says the address is (403).
5. The handlers: the page at ``portal.url``'s path, the RFC 8908 API at ``/api/captive``,
   ``POST /continue`` for the notice interstitial and ``POST /promise`` for "I promise to pay"
   (a ``GET`` of either, as a browser sends from its address bar or history after the POST, is
   sent to the page). Only these ask the enforcer.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry

from enforcer.config import Config

from .csrf import CsrfTokens
from .enforcer_client import EnforcerClient, EnforcerUnavailable, Lookup, LookupClient, NotRecentCaller, Promised
from .language import page_language
from .messages import MessageKey
from .metrics import PortalMetrics, RequestKind
from .original_urls import OriginalUrls, page_url
from .page import CONTINUE_PATH, PROMISE_PATH, Caller, Pages, escape
from .portal_url import DEFAULT_PORTS, PortalUrl, parse_host_header, parse_origin
from .ratelimit import RateLimiter, retry_after

log = logging.getLogger(__name__)

CAPTIVE_API_PATH = "/api/captive"
CAPTIVE_JSON = "application/captive+json"  # RFC 8908 §5
#: A form post is two short fields; nothing the portal accepts is bigger.
MAX_BODY = 16 * 1024
#: aiohttp's parser limits for every request: a request line (URL) and a header line each up to
#: 64 KiB instead of 8190 bytes, at most 128 headers (aiohttp's default). Redirected requests are
#: whatever a subscriber's browser sends to any site (an 8 KB cookie, a 9000-character URL), and
#: over the default limit aiohttp answers a plain ``400`` ("Got more than 8190 bytes") instead of
#: our ``302``; the redirect reads no header but ``Host`` anyway. Their sum is bounded apart
#: (``MAX_REQUEST_BYTES``).
MAX_LINE = 64 * 1024
HANDLER_ARGS = {"max_line_size": MAX_LINE, "max_field_size": MAX_LINE, "max_headers": 128}
#: What one request may send in all, head and body (``server.LIMITS``): aiohttp bounds lines and
#: their number but not their sum, and 126 lines of 60 KB (7.5 MB a connection, twice that once
#: parsed) let 16 connections take the portal from 67 to 304 MB. Two full-length lines, or a long
#: URL, a big cookie and a form, fit; a connection that sends more is answered 431 and closed.
MAX_REQUEST_BYTES = 2 * MAX_LINE

CONFIG_KEY = web.AppKey("config", Config)
PORTAL_URL_KEY = web.AppKey("portal_url", PortalUrl)
CLIENT_KEY = web.AppKey("client", LookupClient)
METRICS_KEY = web.AppKey("metrics", PortalMetrics)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)
PAGES_KEY = web.AppKey("pages", Pages)
CSRF_KEY = web.AppKey("csrf", CsrfTokens)
LIMITER_KEY = web.AppKey("limiter", RateLimiter)
URLS_KEY = web.AppKey("original_urls", OriginalUrls)
CLOCK_KEY = web.AppKey[Callable[[], float]]("clock")   # not a class: the type goes in the subscript
#: Set by whoever answers a request; read by ``count_requests`` for the ``kind`` label.
KIND_KEY = web.RequestKey("kind", RequestKind)

#: Nothing the portal says may be cached: the same URL answers differently once the
#: subscriber has paid, and a cached redirect would keep sending them here.
NO_STORE = "no-store"
#: The page loads nothing from anywhere (and the policy makes that a promise the browser keeps);
#: ``form-action 'self'`` leaves room for the portal's own forms. ``same-origin``, not
#: ``no-referrer``: no other site learns the portal's URL either way, but under ``no-referrer``
#: browsers send ``Origin: null`` with the page's own form POSTs (Fetch standard), which
#: ``guard_posts`` must refuse, so every promise and Continue in a real browser would be "expired".
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def create_app(config: Config, client: LookupClient | None = None, *,
               clock: Callable[[], float] = time.time) -> web.Application:
    """The portal app; without ``client`` it makes an ``EnforcerClient`` and closes it on cleanup.

    A client passed in (tests, or a caller sharing one) stays the caller's to close. ``clock``
    (unix time) decides whether an acknowledged notice is still in force.
    """
    portal = PortalUrl.parse(config.portal.url)
    metrics = PortalMetrics()
    urls = OriginalUrls()
    app = web.Application(client_max_size=MAX_BODY, handler_args=HANDLER_ARGS, middlewares=[
        redirect_other_hosts(portal, urls, metrics), count_requests(metrics), portal_not_found, guard_posts])
    app[CONFIG_KEY] = config
    app[PORTAL_URL_KEY] = portal
    app[METRICS_KEY] = metrics
    app[REGISTRY_KEY] = metrics.registry
    app[PAGES_KEY] = Pages.from_config(config)
    app[CSRF_KEY] = CsrfTokens()
    app[LIMITER_KEY] = RateLimiter(config.portal.posts_per_minute)
    app[URLS_KEY] = urls
    app[CLOCK_KEY] = clock
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
    app.router.add_post(CONTINUE_PATH, continue_post)
    app.router.add_post(PROMISE_PATH, promise_post)
    for action in (CONTINUE_PATH, PROMISE_PATH):
        if action != portal.path:
            app.router.add_get(action, to_the_page)  # HEAD too
    return app


# --- middlewares -----------------------------------------------------------------------------

def count_requests(metrics: PortalMetrics) -> Middleware:
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
    if KIND_KEY in request:
        return request[KIND_KEY]
    if status in (404, 405):
        return RequestKind.NOT_FOUND
    return RequestKind.ERROR


def redirect_other_hosts(portal: PortalUrl, urls: OriginalUrls, metrics: PortalMetrics) -> Middleware:
    """Send every request for another host to the portal, whatever its method or path.

    Outermost, and counting its own requests: this is the hot path (every restricted
    subscriber's every HTTP request), so it skips the rest of the middleware chain.
    """
    link = escape(portal.url)
    body = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{link}</title></head>\n'
            f'<body><p><a href="{link}">{link}</a></p></body></html>\n').encode()
    headers = {hdrs.LOCATION: portal.url, hdrs.CACHE_CONTROL: NO_STORE,
               hdrs.CONTENT_TYPE: "text/html; charset=utf-8", **SECURITY_HEADERS}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get(hdrs.HOST)
        if portal.is_addressed_by(host) or (request.secure and portal.names_host(host)):
            return await handler(request)
        if request.path == CAPTIVE_API_PATH and (portal.names_host(host) or _names_this_socket(request, host)):
            # RFC 8908's API as a client may be told it (DHCP option 114, RA) by address, or
            # with another port: JSON, never a redirect a client cannot read as an answer.
            return await handler(request)
        url = page_url(request.method, request.headers, request.raw_path)
        if url is not None and not portal.names_host(host) and not _names_this_socket(request, host):
            address = caller_address(request)
            if address is not None:
                urls.remember(address, url, user_agent=request.headers.get(hdrs.USER_AGENT))
        response = web.Response(status=302, body=body, headers=headers)
        response.force_close()
        metrics.count(RequestKind.REDIRECT)
        return response

    return middleware


def _names_this_socket(request: web.Request, host: str | None) -> bool:
    """Does the Host header name the address this connection arrived at (the gateway itself)?

    Every subscriber's port 80 to the gateway's own addresses lands here, so a free
    subscriber typing the gateway's address gets the portal too; that is no page to send them
    back to. (The portal's own name on another port is caught by ``names_host``.)
    """
    parsed = parse_host_header(host, 80) if host else None
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if parsed is None or not isinstance(sockname, tuple) or not sockname:
        return False
    try:
        return ipaddress.ip_address(parsed[0]) == ipaddress.ip_address(str(sockname[0]).partition("%")[0])
    except ValueError:  # a name, not an address literal
        return False


_SMALL_PAGE = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
               '<meta name="viewport" content="width=device-width, initial-scale=1">'
               '<title>{title}</title></head>\n<body><h1>{title}</h1>'
               '<p><a href="{home}">{home}</a></p></body></html>\n')


@web.middleware
async def portal_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A small HTML 404, or 405 (with ``Allow``), with a way back to the page, instead of
    aiohttp's plain-text ones: no-store and the CSP like every other answer of the portal."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _small_page(request, 404, "Not found")
    except web.HTTPMethodNotAllowed as exc:
        return _small_page(request, 405, "Method not allowed",
                           {hdrs.ALLOW: ",".join(sorted(exc.allowed_methods))})


def _small_page(request: web.Request, status: int, title: str,
                headers: dict[str, str] | None = None) -> web.Response:
    request[KIND_KEY] = RequestKind.NOT_FOUND
    home = escape(request.app[PORTAL_URL_KEY].url)
    return web.Response(status=status, text=_SMALL_PAGE.format(title=title, home=home), content_type="text/html",
                        headers={hdrs.CACHE_CONTROL: NO_STORE, **SECURITY_HEADERS, **(headers or {})})


@web.middleware
async def guard_posts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Rate limit, then origin and CSRF token, for every POST that reaches a handler.

    The limit comes first so that even a flood of forged posts costs one dict operation each
    beyond the limit (within it, a forged token naming a subscriber costs a lookup).
    """
    if request.method != hdrs.METH_POST or request.match_info.http_exception is not None:
        return await handler(request)
    address = caller_address(request)
    wait = request.app[LIMITER_KEY].take(address or "")
    if wait > 0:
        request[KIND_KEY] = RequestKind.RATE_LIMITED
        return _problem(request, "too_many", 429, request_language(request),
                        {hdrs.RETRY_AFTER: retry_after(wait)})
    request[KIND_KEY] = RequestKind.FORBIDDEN  # until the handler says otherwise (413 included)
    try:
        form = await request.post()
    except ValueError:  # a body that is not a form
        form = None
    lang = form.get("lang") if form is not None else None
    language = request_language(request, lang if isinstance(lang, str) else None)
    token = form.get("csrf") if form is not None else None
    if address is None or not origin_allowed(request) or not isinstance(token, str) \
            or not await token_valid(request, token, address):
        return _problem(request, "expired", 403, language)
    return await handler(request)


async def token_valid(request: web.Request, token: str, address: str) -> bool:
    """Was ``token`` issued to this caller: to the subscriber the enforcer says ``address``
    belongs to, for a token that names one (any of their addresses, either family), else (or
    when the lookup names nobody) to its IPv4 address or IPv6 /64?

    The lookup happens only for a token that names a subscriber, after the rate limit: a flood
    of forged posts costs no lookups beyond the limit.
    """
    tokens = request.app[CSRF_KEY]
    if not tokens.names_subscriber(token):
        return tokens.check(token, address)
    lookup = await lookup_caller(request)
    return tokens.check(token, address, lookup.subscriber if lookup is not None else "")


def origin_allowed(request: web.Request) -> bool:
    """No ``Origin`` header, or the portal's own origin (as configured, or as this request came)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return True
    parsed = parse_origin(origin)
    if parsed is None:  # "null" (sandboxed or privacy-sensitive contexts) and junk
        return False
    if parsed == request.app[PORTAL_URL_KEY].origin:
        return True
    own = parse_host_header(request.host, DEFAULT_PORTS[request.scheme])
    return own is not None and parsed == (request.scheme, *own)


# --- handlers --------------------------------------------------------------------------------

async def to_the_page(request: web.Request) -> web.Response:
    """``GET`` (or ``HEAD``) of a form's action: ``303`` to ``portal.url``, which shows where the
    caller stands.

    After "Continue" or "I promise to pay" the address bar shows ``/continue`` or ``/promise``;
    Enter there, the history, or a restored session sends a ``GET``, which must neither act nor
    be a bare error. Nothing is asked or changed here.
    """
    request[KIND_KEY] = RequestKind.NOT_FOUND
    return web.Response(status=303, headers={hdrs.LOCATION: request.app[PORTAL_URL_KEY].url,
                                             hdrs.CACHE_CONTROL: NO_STORE, **SECURITY_HEADERS})


async def portal_page(request: web.Request) -> web.Response:
    """The page, in the caller's language; never an error page, even without the enforcer."""
    request[KIND_KEY] = RequestKind.PAGE
    lookup = await lookup_caller(request)
    return _caller_page(request, lookup, request_language(request))


async def _form_post(request: web.Request, kind: RequestKind) -> tuple[str, str]:
    """The caller's address (the TCP peer) and the language picked on the page, for a form POST."""
    request[KIND_KEY] = kind
    address = caller_address(request)
    if address is None:  # guard_posts has answered 403 already; this is for type checkers
        raise web.HTTPForbidden()
    form = await request.post()  # parsed once already; aiohttp keeps it
    lang = form.get("lang")
    return address, request_language(request, lang if isinstance(lang, str) else None)


async def _enforcer_down(request: web.Request, language: str, what: str, exc: Exception,
                         lookup: Lookup | None) -> web.Response:
    """A form POST the enforcer could not answer: the page as it stands, "try again", 503."""
    request.app[_FAILURES_KEY].failed(f"{what}: {exc}")
    return _caller_page(request, lookup, language, note="continue_failed", status=503,
                        headers={hdrs.RETRY_AFTER: "5"})


def _not_recent(request: web.Request, language: str, address: str, what: str,
                lookup: Lookup | None) -> web.Response:
    """The enforcer has not seen this address call the portal lately, so it refuses to act for it.

    Typically a page left open longer than the kernel remembers callers, or a request that came
    some other way than the gateway's portal address: reloading the page makes that connection,
    and the page it shows has fresh buttons. ``403``, the page as it stands, one sentence on top.
    """
    log.info("event=portal_action_refused action=%s address=%s why=not_a_recent_caller", what, address)
    return _caller_page(request, lookup, language, note="reload_needed", status=403)


def _free(lookup: Lookup | None) -> bool:
    """The enforcer's latest word is that this caller is not restricted (paid, promised, lifted)."""
    return lookup is not None and not lookup.restricted


async def continue_post(request: web.Request) -> web.StreamResponse:
    """"Continue to the internet": acknowledge the notice, then back to where they were going.

    ``guard_posts`` has checked rate, origin and token. The only places this redirects to are
    the URL this device asked for when it was redirected here, and the portal page. A caller
    who is free by the time they press (a payment or a promise in between) goes there too,
    whatever the enforcer says about the acknowledgement: there is nothing left to read.
    """
    address, language = await _form_post(request, RequestKind.CONTINUE)
    client = request.app[CLIENT_KEY]
    try:
        ack = await client.acknowledge(address)
    except EnforcerUnavailable as exc:
        lookup = await lookup_caller(request)
        if _free(lookup):
            return _continue_to(request, address, language)
        return await _enforcer_down(request, language, "acknowledge", exc, lookup)
    except NotRecentCaller:
        lookup = await lookup_caller(request)
        if _free(lookup):
            return _continue_to(request, address, language)
        return _not_recent(request, language, address, "acknowledge", lookup)
    if not ack.acknowledged:
        log.debug("event=acknowledgement_refused address=%s error=%r", address, ack.error)
        lookup = await lookup_caller(request)
        if _free(lookup):
            return _continue_to(request, address, language)
        return _caller_page(request, lookup, language, note="continue_not_needed", status=409)
    return _continue_to(request, address, language)


def _continue_to(request: web.Request, address: str, language: str) -> web.Response:
    """``303`` to the URL this device (address and ``User-Agent``) was redirected from, else to
    the portal page: another device behind the same address never gets this one's URL."""
    location = request.app[URLS_KEY].pop(address, user_agent=request.headers.get(hdrs.USER_AGENT))
    if location is None:
        # The portal page, which now says "carry on"; in the language picked on the page if
        # that is not what the browser's Accept-Language gives anyway.
        location = request.app[PORTAL_URL_KEY].url
        pages = request.app[PAGES_KEY]
        browser = page_language(None, request.headers.get(hdrs.ACCEPT_LANGUAGE), pages.messages,
                                pages.default_language)
        if language != browser:
            location = _with_query(location, {"lang": language})
    response = web.Response(status=303, headers={hdrs.LOCATION: location, hdrs.CACHE_CONTROL: NO_STORE,
                                                 **SECURITY_HEADERS})
    response.force_close()  # "Connection: close": the next request must start afresh
    return response


#: Refusals the customer is told are about timing ("not again so soon"); any other refusal
#: (disabled, a reason or an operator's restriction the button is not for) gets the plain "not
#: available for this connection". Neither says more: the page is no place for account details.
_REFUSED_SOON = frozenset({"limit_reached", "last_promise_lapsed", "promise_active"})


async def promise_post(request: web.Request) -> web.Response:
    """"I promise to pay": the enforcer lifts the restriction for a term and tells billing.

    ``guard_posts`` has checked rate, origin and token; the address is the TCP peer's, never a
    form field. Success answers the confirmation page itself (the date comes from the enforcer,
    not from a URL anyone could craft), whatever a lookup would say now (free, of course), with
    ``Connection: close`` so the browser's next request starts afresh now that the gateway lets
    it out. Refusals show the page as it now stands with one sentence on top: ``403`` not
    eligible, or not a recent caller ("reload the page"), ``503`` enforcer trouble. A caller who
    is free by now whatever the refusal (a payment arrived, a promise made by an earlier press)
    gets ``409`` and the "your service is active" page, never a complaint; after enforcer
    trouble, the same page with ``200`` and no sentence (the promise may have been made).
    """
    address, language = await _form_post(request, RequestKind.PROMISE)
    try:
        answer: Promised = await request.app[CLIENT_KEY].promise(address)
    except EnforcerUnavailable as exc:
        lookup = await lookup_caller(request)
        if _free(lookup):
            # Free, whether this promise was made before the answer got lost or something else
            # lifted them: "your service is active", without a sentence we cannot vouch for.
            request.app[_FAILURES_KEY].failed(f"promise: {exc}")
            return _caller_page(request, lookup, language)
        return await _enforcer_down(request, language, "promise", exc, lookup)
    except NotRecentCaller:
        lookup = await lookup_caller(request)
        if _free(lookup):
            return _caller_page(request, lookup, language, note="promise_not_needed", status=409)
        return _not_recent(request, language, address, "promise", lookup)
    if not answer.promised:
        log.info("event=promise_refused address=%s why=%s", address, answer.why)
        lookup = await lookup_caller(request)
        if answer.why == "not_restricted" or _free(lookup):
            return _caller_page(request, lookup, language, note="promise_not_needed", status=409)
        note: MessageKey = "promise_refused_soon" if answer.why in _REFUSED_SOON else "promise_refused"
        return _caller_page(request, lookup, language, note=note, status=403)
    log.info("event=promise_made address=%s until=%s", address, answer.until)
    response = _caller_page(request, None, language, promised_until=answer.until)
    response.force_close()
    return response


async def captive_api(request: web.Request) -> web.Response:
    """RFC 8908 status for the caller's address.

    Without the enforcer's answer there is no right guess (``false`` hides the portal from a
    restricted user, ``true`` traps a paying one behind "sign in"), so say 503 and let the
    client fall back to its own probes.
    """
    request[KIND_KEY] = RequestKind.CAPTIVE_API
    headers = {hdrs.CACHE_CONTROL: "private, no-store"}
    portal = request.app[PORTAL_URL_KEY]
    lookup = await lookup_caller(request)
    if lookup is None:
        return web.json_response({"error": "enforcer-unavailable", "user-portal-url": portal.url,
                                  "message": "Cannot tell whether this address is restricted; try again."},
                                 status=503, headers={**headers, hdrs.RETRY_AFTER: "5"})
    now = request.app[CLOCK_KEY]()
    answer: dict[str, object] = {"captive": lookup.captive(now), "user-portal-url": portal.url}
    if lookup.acknowledged(now) and lookup.ack_until is not None:
        answer["seconds-remaining"] = int(lookup.ack_until - now)
    # Bytes, so aiohttp adds no charset parameter: the media type defines none (JSON is UTF-8).
    return web.Response(body=json.dumps(answer).encode(), content_type=CAPTIVE_JSON, headers=headers)


# --- pages -----------------------------------------------------------------------------------

def request_language(request: web.Request, form_lang: str | None = None) -> str:
    """``lang`` from the form or the query, else ``Accept-Language``, else the default."""
    pages = request.app[PAGES_KEY]
    return page_language(form_lang or request.query.get("lang"), request.headers.get(hdrs.ACCEPT_LANGUAGE),
                         pages.messages, pages.default_language)


def _html(text: str, language: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers={
        hdrs.CACHE_CONTROL: NO_STORE, hdrs.CONTENT_LANGUAGE: language, hdrs.VARY: hdrs.ACCEPT_LANGUAGE,
        **SECURITY_HEADERS, **(headers or {})})


def _caller_page(request: web.Request, lookup: Lookup | None, language: str, *, note: MessageKey | None = None,
                 status: int = 200, headers: dict[str, str] | None = None,
                 promised_until: float | None = None) -> web.Response:
    """The page for this caller as the enforcer last described them (``lookup``).

    A caller who may browse (promised just now, free, or an acknowledged notice) gets a link back
    to the page this device was redirected from, if it was noted: kept, not handed out once, so
    a reload shows it again. The form token names the subscriber too when the lookup does, so a
    POST over the other address family is honoured.
    """
    address = caller_address(request) or ""
    subscriber = lookup.subscriber if lookup is not None else ""
    token = request.app[CSRF_KEY].issue(address, subscriber) if address else ""
    now = request.app[CLOCK_KEY]()
    browsing = promised_until is not None or _free(lookup) or (lookup is not None and lookup.acknowledged(now))
    agent = request.headers.get(hdrs.USER_AGENT)
    back_to = (request.app[URLS_KEY].peek(address, user_agent=agent) or "") if browsing and address else ""
    caller = Caller(lookup, language, address, token, now, note, promised_until, back_to)
    pages = request.app[PAGES_KEY]
    return _html(pages.caller_page(caller), pages.catalogue(language)[0], status, headers)


def _problem(request: web.Request, problem: str, status: int, language: str,
             headers: dict[str, str] | None = None) -> web.Response:
    pages = request.app[PAGES_KEY]
    return _html(pages.problem_page(problem, language), pages.catalogue(language)[0], status, headers)


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode(params)]))
    return parts._replace(query=query).geturl()


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


_PLAIN_IPV4 = re.compile(r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")


def caller_address(request: web.Request) -> str | None:
    """The peer's IP as the enforcer knows it: IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped."""
    remote = request.remote or ""
    if _PLAIN_IPV4.fullmatch(remote):  # the kernel's own formatting: nothing to normalise (hot path)
        return remote
    try:
        address = ipaddress.ip_address(remote)
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
        log.warning("event=enforcer_request_failed error=%s suppressed_since_last=%d", message, self._suppressed)
        self._last, self._suppressed = now, 0

    def succeeded(self) -> None:
        if self._last is not None:
            log.info("event=enforcer_requests_work_again unreported_failures=%d", self._suppressed)
            self._last, self._suppressed = None, 0


_FAILURES_KEY = web.AppKey("failures", _FailureLog)
