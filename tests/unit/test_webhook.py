"""Billing webhook: Standard Webhooks signatures, malformed bodies, replays, ordering.

Runs the real aiohttp app and the real Enforcer over the fake dataplane, without root.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook

from daemon_helpers import RESULTS
from enforcer.api.webhooks import SecretError, load_webhook_secret, webhook_app
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import EventError, parse_event
from enforcer.sources import ListUpdate
from enforcer.subscribers import key_text, parse_list

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class FakeConntrack:
    def __init__(self) -> None:
        self.flushed: list[set[Any]] = []

    async def flush(self, networks: Any, keep_mark: int = 0) -> int:
        self.flushed.append(set(networks))
        return len(networks)


def _config(tmp: Path) -> Any:
    return parse_config(f"""
state_dir: {tmp}/state
subscribers: {{source: {tmp}/list.yaml}}
policy: {{payment_grace: 1h}}
""", str(tmp / "config.yaml"))


def _event(kind: str, sid: str, ts: str = "2026-11-23T10:00:00Z", **data: Any) -> str:
    return json.dumps({"type": kind, "timestamp": ts, "data": {"subscriber": sid, **data}})


def _headers(body: str, msg_id: str = "msg_1", secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    when = datetime.fromtimestamp(at if at is not None else time.time(), tz=UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body), "content-type": "application/json"}


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    clock = [datetime(2026, 11, 23, 10, 30, tzinfo=UTC).timestamp()]
    fake, conntrack = FakeDataplane(), FakeConntrack()
    enforcer = Enforcer(_config(tmp_path), dataplane=fake, conntrack=conntrack,  # type: ignore[arg-type]
                        clock=lambda: clock[0])
    await enforcer.engine.restore()
    subs = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.10, '2001:db8:10:100::/56']}\n", "l.yaml")
    await enforcer.lists.on_list(ListUpdate(subs, "l.yaml", "1"))
    client = TestClient(TestServer(webhook_app(enforcer.events, Webhook(base64.b64decode(SECRET[6:])))))
    await client.start_server()
    yield client, enforcer, fake, conntrack, clock
    await client.close()
    await enforcer.close()


def _restricted(fake: FakeDataplane) -> set[str]:
    assert fake.state is not None
    return set(fake.view["mode4_32"]) | set(fake.view["mode6_56"])


@pytest.mark.asyncio
async def test_signed_payment_lifts_and_flushes(setup: Any) -> None:
    client, enforcer, fake, conntrack, _ = setup
    assert _restricted(fake) == {"100.64.0.10", "2001:db8:10:100::"}
    body = _event("payment.received", "C-1")
    response = await client.post("/v1/events", data=body, headers=_headers(body))
    answer = await response.json()
    assert response.status == 200, answer
    assert answer["mode"] == "free" and answer["result"] == "applied"
    assert _restricted(fake) == set()
    assert {key_text(n) for n in conntrack.flushed[-1]} == {"100.64.0.10/32", "2001:db8:10:100::/56"}
    assert enforcer.metrics.event_to_enforce._sum.get() > 0


@pytest.mark.asyncio
async def test_replay_of_same_id_answers_the_same_and_acts_once(setup: Any) -> None:
    client, _, fake, _, _ = setup
    body = _event("payment.received", "C-1")
    first = await client.post("/v1/events", data=body, headers=_headers(body, "msg_dup"))
    transactions = len(fake.transactions)
    second = await client.post("/v1/events", data=body, headers=_headers(body, "msg_dup"))
    assert first.status == second.status == 200
    assert await first.json() == await second.json()
    assert len(fake.transactions) == transactions


@pytest.mark.asyncio
@pytest.mark.parametrize("mutate", ["no-signature", "wrong-secret", "tampered-body", "stale", "future",
                                    "garbage-signature", "no-id"])
async def test_bad_signatures_are_401_and_change_nothing(setup: Any, mutate: str) -> None:
    client, _, fake, _, _ = setup
    body = _event("payment.received", "C-1")
    headers = _headers(body)
    if mutate == "no-signature":
        del headers["webhook-signature"]
    elif mutate == "wrong-secret":
        headers = _headers(body, secret="whsec_" + base64.b64encode(b"x" * 32).decode())
    elif mutate == "tampered-body":
        body = _event("payment.received", "C-2")
    elif mutate == "stale":
        headers = _headers(body, at=time.time() - 301)
    elif mutate == "future":
        headers = _headers(body, at=time.time() + 301)
    elif mutate == "garbage-signature":
        headers["webhook-signature"] = "v1"
    elif mutate == "no-id":
        del headers["webhook-id"]
    before = len(fake.transactions)
    response = await client.post("/v1/events", data=body, headers=headers)
    assert response.status == 401
    assert len(fake.transactions) == before
    assert _restricted(fake)


@pytest.mark.asyncio
@pytest.mark.parametrize("body, needle", [
    ("not json", "not JSON"),
    (json.dumps([1]), "JSON object"),
    (json.dumps({"type": "payment.refunded", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}}),
     "payment.refunded"),
    (json.dumps({"type": "payment.received", "data": {"subscriber": "C-1"}}), "timestamp is missing"),
    (json.dumps({"type": "payment.received", "timestamp": "yesterday", "data": {"subscriber": "C-1"}}), "RFC 3339"),
    (json.dumps({"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {}}), "data.subscriber"),
    (_event("subscriber.restricted", "C-9", addresses=["100.64.0.300"]), "100.64.0.300"),
    (_event("subscriber.restricted", "C-9"), "addresses"),
])
async def test_malformed_bodies_are_400_naming_the_problem(setup: Any, body: str, needle: str) -> None:
    client, _, fake, _, _ = setup
    before = len(fake.transactions)
    response = await client.post("/v1/events", data=body, headers=_headers(body, "msg_bad"))
    answer = await response.json()
    assert response.status == 400
    assert needle in answer["error"]
    assert len(fake.transactions) == before


@pytest.mark.asyncio
async def test_restricted_event_then_release_and_stale_event_ignored(setup: Any) -> None:
    client, _enforcer, fake, _, _ = setup
    body = _event("subscriber.restricted", "C-7", "2026-11-23T10:00:00Z", addresses=["100.64.0.77"], reason="suspended")
    assert (await client.post("/v1/events", data=body, headers=_headers(body, "m1"))).status == 200
    assert "100.64.0.77" in _restricted(fake)
    body = _event("subscriber.released", "C-7", "2026-11-23T10:05:00Z")
    assert (await client.post("/v1/events", data=body, headers=_headers(body, "m2"))).status == 200
    assert "100.64.0.77" not in _restricted(fake)
    # An older restriction arriving late must not undo the newer release.
    body = _event("subscriber.restricted", "C-7", "2026-11-23T09:59:00Z", addresses=["100.64.0.77"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, "m3"))
    assert response.status == 200 and (await response.json())["result"] == "ignored"
    assert "100.64.0.77" not in _restricted(fake)


@pytest.mark.asyncio
async def test_address_held_by_another_subscriber_is_409(setup: Any) -> None:
    client, _, _fake, _, _ = setup
    body = _event("subscriber.restricted", "C-8", addresses=["100.64.0.10"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, "m9"))
    assert response.status == 409
    assert "C-1" in (await response.json())["error"]


@pytest.mark.asyncio
async def test_grace_keeps_paid_subscriber_free_then_expires(setup: Any) -> None:
    client, enforcer, fake, _, clock = setup
    body = _event("payment.received", "C-1", "2026-11-23T08:00:00Z")  # delivered late: grace runs from receipt
    assert (await client.post("/v1/events", data=body, headers=_headers(body, "p1"))).status == 200
    # Billing re-exports the list without having booked the payment yet: still free.
    subs = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.10]}\n", "l.yaml")
    await enforcer.lists.on_list(ListUpdate(subs, "l.yaml", "2"))
    assert _restricted(fake) == set()
    clock[0] += 3599
    await enforcer.timers.tick()
    assert _restricted(fake) == set()
    clock[0] += 1  # grace (1h from receipt at 10:30) is over at 11:30
    await enforcer.timers.tick()
    assert _restricted(fake) == {"100.64.0.10"}


@pytest.mark.asyncio
async def test_kernel_failure_answers_503_and_state_is_unchanged(setup: Any) -> None:
    client, enforcer, fake, _, _ = setup
    fake.fail_next = "Could not process rule: Cannot allocate memory"
    body = _event("payment.received", "C-1")
    response = await client.post("/v1/events", data=body, headers=_headers(body, "f1"))
    assert response.status == 503
    assert "C-1" not in enforcer.engine.inputs.graces
    assert _restricted(fake) == {"100.64.0.10", "2001:db8:10:100::"}
    # The retry (same id) is processed, not answered from a cache of the failure.
    await enforcer.timers.tick()  # repair: full sync from the kernel
    response = await client.post("/v1/events", data=body, headers=_headers(body, "f1"))
    assert response.status == 200


def test_parse_event_accepts_unix_seconds_and_rejects_naive_times() -> None:
    assert parse_event("x", _event("payment.received", "C-1", ts=1795420800)).timestamp == 1795420800.0  # type: ignore[arg-type]
    with pytest.raises(EventError, match="time zone"):
        parse_event("x", _event("payment.received", "C-1", ts="2026-11-23T10:00:00"))


def test_webhook_secret_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(SecretError, match=str(path)):
        load_webhook_secret(str(path))
    path.write_text("hunter2\n")
    with pytest.raises(SecretError, match="whsec_"):
        load_webhook_secret(str(path))
    path.write_text("whsec_c2hvcnQ=\n")
    with pytest.raises(SecretError, match="too short"):
        load_webhook_secret(str(path))
    path.write_text(SECRET + "\n")
    assert load_webhook_secret(str(path))


def test_processed_ids_are_pruned_after_retention(tmp_path: Path) -> None:
    from enforcer.store import EVENT_RETENTION, Store

    store = Store(str(tmp_path))
    store.record_events([("old", {"a": 1}, None)], None)
    store.record_events([("new", {"a": 2}, None)], None)
    store.db.execute("UPDATE events SET received_at = received_at - ? WHERE event_id = 'old'", (EVENT_RETENTION + 1,))
    assert store.prune_events() == 1
    assert store.event_answer("old") is None and store.event_answer("new") == {"a": 2}


async def test_concurrent_retry_of_the_same_id_acts_once(setup: Any) -> None:
    import asyncio

    client, _, fake, conntrack, _ = setup
    body = _event("payment.received", "C-1")
    headers = _headers(body, "msg_race")
    before = len(fake.transactions)
    first, second = await asyncio.gather(client.post("/v1/events", data=body, headers=headers),
                                         client.post("/v1/events", data=body, headers=headers))
    assert first.status == second.status == 200
    assert await first.json() == await second.json()
    assert len(fake.transactions) == before + 1
    assert len(conntrack.flushed) == 2  # the list's restriction, then this one lift


async def test_a_burst_is_coalesced_into_few_transactions_and_one_bad_event_fails_alone(setup: Any) -> None:
    import asyncio

    client, enforcer, fake, _, _ = setup
    bodies = [_event("subscriber.restricted", f"B-{i}", addresses=[f"100.64.9.{i}"]) for i in range(1, 41)]
    bodies.append(_event("subscriber.restricted", "B-bad", addresses=["100.64.0.10"]))  # C-1's address
    before = len(fake.transactions)
    responses = await asyncio.gather(*(client.post("/v1/events", data=b, headers=_headers(b, f"burst{i}"))
                                       for i, b in enumerate(bodies)))
    statuses = [r.status for r in responses]
    assert statuses[:-1] == [200] * 40 and statuses[-1] == 409
    assert len(fake.transactions) - before < 10, "a burst must not cost one transaction per event"
    assert enforcer.events.batcher.largest > 1
    assert {f"100.64.9.{i}" for i in range(1, 41)} <= _restricted(fake)
    assert enforcer.queries.lookup("100.64.0.10")["subscriber"] == "C-1"


async def test_batcher_runs_a_lone_item_at_once() -> None:
    import asyncio

    from enforcer.batcher import Batcher

    seen: list[list[int]] = []

    async def commit(batch: list[int]) -> None:
        seen.append(batch)
        await asyncio.sleep(0.01)

    batcher: Batcher[int] = Batcher(commit)
    batcher.submit(1)
    await asyncio.sleep(0)  # one loop turn, no timer
    await asyncio.sleep(0)
    assert seen == [[1]]
    for i in range(2, 6):
        batcher.submit(i)  # arrive while the first batch is committing
    await asyncio.sleep(0.05)
    assert seen == [[1], [2, 3, 4, 5]]
    await batcher.close()


async def test_address_change_moves_enforcement_and_survives_restart(setup: Any, tmp_path: Path) -> None:
    client, enforcer, fake, conntrack, _ = setup
    body = _event("subscriber.addresses_changed", "C-1", addresses=["100.64.0.77", "2001:db8:77::/56"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, "move1"))
    assert response.status == 200, await response.json()
    assert _restricted(fake) == {"100.64.0.77", "2001:db8:77::"}
    assert {key_text(n) for n in conntrack.flushed[-1]} == {"100.64.0.10/32", "2001:db8:10:100::/56",
                                                       "100.64.0.77/32", "2001:db8:77::/56"}
    assert "addresses from event move1" in enforcer.queries.explain("C-1")["why"]
    reloaded = enforcer.engine.store.load_inputs()
    assert [str(a) for a in reloaded.readdressed["C-1"].addresses] == ["100.64.0.77/32", "2001:db8:77::/56"]
    # A new export that changes C-1's entry is the newer word about its addresses.
    subs = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.88]}\n", "l.yaml")
    await enforcer.lists.on_list(ListUpdate(subs, "l.yaml", "3"))
    assert _restricted(fake) == {"100.64.0.88"}
    assert "C-1" not in enforcer.engine.store.load_inputs().readdressed


async def test_an_unexpected_failure_answers_503_instead_of_hanging(setup: Any, monkeypatch: Any) -> None:
    client, enforcer, _fake, _, _ = setup

    def broken(*_: Any) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(enforcer.engine.billing_order, "stale", broken)
    body = _event("payment.received", "C-1")
    response = await client.post("/v1/events", data=body, headers=_headers(body, "boom"))
    assert response.status == 503 and "retry" in (await response.json())["error"]
    monkeypatch.undo()
    response = await client.post("/v1/events", data=body, headers=_headers(body, "boom"))
    assert response.status == 200, "the failed id was not cached; the retry is processed"


async def test_a_batch_state_is_saved_at_its_commit_before_the_flush(setup: Any) -> None:
    """The batch's state rows are written when its kernel change commits, not when its flush
    ends: a restart in between must not undo it, and a list change that lands meanwhile (and
    restricts the subscriber again) is recorded after it, not overwritten by it."""
    import asyncio

    client, enforcer, fake, conntrack, clock = setup
    release = asyncio.Event()
    flush = conntrack.flush

    async def slow_flush(networks: Any, keep_mark: int = 0) -> int:
        await release.wait()
        return await flush(networks)

    conntrack.flush = slow_flush
    body = _event("subscriber.released", "C-1")
    lifted = asyncio.ensure_future(client.post("/v1/events", data=body, headers=_headers(body, "release-1")))
    for _ in range(200):                       # until the lift is committed (its flush waits)
        if "100.64.0.10" not in _restricted(fake):
            break
        await asyncio.sleep(0.01)
    assert "C-1" not in enforcer.engine.store.enforced(), "saved at the commit, while the flush still runs"
    assert enforcer.engine.store.load_inputs().overrides["C-1"].restrict is False
    answer = enforcer.engine.store.event_answer("release-1")
    assert answer is not None and answer["result"] == "applied", "the answer is saved with the state it answers"
    clock[0] += 5
    changed = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], mode: notice}\n", "l.yaml")
    await enforcer.lists.on_list(ListUpdate(changed, "l.yaml", "2"))   # a changed entry supersedes the event
    assert "100.64.0.10" in _restricted(fake)
    release.set()
    assert (await lifted).status == 200
    assert enforcer.engine.store.event_answer("release-1") is not None
    assert enforcer.engine.store.enforced()["C-1"]["mode"] == "notice"
    assert [(a["old"], a["new"]) for a in enforcer.engine.store.audit("C-1")][-2:] == [
        ("walled-garden", "free"), ("free", "notice")]


def _raw_headers(body: bytes, msg_id: str) -> dict[str, str]:
    """Standard Webhooks headers signed over raw bytes (the reference signs only text)."""
    import hashlib
    import hmac

    stamp = str(int(time.time()))
    digest = hmac.new(base64.b64decode(SECRET[6:]), f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": stamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode(), "content-type": "application/json"}


_PAY = '{"type": "payment.received", "timestamp": %s, "data": {"subscriber": "C-1"}}'


@pytest.mark.parametrize("body, needle", [
    (_PAY % '"0000-01-01T00:00:00Z"', "RFC 3339"),
    (_PAY % '"10000-01-01T00:00:00Z"', "RFC 3339"),
    (_PAY % '"0001-01-01T00:00:00+01:00"', "outside 1970"),
    (_PAY % '"9999-12-31T23:30:00-01:00"', "outside 1970"),
    (_PAY % "1e400", "outside 1970"),
    (_PAY % "-5", "outside 1970"),
    (_PAY % ("9" * 400), "outside 1970"),
    (_PAY % "NaN", "NaN"),
    (_PAY % "Infinity", "Infinity"),
    (_PAY % "-Infinity", "Infinity"),
    ('{"type": "dispute.opened", "timestamp": 5, "data": {"subscriber": "C-1", "until": 1e300}}', "data.until"),
    ('{"type": "dispute.opened", "timestamp": 5, "data": {"subscriber": "C-1", "until": "99999-01-01"}}',
     "data.until"),
    ("[" * 30_000 + "]" * 30_000, "nested"),
    ('{"type": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),
    ("5", "JSON object"),
    ('"payment.received"', "JSON object"),
    ("null", "JSON object"),
    ('{"type": "payment.received", "type": "subscriber.released", "timestamp": 5, "data": {"subscriber": "C-1"}}',
     "twice"),
    ('{"type": "payment.received", "timestamp": 5, "data": {"subscriber": "C-1"}, "data": {"subscriber": "C-2"}}',
     "twice"),
    ('{"type": "dispute.opened", "timestamp": 5, "data": {"subscriber": "C-1", "note": "\\ud800"}}', "surrogate"),
    ('{"type": ["payment.received"], "timestamp": 5, "data": {"subscriber": "C-1"}}', "type"),
    ('{"type": "payment.received", "timestamp": [5], "data": {"subscriber": "C-1"}}', "timestamp"),
    ('{"type": "payment.received", "timestamp": 5, "data": [1]}', "data"),
    ('{"type": "payment.received", "timestamp": 5, "data": {"subscriber": {"id": "C-1"}}}', "data.subscriber"),
    ('{"type": "subscriber.restricted", "timestamp": 5, "data": {"subscriber": "C-9", "addresses": {"a": 1}}}',
     "addresses"),
    ('{"type": "subscriber.restricted", "timestamp": 5, "data": {"subscriber": "C-9", "addresses": ["100.64.0.9"],'
     ' "mode": ["x"]}}', "mode"),
    ('{"type": "dispute.opened", "timestamp": 5, "data": {"subscriber": "C-1", "note": {"x": 1}}}', "data.note"),
])
async def test_signed_bodies_that_no_event_can_be_are_400_never_500(setup: Any, body: str, needle: str) -> None:
    client, _, fake, _, _ = setup
    before = len(fake.transactions)
    response = await client.post("/v1/events", data=body, headers=_headers(body, "msg_odd"))
    answer = await response.json()
    assert response.status == 400, answer
    assert needle in answer["error"]
    assert len(fake.transactions) == before


@pytest.mark.parametrize("body, needle", [(b'{"type": "payment.received\xff"}', "not UTF-8: byte 26"),
                                          (b"\xff\xfe{\x00}\x00", "not UTF-8: byte 0")])
async def test_a_signed_body_that_is_not_utf8_is_400(setup: Any, body: bytes, needle: str) -> None:
    client, _, _, _, _ = setup
    response = await client.post("/v1/events", data=body, headers=_raw_headers(body, "msg_bytes"))
    assert response.status == 400 and needle in (await response.json())["error"]
    headers = {**_raw_headers(body, "msg_bytes"), "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
    assert (await client.post("/v1/events", data=body, headers=headers)).status == 401, "unsigned: learns nothing"


@pytest.mark.parametrize("msg_id", ["x" * 257, "id\twith-a-tab", "zero\u200bwidth"])
async def test_an_unusable_webhook_id_is_400(setup: Any, msg_id: str) -> None:
    client, _, _fake, _, _ = setup
    body = _event("payment.received", "C-1")
    response = await client.post("/v1/events", data=body, headers=_headers(body, msg_id))
    assert response.status == 400 and "webhook-id" in (await response.json())["error"]


@pytest.mark.parametrize("status", [200, 400, 403, 404, 409, 503])
async def test_the_daemons_answer_reaches_billing_unchanged(setup: Any, monkeypatch: Any, status: int) -> None:
    """The in-process path: whatever result the daemon's future resolves to is the answer (``api.STATUS``)."""
    import asyncio

    client, enforcer, _, _, _ = setup

    def submit(event: Any, received: float) -> Any:
        future = asyncio.get_running_loop().create_future()
        future.set_result(RESULTS[status](event.id))
        return future

    monkeypatch.setattr(enforcer.events, "submit", submit)
    body = _event("subscriber.restricted", "C-5", addresses=["100.64.0.55"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, f"pass-{status}"))
    assert response.status == status
    assert await response.json() == {"id": f"pass-{status}", "error": f"daemon says {status}"}


@pytest.mark.asyncio
async def test_a_body_stamped_after_its_signature_is_400_and_orders_nothing(setup: Any) -> None:
    """One event stamped 2099 would make every later event of that subscriber 'older' and
    ignored (answered 200) for good: billing_order orders by the body's timestamp."""
    client, enforcer, fake, _, _ = setup
    sent = time.time()
    body = _event("subscriber.restricted", "C-7", "2099-01-01T00:00:00Z", addresses=["100.64.0.77"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, "f1", at=sent))
    answer = await response.json()
    assert response.status == 400, answer
    assert "webhook-timestamp" in answer["error"] and "2099-01-01T00:00:00Z" in answer["error"]
    assert "100.64.0.77" not in _restricted(fake)
    assert "C-7" not in enforcer.engine.billing_order.newest
    # within the tolerance a body may run ahead of the signature (two clocks at billing)
    ahead = datetime.fromtimestamp(sent + 290, UTC).isoformat().replace("+00:00", "Z")
    body = _event("subscriber.restricted", "C-7", ahead, addresses=["100.64.0.77"])
    response = await client.post("/v1/events", data=body, headers=_headers(body, "f2", at=sent))
    assert response.status == 200, await response.json()
    assert "100.64.0.77" in _restricted(fake)
