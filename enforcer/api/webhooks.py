"""Billing's webhooks: verified with the Standard Webhooks reference implementation before the
body is even parsed, then handed to an ``EventSink``; the answer is the sink's result.

An unsigned request learns nothing but 401, and a flood of them writes one log line per
``listeners.REJECT_LOG_EVERY`` seconds (with the count held back) while each is counted in
``walled_garden_events_total{result="unauthorized"}``. This module runs in the webhook worker
process too (``webhook_worker``), which is why it knows the daemon only as an ``EventSink``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ..event_sink import EventSink
from ..events import TYPES, Event, EventError, parse_event
from . import answer, json_response
from .listeners import REJECT_LOG_EVERY, LogLimiter

log = logging.getLogger("walled_garden.api")
#: Largest webhook body accepted; a billing event is a few hundred bytes.
MAX_EVENT_BYTES = 64 * 1024
#: Longest ``webhook-id`` accepted (Standard Webhooks ids are ~30 characters).
MAX_ID_CHARS = 256
#: Signature timestamps further than this from our clock are refused (the reference's tolerance).
SIGNATURE_TOLERANCE = 300.0


class SecretError(ValueError):
    pass


class Verifier:
    """The webhook verifier in force; ``SIGHUP`` swaps in a new secret without a restart."""

    def __init__(self, webhook: Webhook | None) -> None:
        self.webhook = webhook


VERIFIER_KEY = web.AppKey("verifier", Verifier)


SINK_KEY: web.AppKey[EventSink] = web.AppKey("sink")


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
        return json_response(503, {"error": "webhook secret not configured on this gateway"})
    if request.content_length is not None and request.content_length > MAX_EVENT_BYTES:
        return json_response(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, without a length to check first
        return json_response(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    if len(body) > MAX_EVENT_BYTES:
        return json_response(413, {"error": f"body larger than {MAX_EVENT_BYTES} bytes"})
    why = _verify(verifier, body, request)
    if why is not None:
        sink.count("unknown", "unauthorized")
        held = request.app[REJECT_LOG_KEY].allow()
        if held is not None:
            # At most one line per REJECT_LOG_EVERY; walled_garden_events_total counts them all.
            log.warning("event=webhook_rejected peer=%s why=%s held_back=%d", request.remote, why, held)
        return json_response(401, {"error": "missing or invalid webhook signature, "
                                            "or timestamp more than 5 minutes off"})
    event_id = request.headers["webhook-id"]
    problem = _id_problem(event_id)
    try:
        if problem:
            raise EventError(problem)
        event = parse_event(event_id, body)
        _not_ahead(event, request.headers["webhook-timestamp"])
    except EventError as exc:
        sink.count(_type_label(body), "malformed")
        return json_response(400, {"error": str(exc), "id": event_id if not problem else event_id[:MAX_ID_CHARS]})
    # Shielded: a handler cancelled at shutdown must not cancel the future a retry of the
    # same id shares (the in-process sink hands it to both).
    return answer(await asyncio.shield(sink.submit(event, received)))


def _not_ahead(event: Event, signed: str) -> None:
    """Refuse a body ``timestamp`` later than the moment billing signed it (plus the tolerance).

    Billing's timestamps order its events (``billing_order``), so one stamped 2099 would make
    every later release or restriction of that subscriber "older" and ignored for good, each
    answered 200. The signature's timestamp is checked against our clock (within 5 minutes);
    a body can be stamped before it (a payment booked late, a retry) but not after."""
    ahead = event.timestamp - float(signed)   # verified: a number near our clock
    if ahead > SIGNATURE_TOLERANCE:
        raise EventError(f"timestamp {_utc(event.timestamp)} is {ahead:.0f} s after the webhook-timestamp "
                         f"{_utc(float(signed))} it was signed at (at most {SIGNATURE_TOLERANCE:.0f} s "
                         "allowed): the event cannot have happened after it was sent")


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _type_label(body: bytes) -> str:
    """A refused event's ``type`` for ``walled_garden_events_total`` when the body names a known
    one (a payment without its subscriber is still a payment); otherwise ``unknown``, so a
    label never takes a value billing (or anyone) made up."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "unknown"
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) and kind in TYPES else "unknown"


REJECT_LOG_KEY = web.AppKey("reject_log", LogLimiter)


def webhook_app(sink: EventSink, verifier: Webhook | Verifier | None) -> web.Application:
    app = web.Application(client_max_size=MAX_EVENT_BYTES)
    app[SINK_KEY] = sink
    app[VERIFIER_KEY] = verifier if isinstance(verifier, Verifier) else Verifier(verifier)
    app[REJECT_LOG_KEY] = LogLimiter(REJECT_LOG_EVERY)
    app.router.add_post("/v1/events", post_event)
    return app


