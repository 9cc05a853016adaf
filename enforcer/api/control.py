"""The control socket: operators (root or the daemon's user) and the portal (the socket's
group) ask the daemon over a Unix socket whose file permissions decide who may connect.

The portal may only look up, acknowledge and promise (``control_protocol.PORTAL_ACTIONS``), and
only for an address the kernel saw call the portal; everything else needs an operator, whose
identity (``SO_PEERCRED``) is recorded with each action.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
import socket
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .. import control_protocol as protocol
from ..events import SESSION_STARTED, SESSION_STOPPED, Event, EventError, load_json, session_fields
from ..exemptions import check_category, parse_instant, parse_until
from ..session_intake import CLI_SOURCE
from ..subscribers import id_problem
from . import answer, json_response

if TYPE_CHECKING:
    from ..daemon import Enforcer

ENFORCER_KEY: web.AppKey[Enforcer] = web.AppKey("enforcer")


async def get_lookup(request: web.Request) -> web.Response:
    """An operator may look up any address; the portal only one the kernel saw connect to it
    (``PortalActions.lookup``), so even a compromised portal cannot enumerate subscribers."""
    address = request.query.get(protocol.LOOKUP_ADDRESS, "")
    enforcer = request.app[ENFORCER_KEY]
    try:
        if is_operator(request):
            return json_response(200, enforcer.queries.lookup(address))
        return answer(await enforcer.portal.lookup(address))
    except ValueError:
        return json_response(400, {"error": f"address {address!r} is not an IP address"})


async def get_status(request: web.Request) -> web.Response:
    return json_response(200, request.app[ENFORCER_KEY].queries.status())


async def get_fleet(request: web.Request) -> web.Response:
    fleet = request.app[ENFORCER_KEY].fleet
    if fleet is None:
        return json_response(404, {"error": "fleet is not configured on this gateway (see the fleet key)"})
    return json_response(200, await fleet.status())


async def post_for_address(request: web.Request) -> web.Response:
    """The portal's actions for the caller's address: ``acknowledge`` a notice, ``promise`` to pay."""
    try:
        body = load_json(await request.read())
        address = str(ipaddress.ip_address(str(body["address"])))
    except (ValueError, KeyError, TypeError):
        return json_response(400, {"error": 'expected {"address": "<IP address>"}'})
    portal = request.app[ENFORCER_KEY].portal
    action = portal.acknowledge if request.path == protocol.ACKNOWLEDGE else portal.promise
    return answer(await action(address))


async def get_explain(request: web.Request) -> web.Response:
    query = request.query.get(protocol.EXPLAIN_QUERY, "")
    if not query:
        return json_response(400, {"error": "q= is required: a subscriber id, an address or a reference code"})
    return json_response(200, request.app[ENFORCER_KEY].queries.explain(query))


def peer_credentials(request: web.Request) -> tuple[int, int] | None:
    """(pid, uid) of the process on the other end of the control socket (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:   # the connection is already gone
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


#: What the portal needs; everything else on the control socket is for operators.
PORTAL_PATHS = frozenset({protocol.LOOKUP, *protocol.PORTAL_ACTIONS})


@web.middleware
async def operators_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The socket's group lets the portal in; operator actions and subscriber details
    (status, explain, audit, restrict, lift, exempt, approve...) need root or the daemon's own
    user, so a compromised portal cannot lift anyone or read the audit log."""
    if request.path not in PORTAL_PATHS and not is_operator(request):
        return json_response(403, {"error": "operator commands need root (sudo walled-garden ...)"})
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
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}),
                                 content_type="application/json")
    return body


#: The longest operator reason or note (a sentence for the audit log, not a document).
MAX_NOTE = 500


def _subscriber(body: dict[str, Any]) -> tuple[str, str | None]:
    """The body's subscriber id, or why it is none: every operator command checks it as the list
    does (``lift 'C 1;rm'`` used to leave an override under that name for good)."""
    sid = body.get("subscriber")
    if not isinstance(sid, str) or not sid:
        return "", "subscriber is required"
    problem = id_problem(sid)
    return sid, f"subscriber: {problem}" if problem else None


async def post_operator(request: web.Request) -> web.Response:
    body = await _body(request)
    sid, problem = _subscriber(body)
    if problem:
        return json_response(400, {"error": problem})
    reason = str(body.get("reason") or "")
    if len(reason) > MAX_NOTE:
        return json_response(400, {"error": f"reason: at most {MAX_NOTE} characters"})
    restrict = request.path == protocol.RESTRICT
    addresses = body.get("addresses")
    if addresses is not None and not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
        return json_response(400, {"error": "addresses must be a list of strings"})
    return answer(await request.app[ENFORCER_KEY].operator.change(
        peer(request), sid, restrict, reason, body.get("mode"), addresses))


async def post_held(request: web.Request) -> web.Response:
    body = await _body(request)
    lists = request.app[ENFORCER_KEY].lists
    action = lists.approve if request.path == protocol.APPROVE else lists.reject
    return answer(await action(peer(request), str(body.get("reason") or "")))


async def post_exempt(request: web.Request) -> web.Response:
    body = await _body(request)
    enforcer = request.app[ENFORCER_KEY]
    sid, problem = _subscriber(body)
    if problem:
        return json_response(400, {"error": problem})
    note = str(body.get("note") or "")
    if request.path == protocol.UNEXEMPT:
        try:
            category = check_category(body["category"]) if body.get("category") else None
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        return answer(await enforcer.operator.unexempt(peer(request), sid, category, note))
    try:
        category = check_category(body.get("category"))
        until = parse_until(body.get("until"), enforcer.engine.clock(), enforcer.engine.config.policy.windows.tz)
    except (ValueError, OverflowError) as exc:  # 9999-12-31 ends in year 10000
        problem = f"until {body.get('until')!r}: out of range" if isinstance(exc, OverflowError) else str(exc)
        return json_response(400, {"error": problem})
    if len(note) > MAX_NOTE:
        return json_response(400, {"error": f"note: at most {MAX_NOTE} characters"})
    return answer(await enforcer.operator.exempt(peer(request), sid, category, until, note))


async def post_session(request: web.Request) -> web.Response:
    """``walled-garden session start|stop`` (a BNG's ip-up/ip-down script): the same fields as
    a ``session.started``/``session.stopped`` event's data."""
    body = await _body(request)
    enforcer = request.app[ENFORCER_KEY]
    start = request.path == protocol.SESSION_START
    try:
        sid, match, addresses = session_fields(body, need_address=start)
    except EventError as exc:
        return json_response(400, {"error": str(exc).replace("data.", "")})
    event = Event(f"cli-{secrets.token_hex(8)}", SESSION_STARTED if start else SESSION_STOPPED,
                  enforcer.engine.clock(), sid, note=f"by {peer(request)}", match=match, addresses=addresses)
    return answer(await enforcer.session_sink.handle_event(event, CLI_SOURCE))


async def get_audit(request: web.Request) -> web.Response:
    query = request.query
    try:
        since = parse_instant(query["since"]) if query.get("since") else None
        limit = int(query.get("limit", "200"))
    except (ValueError, OverflowError) as exc:  # OverflowError: a time zone past year 1 or 9999
        return json_response(400, {"error": f"since/limit: {exc}"})
    entries = request.app[ENFORCER_KEY].queries.audit(query.get("subscriber") or None, since,
                                                      max(1, min(limit, 100_000)))
    return json_response(200, {"entries": entries})


def control_app(enforcer: Enforcer) -> web.Application:
    app = web.Application(middlewares=[operators_only])
    app[ENFORCER_KEY] = enforcer
    app.router.add_get(protocol.LOOKUP, get_lookup)
    app.router.add_get(protocol.STATUS, get_status)
    app.router.add_get(protocol.EXPLAIN, get_explain)
    app.router.add_get(protocol.AUDIT, get_audit)
    app.router.add_get(protocol.FLEET, get_fleet)
    for path, handler in ((protocol.ACKNOWLEDGE, post_for_address), (protocol.PROMISE, post_for_address),
                          (protocol.RESTRICT, post_operator), (protocol.LIFT, post_operator),
                          (protocol.APPROVE, post_held), (protocol.REJECT, post_held),
                          (protocol.EXEMPT, post_exempt), (protocol.UNEXEMPT, post_exempt),
                          (protocol.SESSION_START, post_session), (protocol.SESSION_STOP, post_session)):
        app.router.add_post(path, handler)
    return app


