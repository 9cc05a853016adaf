"""The enforcer's HTTP faces: billing webhooks, the operator control socket, and /metrics.

Webhooks are verified with the Standard Webhooks reference implementation before the body
is even parsed; an unsigned request learns nothing but 401. The control socket is a Unix
socket whose file permissions decide who may use it.
"""

from __future__ import annotations

import binascii
import grp
import ipaddress
import json
import logging
import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .daemon import Enforcer
from .events import EventError, parse_event
from .exemptions import check_category, parse_instant, parse_until

log = logging.getLogger("walled_garden.api")
ENFORCER_KEY = web.AppKey("enforcer", Enforcer)
#: Largest webhook body accepted; a billing event is a few hundred bytes.
MAX_EVENT_BYTES = 64 * 1024


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


async def post_event(request: web.Request) -> web.Response:
    received = time.perf_counter()
    enforcer = request.app[ENFORCER_KEY]
    verifier = request.app[VERIFIER_KEY].webhook
    if verifier is None:
        enforcer.metrics.events.labels("unknown", "unavailable").inc()
        return _json(503, {"error": "webhook secret not configured on this gateway"})
    if request.content_length is not None and request.content_length > MAX_EVENT_BYTES:
        return _json(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    body = await request.read()
    if len(body) > MAX_EVENT_BYTES:
        return _json(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    try:
        verifier.verify(body, dict(request.headers), json_parse=False)
    except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
        enforcer.metrics.events.labels("unknown", "unauthorized").inc()
        log.warning("event=webhook_rejected peer=%s why=%r", request.remote, str(exc) or type(exc).__name__)
        return _json(401, {"error": "missing or invalid webhook signature, or timestamp more than 5 minutes off"})
    event_id = request.headers["webhook-id"]
    try:
        event = parse_event(event_id, body)
    except EventError as exc:
        enforcer.metrics.events.labels("unknown", "malformed").inc()
        return _json(400, {"error": str(exc), "id": event_id})
    status, answer = await enforcer.handle_event(event, received)
    return _json(status, answer)


def webhook_app(enforcer: Enforcer, verifier: Webhook | Verifier | None) -> web.Application:
    app = web.Application(client_max_size=MAX_EVENT_BYTES)
    app[ENFORCER_KEY] = enforcer
    app[VERIFIER_KEY] = verifier if isinstance(verifier, Verifier) else Verifier(verifier)
    app.router.add_post("/v1/events", post_event)
    return app


async def get_lookup(request: web.Request) -> web.Response:
    address = request.query.get("address", "")
    try:
        return _json(200, request.app[ENFORCER_KEY].lookup(address))
    except ValueError:
        return _json(400, {"error": f"address {address!r} is not an IP address"})


async def get_status(request: web.Request) -> web.Response:
    return _json(200, request.app[ENFORCER_KEY].status())


async def post_for_address(request: web.Request) -> web.Response:
    """The portal's actions for the caller's address: ``acknowledge`` a notice, ``promise`` to pay."""
    try:
        body = await request.json()
        address = str(ipaddress.ip_address(str(body["address"])))
    except (ValueError, KeyError, TypeError):
        return _json(400, {"error": 'expected {"address": "<IP address>"}'})
    enforcer = request.app[ENFORCER_KEY]
    action = enforcer.acknowledge if request.match_info["action"] == "acknowledge" else enforcer.promise
    status, answer = await action(address)
    return _json(status, answer)


async def get_explain(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    if not query:
        return _json(400, {"error": "q= is required: a subscriber id, an address or a reference code"})
    return _json(200, request.app[ENFORCER_KEY].explain(query))


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
    if request.path not in PORTAL_PATHS:
        creds = peer_credentials(request)
        if creds is None or creds[1] not in (0, os.geteuid()):
            return _json(403, {"error": "operator commands need root (sudo walled-garden ...)"})
    return await handler(request)


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
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be JSON"}), content_type="application/json")
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
    status, answer = await request.app[ENFORCER_KEY].operator_change(
        peer(request), sid, restrict, str(body.get("reason") or ""), body.get("mode"), addresses)
    return _json(status, answer)


async def post_held(request: web.Request) -> web.Response:
    body = await _body(request)
    enforcer = request.app[ENFORCER_KEY]
    action = enforcer.approve if request.match_info["action"] == "approve" else enforcer.reject
    status, answer = await action(peer(request), str(body.get("reason") or ""))
    return _json(status, answer)


async def post_exempt(request: web.Request) -> web.Response:
    body = await _body(request)
    enforcer = request.app[ENFORCER_KEY]
    sid = body.get("subscriber")
    if not isinstance(sid, str) or not sid:
        return _json(400, {"error": "subscriber is required"})
    note = str(body.get("note") or "")
    if request.match_info["action"] == "unexempt":
        category = body.get("category") or None
        status, answer = await enforcer.unexempt(peer(request), sid, category, note)
        return _json(status, answer)
    try:
        category = check_category(body.get("category"))
        until = parse_until(body.get("until"), enforcer.clock(), enforcer.config.policy.windows.tz)
    except ValueError as exc:
        return _json(400, {"error": str(exc)})
    if len(note) > 500:
        return _json(400, {"error": "note: at most 500 characters"})
    status, answer = await enforcer.exempt(peer(request), sid, category, until, note)
    return _json(status, answer)


async def get_audit(request: web.Request) -> web.Response:
    query = request.query
    try:
        since = parse_instant(query["since"]) if query.get("since") else None
        limit = int(query.get("limit", "200"))
    except ValueError as exc:
        return _json(400, {"error": f"since/limit: {exc}"})
    entries = request.app[ENFORCER_KEY].audit(query.get("subscriber") or None, since, max(1, min(limit, 100_000)))
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


def metrics_app(enforcer: Enforcer) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        await enforcer.metrics.kernel.refresh(enforcer.read_kernel_counters)
        return web.Response(body=generate_latest(enforcer.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    app = web.Application()
    app.router.add_get("/metrics", metrics)
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


async def start_tcp_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
