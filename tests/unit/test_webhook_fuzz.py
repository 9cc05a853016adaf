"""Fuzzing the webhook's parser and HTTP handler: whatever billing or a stranger
sends, the parser gives an Event or an EventError and the handler answers one of the statuses
docs/reference.md (Billing webhooks) names, never a 500. Bounded example counts keep it CI-sized."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from daemon_helpers import NoConntrack
from enforcer.api.webhooks import webhook_app
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import TYPES, Event, EventError, parse_event
from enforcer.sources import ListUpdate
from enforcer.subscribers import parse_list

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
ANSWERS = {200, 400, 401, 409, 413, 503}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
timestamps = (st.integers(min_value=-10**20, max_value=10**20) | st.floats() | st.text(max_size=30)
              | st.datetimes(timezones=st.none() | st.just(UTC)).map(lambda d: d.isoformat())
              | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00", "2026-11-23T10:00:00Z"]))
addresses = st.lists(st.sampled_from(["100.64.0.9", "100.64.0.10", "2001:db8:9::/56", "100.64.0.0/16", "0.0.0.0/0",
                                      "::", "x", "::ffff:100.64.0.5"]) | st.text(max_size=12), max_size=3)
payloads = st.fixed_dictionaries({"subscriber": st.sampled_from(["C-1", "C-9", "C-1\n", ""]) | json_values},
                                 optional={"addresses": addresses | json_values, "mode": json_values
                                           | st.sampled_from(["notice", "walled-garden", "free"]),
                                           "reason": json_values, "note": json_values, "until": timestamps})
events = st.fixed_dictionaries({"type": st.sampled_from(TYPES) | json_values, "timestamp": timestamps,
                                "data": payloads | json_values})
plausible = st.fixed_dictionaries({
    # billing stamps an event before it signs it (a body later than its signature is 400)
    "type": st.sampled_from(TYPES), "timestamp": st.integers(1_700_000_000, int(time.time())),
    "data": st.fixed_dictionaries({"subscriber": st.sampled_from(["C-1", "C-9", "C-10"]),
                                   "addresses": st.lists(st.sampled_from(["100.64.0.9", "100.64.0.10",
                                                                          "2001:db8:9::/56"]), min_size=1,
                                                         max_size=2, unique=True)})})
bodies = (plausible.map(lambda e: json.dumps(e).encode()) | events.map(lambda e: json.dumps(e).encode())
          | json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200))


@FUZZ
@given(bodies)
def test_parse_event_gives_an_event_or_an_event_error(body: bytes) -> None:
    try:
        event = parse_event("fuzz", body)
    except EventError as exc:
        assert str(exc)
        return
    assert isinstance(event, Event) and event.type in TYPES
    assert 0 <= event.timestamp < 253402300800


def _signed(body: bytes, msg_id: str, at: float) -> dict[str, str]:
    when = datetime.fromtimestamp(at, tz=UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)),
            "webhook-signature": Webhook(SECRET).sign(msg_id, when, body.decode("utf-8", "replace"))}


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
signatures = st.sampled_from(["valid", "none", "garbage", "stale", "wrong-id"])


def test_the_webhook_handler_answers_only_the_specified_statuses(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n")
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    clients: list[TestClient] = []

    async def start() -> None:
        clients.append(TestClient(TestServer(webhook_app(enforcer.events, Webhook(SECRET)))))
        await enforcer.engine.restore()
        subs = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.10]}\n", "l.yaml")
        await enforcer.lists.on_list(ListUpdate(subs, "l.yaml", "1"))
        await clients[0].start_server()

    async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        response = await clients[0].post("/v1/events", data=body, headers=headers)
        return response.status, await response.read()

    seen: set[int] = set()

    @FUZZ
    @example(body=b'{"type": "payment.received", "timestamp": 1790000000, "data": {"subscriber": "C-1"}}',
             how="valid", msg_id="fuzz-pay", extra={})
    @example(body=b'{"type": "payment.received"}', how="valid", msg_id="fuzz-bad", extra={})
    @example(body=b"{}", how="none", msg_id="", extra={})
    @given(body=bodies, how=signatures, msg_id=header_text, extra=st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-any"]),
        header_text, max_size=2))
    def check(body: bytes, how: str, msg_id: str, extra: dict[str, str]) -> None:
        now = time.time()
        headers: dict[str, str] = {}
        if how in ("valid", "wrong-id") and msg_id.strip():
            headers = _signed(body, msg_id, now)
            if how == "wrong-id":
                headers["webhook-id"] = msg_id + "x"
        elif how == "stale":
            headers = _signed(body, msg_id or "m", now - 400)
        elif how == "garbage":
            headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now)), "webhook-signature": "v1," + msg_id}
        if how != "valid":
            headers.update(extra)
        status, answer = loop.run_until_complete(post(body, headers))
        seen.add(status)
        assert status in ANSWERS, (status, answer)

    try:
        loop.run_until_complete(start())
        check()
        assert {200, 400, 401} <= seen, seen
    finally:
        if clients:
            loop.run_until_complete(clients[0].close())
        loop.run_until_complete(enforcer.close())
        loop.close()
