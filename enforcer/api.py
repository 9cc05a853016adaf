"""The enforcer's HTTP faces: billing webhooks, the operator control socket, and /metrics.

Webhooks are verified with the Standard Webhooks reference implementation before the body
is even parsed; an unsigned request learns nothing but 401, and a flood of them writes one
log line per ``REJECT_LOG_EVERY`` seconds (with the count held back) while each is counted in
``walled_garden_events_total{result="unauthorized"}``. The control socket is a Unix socket
whose file permissions decide who may use it.

The TCP listeners (webhooks, metrics) face the network, so each connection is guarded
(``ConnectionGuard``): aiohttp's server has no header or body timeout of its own (only
``keepalive_timeout``, which since 3.1x also closes a connection that never sent a request,
but not one that trickles a header a byte at a time) and no connection cap. Rather than
rely on that, a thin ``asyncio.Protocol`` wraps aiohttp's per-connection protocol and keeps
one deadline per connection: a complete request head within ``HEAD_TIMEOUT`` seconds of
connecting (or of the previous answer), the body within ``BODY_TIMEOUT`` of the head;
at most ``max_connections()`` connections are open, and one beyond that closes the oldest
connection that is still waiting for or reading its request (never one whose request is
being handled). So a few hundred idle or slow clients cannot hold the file descriptors that
billing's next request needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import grp
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .event_sink import EventSink
from .events import EventError, load_json, parse_event
from .exemptions import check_category, parse_instant, parse_until
from .metrics import Metrics
from .outcome import Outcome, Refusal, Refused, Result

if TYPE_CHECKING:
    from .daemon import Enforcer

log = logging.getLogger("walled_garden.api")
ENFORCER_KEY: web.AppKey[Enforcer] = web.AppKey("enforcer")
SINK_KEY: web.AppKey[EventSink] = web.AppKey("sink")
#: The one place outcomes become HTTP statuses.
STATUS = {Refused.INVALID: 400, Refused.FORBIDDEN: 403, Refused.NOT_FOUND: 404, Refused.CONFLICT: 409,
          Refused.UNAVAILABLE: 503}
#: Largest webhook body accepted; a billing event is a few hundred bytes.
MAX_EVENT_BYTES = 64 * 1024
#: Longest ``webhook-id`` accepted (Standard Webhooks ids are ~30 characters).
MAX_ID_CHARS = 256
#: At most one ``webhook_rejected`` line per this many seconds; the next says how many were held back.
REJECT_LOG_EVERY = 10.0
#: Signature timestamps further than this from our clock are refused (the reference's tolerance).
SIGNATURE_TOLERANCE = 300.0
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


class SecretError(ValueError):
    pass


class Verifier:
    """The webhook verifier in force; ``SIGHUP`` swaps in a new secret without a restart."""

    def __init__(self, webhook: Webhook | None) -> None:
        self.webhook = webhook


VERIFIER_KEY = web.AppKey("verifier", Verifier)


def load_webhook_secret(path: str) -> Webhook:
    """Read ``whsec_<base64>``; errors name the file and the problem, never the secret."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"{path}: cannot read webhook secret: {exc.strerror or exc}") from None
    if not text.startswith("whsec_"):
        raise SecretError(f"{path}: webhook secret must look like whsec_<base64>")
    try:
        key = binascii.a2b_base64(text[len("whsec_"):] + "==")
    except binascii.Error:
        raise SecretError(f"{path}: the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise SecretError(f"{path}: webhook secret is too short (at least 16 bytes after decoding)")
    return Webhook(key)


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, sort_keys=True))


def http(result: Result) -> tuple[int, dict[str, Any]]:
    """A component's result as (status, body)."""
    if isinstance(result, Outcome):
        return 200, result.body
    return STATUS[result.kind], result.body


def _answer(result: Result) -> web.Response:
    return _json(*http(result))


def _signed_raw(webhook: Webhook, body: bytes, headers: dict[str, str]) -> bool:
    """The Standard Webhooks check over the raw bytes, for a body that is not UTF-8.

    The reference implementation decodes the body first, so it can only say 401 for such a
    body; billing that signed it deserves the 400 that says what is wrong with it."""
    if not (headers.get("webhook-id") and headers.get("webhook-signature")):
        return False
    try:
        stamp = float(headers.get("webhook-timestamp", ""))
        if abs(time.time() - stamp) > SIGNATURE_TOLERANCE:
            return False
        signed = f"{headers.get('webhook-id', '')}.{int(stamp)}.".encode() + body
        expected = hmac.new(webhook._whsecret, signed, hashlib.sha256).digest()  # the reference's own key field
        for candidate in headers.get("webhook-signature", "").split(" "):
            version, _, signature = candidate.partition(",")
            if version == "v1" and hmac.compare_digest(expected, base64.b64decode(signature, validate=True)):
                return True
    except (ValueError, OverflowError, binascii.Error, UnicodeEncodeError):
        return False
    return False


def _verify(webhook: Webhook, body: bytes, request: web.Request) -> str | None:
    """Why the signature does not hold, or None when it does."""
    headers = dict(request.headers)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return None if _signed_raw(webhook, body, {k.lower(): v for k, v in headers.items()}) else "body not UTF-8"
    try:
        webhook.verify(body, headers, json_parse=False)
    except (WebhookVerificationError, ValueError, binascii.Error) as exc:  # UnicodeError is a ValueError
        return str(exc) or type(exc).__name__
    return None


def _id_problem(event_id: str) -> str | None:
    if len(event_id) > MAX_ID_CHARS or not event_id.isprintable():
        return f"webhook-id must be at most {MAX_ID_CHARS} printable characters"
    return None


async def post_event(request: web.Request) -> web.Response:
    received = time.perf_counter()
    sink = request.app[SINK_KEY]
    verifier = request.app[VERIFIER_KEY].webhook
    if verifier is None:
        sink.count("unknown", "unavailable")
        return _json(503, {"error": "webhook secret not configured on this gateway"})
    if request.content_length is not None and request.content_length > MAX_EVENT_BYTES:
        return _json(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, without a length to check first
        return _json(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    if len(body) > MAX_EVENT_BYTES:
        return _json(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    why = _verify(verifier, body, request)
    if why is not None:
        sink.count("unknown", "unauthorized")
        held = request.app[REJECT_LOG_KEY].allow()
        if held is not None:
            log.warning("event=webhook_rejected peer=%s why=%r held_back=%d (at most one line per %.0fs; "
                        "walled_garden_events_total counts them all)", request.remote, why, held, REJECT_LOG_EVERY)
        return _json(401, {"error": "missing or invalid webhook signature, or timestamp more than 5 minutes off"})
    event_id = request.headers["webhook-id"]
    problem = _id_problem(event_id)
    try:
        if problem:
            raise EventError(problem)
        event = parse_event(event_id, body)
    except EventError as exc:
        sink.count("unknown", "malformed")
        return _json(400, {"error": str(exc), "id": event_id if not problem else event_id[:MAX_ID_CHARS]})
    return _answer(await asyncio.shield(sink.submit(event, received)))


REJECT_LOG_KEY = web.AppKey("reject_log", LogLimiter)


def webhook_app(sink: EventSink, verifier: Webhook | Verifier | None) -> web.Application:
    app = web.Application(client_max_size=MAX_EVENT_BYTES)
    app[SINK_KEY] = sink
    app[VERIFIER_KEY] = verifier if isinstance(verifier, Verifier) else Verifier(verifier)
    app[REJECT_LOG_KEY] = LogLimiter(REJECT_LOG_EVERY)
    app.router.add_post("/v1/events", post_event)
    return app


async def get_lookup(request: web.Request) -> web.Response:
    """An operator may look up any address; the portal only one the kernel saw connect to it
    (``PortalActions.lookup``), so even a compromised portal cannot enumerate subscribers."""
    address = request.query.get("address", "")
    enforcer = request.app[ENFORCER_KEY]
    try:
        if is_operator(request):
            return _json(200, enforcer.queries.lookup(address))
        return _answer(await enforcer.portal.lookup(address))
    except ValueError:
        return _json(400, {"error": f"address {address!r} is not an IP address"})


async def get_status(request: web.Request) -> web.Response:
    return _json(200, request.app[ENFORCER_KEY].queries.status())


async def post_for_address(request: web.Request) -> web.Response:
    """The portal's actions for the caller's address: ``acknowledge`` a notice, ``promise`` to pay."""
    try:
        body = load_json(await request.read())
        address = str(ipaddress.ip_address(str(body["address"])))
    except (ValueError, KeyError, TypeError):
        return _json(400, {"error": 'expected {"address": "<IP address>"}'})
    portal = request.app[ENFORCER_KEY].portal
    action = portal.acknowledge if request.match_info["action"] == "acknowledge" else portal.promise
    return _answer(await action(address))


async def get_explain(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    if not query:
        return _json(400, {"error": "q= is required: a subscriber id, an address or a reference code"})
    return _json(200, request.app[ENFORCER_KEY].queries.explain(query))


def peer_credentials(request: web.Request) -> tuple[int, int] | None:
    """(pid, uid) of the process on the other end of the control socket (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


#: What the portal needs; everything else on the control socket is for operators.
PORTAL_PATHS = frozenset({"/v1/lookup", "/v1/acknowledge", "/v1/promise"})


@web.middleware
async def operators_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """The socket's group lets the portal in; operator actions and subscriber details
    (status, explain, audit, restrict, lift, exempt, approve...) need root or the daemon's own
    user, so a compromised portal cannot lift anyone or read the audit log."""
    if request.path not in PORTAL_PATHS and not is_operator(request):
        return _json(403, {"error": "operator commands need root (sudo walled-garden ...)"})
    return await handler(request)


def is_operator(request: web.Request) -> bool:
    """Root or the daemon's own user on the other end of the control socket."""
    creds = peer_credentials(request)
    return creds is not None and creds[1] in (0, os.geteuid())


def peer(request: web.Request) -> str:
    """Who is on the other end of the control socket (SO_PEERCRED): the audited actor."""
    creds = peer_credentials(request)
    if creds is None:
        return "unknown"
    pid, uid = creds
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    return f"{name} (uid {uid}, pid {pid})"


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, read as strictly as a webhook's (``events.load_json``)."""
    try:
        body = load_json(await request.read())
    except EventError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"body must be JSON: {exc}"}),
                                 content_type="application/json")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}),
                                 content_type="application/json")
    return body


async def post_operator(request: web.Request) -> web.Response:
    body = await _body(request)
    sid = body.get("subscriber")
    if not isinstance(sid, str) or not sid:
        return _json(400, {"error": "subscriber is required"})
    restrict = request.match_info["action"] == "restrict"
    addresses = body.get("addresses")
    if addresses is not None and not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
        return _json(400, {"error": "addresses must be a list of strings"})
    return _answer(await request.app[ENFORCER_KEY].operator.change(
        peer(request), sid, restrict, str(body.get("reason") or ""), body.get("mode"), addresses))


async def post_held(request: web.Request) -> web.Response:
    body = await _body(request)
    lists = request.app[ENFORCER_KEY].lists
    action = lists.approve if request.match_info["action"] == "approve" else lists.reject
    return _answer(await action(peer(request), str(body.get("reason") or "")))


async def post_exempt(request: web.Request) -> web.Response:
    body = await _body(request)
    enforcer = request.app[ENFORCER_KEY]
    sid = body.get("subscriber")
    if not isinstance(sid, str) or not sid:
        return _json(400, {"error": "subscriber is required"})
    note = str(body.get("note") or "")
    if request.match_info["action"] == "unexempt":
        try:
            category = check_category(body["category"]) if body.get("category") else None
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        return _answer(await enforcer.operator.unexempt(peer(request), sid, category, note))
    try:
        category = check_category(body.get("category"))
        until = parse_until(body.get("until"), enforcer.engine.clock(), enforcer.engine.config.policy.windows.tz)
    except (ValueError, OverflowError) as exc:  # 9999-12-31 ends in year 10000
        return _json(400, {"error": f"until {body.get('until')!r}: out of range" if isinstance(exc, OverflowError)
                           else str(exc)})
    if len(note) > 500:
        return _json(400, {"error": "note: at most 500 characters"})
    return _answer(await enforcer.operator.exempt(peer(request), sid, category, until, note))


async def get_audit(request: web.Request) -> web.Response:
    query = request.query
    try:
        since = parse_instant(query["since"]) if query.get("since") else None
        limit = int(query.get("limit", "200"))
    except (ValueError, OverflowError) as exc:  # OverflowError: a time zone past year 1 or 9999
        return _json(400, {"error": f"since/limit: {exc}"})
    entries = request.app[ENFORCER_KEY].queries.audit(query.get("subscriber") or None, since, max(1, min(limit, 100_000)))
    return _json(200, {"entries": entries})


def control_app(enforcer: Enforcer) -> web.Application:
    app = web.Application(middlewares=[operators_only])
    app[ENFORCER_KEY] = enforcer
    app.router.add_get("/v1/lookup", get_lookup)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/explain", get_explain)
    app.router.add_post(r"/v1/{action:acknowledge|promise}", post_for_address)
    app.router.add_post(r"/v1/{action:restrict|lift}", post_operator)
    app.router.add_post(r"/v1/{action:approve|reject}", post_held)
    app.router.add_post(r"/v1/{action:exempt|unexempt}", post_exempt)
    app.router.add_get("/v1/audit", get_audit)
    return app


def metrics_app(metrics: Metrics, read_counters: Callable[[], Awaitable[dict[str, tuple[int, int]]]]
                ) -> web.Application:
    async def scrape(_: web.Request) -> web.Response:
        await metrics.kernel.refresh(read_counters)
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


async def start_unix_site(app: web.Application, path: str, group: str = "") -> web.AppRunner:
    """Serve ``app`` on a Unix socket usable by owner and group only (``group``, if named).

    Changing the group needs no capability when we are a member of it (the unit's
    ``SupplementaryGroups=walled-garden``).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
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


# -- the TCP listeners' guard (see the module docstring) -----------------------------------------
def max_connections() -> int:
    """``MAX_CONNECTIONS``, or fewer when the open-files limit (``LimitNOFILE=``) is lower:
    past that limit ``accept`` fails and billing could not connect at all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return min(MAX_CONNECTIONS, max(8, soft - FD_RESERVE))


class GuardedConnection(asyncio.Protocol):
    """One TCP connection: aiohttp's protocol inside, this connection's deadline outside."""

    def __init__(self, guard: "ConnectionGuard", inner: asyncio.Protocol) -> None:
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
                return _json(413, {"error": f"body larger than {request.client_max_size} bytes"})
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
