"""A fleet of two gateways on one real ``nats-server`` (issue 15, SPEC §11), through the doors a
billing system, an operator and a subscriber use: signed webhooks, the ``walled-garden`` CLI, the
portal in a browser's place, and real traffic from the subscribers' namespaces.

Each test builds its own fleet (``fleet_helpers.running_fleet``): NATS in a namespace of its own,
gateways A and B each in their own topology, both listing the same subscriber ids at their own
addresses. What one gateway accepts (a webhook, an operator's command, a portal press, a list
verdict) must hold on the other, in stream order, exactly once, through a gateway's crash or cut
link and through NATS's outage; ``fleet status`` and the metrics tell the gateways apart.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import (
    ANSWER_TIMEOUT,
    GATEWAY_A,
    GATEWAY_B,
    RECEIVER_URL,
    STREAM,
    Fleet,
    Gateway,
    NotifySocket,
    event,
    running_fleet,
    sid,
    wait_until,
)

from enforcer.demo.topology import Topology
from required import tool

LIFT_BOUND = 5.0        # seconds for an input accepted on one gateway to hold on the other


@pytest.fixture(autouse=True)
def _nats_server() -> None:
    tool("nats-server", "nats-server")


def listed(*indexes: int, reason: str = "overdue") -> Any:
    """A list of the topology's subscribers ``indexes``, restricted, each at its own address."""
    def entries(topo: Topology) -> list[dict[str, Any]]:
        return [{"id": sid(i), "addresses": [topo.subscribers[i - 1].addr4], "reason": reason} for i in indexes]
    return entries


def rows(gateway: Gateway, subscriber: str) -> list[tuple[str, str]]:
    """(old, new) of each audit row of ``subscriber`` on ``gateway`` since the fleet started, oldest first."""
    return [(row["old"], row["new"]) for row in gateway.audit(subscriber, since_start=True)]


def applied_everywhere(fleet: Fleet) -> bool:
    """Both gateways have applied the whole stream (as their ``status`` says)."""
    a, b = fleet.a.fleet_status(), fleet.b.fleet_status()
    last = a["stream_last_sequence"]
    return bool(a["applied_sequence"] == b["applied_sequence"] == last == b["stream_last_sequence"])


def ok(result: dict[str, Any], what: str) -> dict[str, Any]:
    assert result["status"] == 200 and result["answer"].get("result") == "applied", (what, result)
    return dict(result["answer"])


def test_an_input_accepted_by_one_gateway_holds_on_the_other(tmp_path: Path) -> None:
    secret = tmp_path / "outbox.secret"     # the promise webhook's own key
    secret.write_text("whsec_" + base64.b64encode(b"fleet-promise-outbox-key-tests!!").decode() + "\n")
    secret.chmod(0o600)

    def promises(config: dict[str, Any]) -> None:
        config["policy"]["promise_to_pay"] = {"enabled": True, "term": "3d", "reasons": ["overdue"],
                                              "webhook_url": RECEIVER_URL, "webhook_secret_file": str(secret)}
    with running_fleet(tmp_path, listed(1, 2, 3, 4), adjust=promises) as fleet:
        a, b = fleet.a, fleet.b
        received = {gateway.name: gateway.start_receiver() for gateway in (a, b)}
        for gateway in (a, b):
            assert all(gateway.redirected(i) for i in (1, 2, 3, 4)), gateway.name
        # The reference-code key is the fleet's: the portal shows one code for a subscriber anywhere.
        assert a.lab.lookup(a.addr(1))["reference"] == b.lab.lookup(b.addr(1))["reference"]

        # A payment posted to A: A lifts before it answers, B within seconds (real traffic).
        started = time.monotonic()
        [paid] = a.post(event("payment.received", sid(1), "msg_fleet_pay_1"))
        answered = time.monotonic()
        ok(paid, "payment on A")
        assert a.reaches_upstream(1), "A answered 200 only after its own kernel lifted"
        lifted_b = wait_until(lambda: b.reaches_upstream(1), LIFT_BOUND, "B lifts the subscriber A was paid for",
                              detail=fleet.logs)
        print(f"payment on A: answered in {answered - started:.3f}s, B lifted {lifted_b:.3f}s after the answer")
        assert b.redirected(2), "only the subscriber who paid"
        graces = [gw.cli_json("explain", sid(1))["payment_grace"] for gw in (a, b)]
        assert graces[0]["until"] == graces[1]["until"] == paid["answer"]["until"], graces

        # An operator's lift on B applies on A.
        lift = b.cli("lift", sid(2), "--reason", "paid at the counter")
        assert lift.returncode == 0, lift.stdout + lift.stderr
        assert b.reaches_upstream(2)
        wait_until(lambda: a.reaches_upstream(2), LIFT_BOUND, "A lifts what the operator lifted on B",
                   detail=fleet.logs)

        # An exemption set on A holds on B.
        exempt = a.cli("exempt", sid(4), "--category", "dispute", "--until", "14d", "--note", "invoice disputed")
        assert exempt.returncode == 0, exempt.stdout + exempt.stderr
        wait_until(lambda: b.reaches_upstream(4), LIFT_BOUND, "B frees the subscriber exempted on A", detail=fleet.logs)
        assert b.cli_json("explain", sid(4))["exemptions"], "B knows the exemption itself"
        # ... and its end, set on B, holds on A.
        unexempt = b.cli("unexempt", sid(4), "--note", "dispute settled")
        assert unexempt.returncode == 0, unexempt.stdout + unexempt.stderr
        wait_until(lambda: a.redirected(4), LIFT_BOUND, "A walls in again the subscriber unexempted on B",
                   detail=fleet.logs)

        # A promise made on A's portal (as a browser) holds on B, and is used up there too.
        promise_on_portal(a, 3)
        assert a.reaches_upstream(3)
        wait_until(lambda: b.reaches_upstream(3), LIFT_BOUND, "B frees the subscriber who promised on A",
                   detail=fleet.logs)
        assert b.lab.lookup(b.addr(3))["promise"]["eligible"] is False
        promises = [gw.cli_json("explain", sid(3))["promises"] for gw in (a, b)]
        assert len(promises[0]) == len(promises[1]) == 1 and promises[0] == promises[1], promises
        # Billing hears of the promise once, from the gateway whose portal was used.
        wait_until(lambda: received[a.name].read_text().strip(), 10, "promise.made sent by A", detail=fleet.logs)
        time.sleep(1.0)   # nothing more should follow, from either
        sent = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in received.items()}
        assert len(sent[a.name]) == 1 and sent[b.name] == [], sent
        assert json.loads(sent[a.name][0]["body"])["data"]["subscriber"] == sid(3)

        # The audit on each gateway names the gateway that accepted each input ("via bng-a", a promise
    # "on the portal of bng-a").
        for gateway, subscriber, accepted_by in ((b, sid(1), GATEWAY_A), (a, sid(2), GATEWAY_B),
                                                 (b, sid(4), GATEWAY_A), (b, sid(3), GATEWAY_A)):
            causes = [row["cause"] for row in gateway.audit(subscriber)]
            assert any(accepted_by in cause for cause in causes), (gateway.name, subscriber, causes)
        for gateway in (a, b):
            assert rows(gateway, sid(1)) == [("walled-garden", "free")], gateway.name
            assert rows(gateway, sid(2)) == [("walled-garden", "free")], gateway.name
        assert set(a.kernel_set()) == {a.addr(4)} and set(b.kernel_set()) == {b.addr(4)}, "only the unexempted"


def promise_on_portal(gateway: Gateway, i: int) -> None:
    """Subscriber ``i`` opens the portal page and presses "I promise to pay" (tests/kernel/test_promise.py)."""
    topo, lab = gateway.topo, gateway.lab
    jar = str(lab.work / f"cookies-{i}")
    cookies = ("-c", jar, "-b", jar)
    status, page, _, _ = topo.curl(gateway.sub(i), lab.portal_url, extra=cookies)
    assert status == 200, page[:2000]
    form = re.search(r'<form[^>]*action="([^"]*/promise)"[^>]*>(.*?)</form>', page, re.DOTALL)
    assert form, page[:3000]
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
    action = form.group(1) if form.group(1).startswith("http") else lab.portal_url.rstrip("/") + form.group(1)
    data = tuple(arg for name, value in fields.items() for arg in ("--data-urlencode", f"{name}={value}"))
    status, confirmation, _, _ = topo.curl(gateway.sub(i), action, extra=(*cookies, *data))
    assert status == 200 and "Your service is back until" in confirmation, confirmation[:3000]


def test_a_gateway_back_from_a_crash_or_a_cut_applies_what_it_missed(tmp_path: Path) -> None:
    with running_fleet(tmp_path, listed(1, 2)) as fleet:
        a, b = fleet.a, fleet.b
        b.lab.stop_daemon(kill=True)          # SIGKILL: no goodbye to NATS
        now = time.time()
        # restrict X, lift X, restrict Y, pay Z: each stamped by billing a second after the previous
        sent = a.post(event("subscriber.restricted", sid(3), "msg_missed_1", now - 4, addresses=[a.addr(3)],
                            reason="overdue"),
                      event("subscriber.released", sid(3), "msg_missed_2", now - 3),
                      event("subscriber.restricted", sid(4), "msg_missed_3", now - 2, addresses=[a.addr(4)],
                            reason="overdue"),
                      event("payment.received", sid(1), "msg_missed_4", now - 1), workers=1)
        for result in sent:
            ok(result, "sent to A while B is down")
        assert a.redirected(4) and a.reaches_upstream(3) and a.reaches_upstream(1)
        last = a.fleet_status()["stream_last_sequence"]

        notify = NotifySocket(tmp_path / "b-notify.sock", b.lab.work / "daemon.log")
        try:
            b.lab.start_daemon(env={"NOTIFY_SOCKET": notify.path}, timeout=30)
            _, log_at_ready = notify.wait_for("READY=1")
        finally:
            notify.close()
        # All four were applied, in stream order, before READY=1: the log read the moment READY=1
        # arrived already holds them, after the restart's catch-up began.
        assert log_at_ready is not None
        restart = log_at_ready.rindex("event=fleet_following")
        applied = re.findall(r"event=billing_event id=(msg_missed_\d)", log_at_ready[restart:])
        assert applied == ["msg_missed_1", "msg_missed_2", "msg_missed_3", "msg_missed_4"], log_at_ready[restart:]
        status = b.fleet_status()
        assert status["applied_sequence"] == status["stream_last_sequence"] == last, status
        assert status["caught_up"] is True and status["connected"] is True, status
        entries = [row for row in b.audit(since_start=True) if row["subscriber"] in (sid(1), sid(3), sid(4))]
        changes = [(row["subscriber"], row["old"], row["new"]) for row in sorted(entries, key=lambda r: r["seq"])]
        assert changes == [(sid(3), "free", "walled-garden"), (sid(3), "walled-garden", "free"),
                           (sid(4), "free", "walled-garden"), (sid(1), "walled-garden", "free")], entries
        assert set(b.kernel_set()) == {b.addr(2), b.addr(4)}, b.kernel_set()
        assert b.redirected(4) and b.redirected(2) and b.reaches_upstream(3) and b.reaches_upstream(1)
        assert all(f"via {GATEWAY_A}" in row["cause"] for row in entries), entries

        # Cut off (its link to NATS down, the daemon running): A goes on, B answers 503 and enforces
        # what it has; healed, B applies what it missed, and billing's retry of what B refused
        # applies once, everywhere.
        fleet.nats.cut(b.topo.gateway.netns)
        ok(a.post(event("subscriber.released", sid(2), "msg_cut_release"))[0], "release on A while B is cut off")
        payment = event("payment.received", sid(4), "msg_cut_pay")
        [refused] = b.post(payment)
        assert refused["status"] == 503, refused
        assert b.redirected(2) and b.redirected(4) and a.reaches_upstream(2) and a.redirected(4)
        fleet.nats.heal(b.topo.gateway.netns)
        wait_until(lambda: b.reaches_upstream(2), 20, "B, healed, applies what A accepted meanwhile", interval=0.2,
                   detail=fleet.logs)
        [retried] = b.post(payment, retry=True, deadline=30)
        ok(retried, "billing's retry on B once healed")
        wait_until(lambda: a.reaches_upstream(4) and b.reaches_upstream(4), LIFT_BOUND, "the retried payment on both",
                   detail=fleet.logs)
        wait_until(lambda: applied_everywhere(fleet), 10, "both gateways at the stream's end", detail=fleet.logs)
        for gateway in (a, b):
            assert rows(gateway, sid(4)) == [("free", "walled-garden"), ("walled-garden", "free")], gateway.name
            assert rows(gateway, sid(2))[-1:] == [("walled-garden", "free")], gateway.name


def test_nats_down_answers_503_keeps_enforcing_and_the_retries_apply_once(tmp_path: Path) -> None:
    with running_fleet(tmp_path, listed(1, 2)) as fleet:
        a, b = fleet.a, fleet.b
        ok(a.post(event("subscriber.restricted", sid(3), "msg_before_outage", addresses=[a.addr(3)],
                        reason="overdue"))[0], "before the outage")
        wait_until(lambda: b.redirected(3), LIFT_BOUND, "B applies the event from before the outage", detail=fleet.logs)
        kernel = {gateway.name: gateway.kernel_set() for gateway in (a, b)}

        fleet.nats.stop_all()
        events = [event("payment.received", sid(1), "msg_outage_pay"),
                  event("subscriber.released", sid(2), "msg_outage_release")]
        started = time.monotonic()
        refused = a.post(*events)
        assert [r["status"] for r in refused] == [503, 503], refused
        assert time.monotonic() - started < 2 * ANSWER_TIMEOUT + 5, "a 503 within the answer timeout"
        # Nothing changed, and A still enforces what it had.
        assert {gateway.name: gateway.kernel_set() for gateway in (a, b)} == kernel
        assert a.redirected(1) and a.redirected(2) and a.redirected(3)
        assert rows(a, sid(1)) == [] and rows(a, sid(2)) == []
        assert a.fleet_status()["connected"] is False
        fleet.nats.start_all()           # the same store: what was accepted before is still there
        wait_until(lambda: a.fleet_status()["connected"] and b.fleet_status()["connected"], 30,
                   "both gateways reconnected", interval=0.2, detail=fleet.logs)
        retried = a.post(*events, retry=True, deadline=30)
        answers = [ok(result, "retried after the outage") for result in retried]
        again = a.post(*events)
        assert [ok(result, "the same ids again") for result in again] == answers
        wait_until(lambda: b.reaches_upstream(1) and b.reaches_upstream(2), LIFT_BOUND, "B applies the retries",
                   detail=fleet.logs)
        wait_until(lambda: applied_everywhere(fleet), 10, "both gateways at the stream's end", detail=fleet.logs)
        assert a.fleet_status()["stream_last_sequence"] == 3, "one message per accepted webhook, none lost"
        for gateway in (a, b):
            assert rows(gateway, sid(1)) == [("walled-garden", "free")], gateway.name
            assert rows(gateway, sid(2)) == [("walled-garden", "free")], gateway.name
            assert rows(gateway, sid(3)) == [("free", "walled-garden")], gateway.name
            assert set(gateway.kernel_set()) == {gateway.addr(3)}, gateway.name


def test_the_same_webhook_id_at_both_gateways_applies_once(tmp_path: Path) -> None:
    with running_fleet(tmp_path, listed(1, 2)) as fleet:
        a, b = fleet.a, fleet.b
        payment = event("payment.received", sid(1), "msg_twice_pay")
        first = ok(a.post(payment)[0], "payment on A")
        second = ok(b.post(payment)[0], "the same payment on B")
        keys = ("id", "result", "subscriber", "mode")
        assert {k: first.get(k) for k in keys} == {k: second.get(k) for k in keys}, (first, second)

        # The same id posted to both at once.
        release = event("subscriber.released", sid(2), "msg_twice_release")
        on_a, on_b = a.post_async(release), b.post_async(release)
        answers = [ok(on_a.result()[0], "release on A"), ok(on_b.result()[0], "release on B")]
        assert {k: answers[0].get(k) for k in keys} == {k: answers[1].get(k) for k in keys}, answers

        wait_until(lambda: applied_everywhere(fleet), 10, "both gateways at the stream's end", detail=fleet.logs)
        assert a.fleet_status()["stream_last_sequence"] == 2, "one message per webhook id"
        for gateway in (a, b):
            assert rows(gateway, sid(1)) == [("walled-garden", "free")], gateway.name
            assert rows(gateway, sid(2)) == [("walled-garden", "free")], gateway.name
            assert gateway.reaches_upstream(1) and gateway.reaches_upstream(2)


def test_fleet_status_and_metrics_name_each_gateway(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    with running_fleet(tmp_path, listed(1, 2)) as fleet:
        a, b = fleet.a, fleet.b
        ok(a.post(event("payment.received", sid(1), "msg_status_pay"))[0], "payment on A")

        def both_listed() -> dict[str, Any] | None:
            view = a.cli_json("fleet", "status")
            by_name = {row["gateway"]: row for row in view["gateways"]}
            done = set(by_name) == {GATEWAY_A, GATEWAY_B} and all(r["applied_sequence"] == 1 for r in by_name.values())
            return view if done else None
        wait_until(both_listed, 10, "fleet status lists both gateways at sequence 1", interval=0.3, detail=fleet.logs)
        view = a.cli_json("fleet", "status")
        assert (view["gateway"], view["stream"], view["connected"]) == (GATEWAY_A, STREAM, True), view
        assert view["stream_last_sequence"] == view["applied_sequence"] == 1, view
        now = time.time()
        for row in view["gateways"]:
            assert row["applied_sequence"] == 1 and row["behind"] == 0 and row["connected"] is True, row
            assert 0 <= row["lag_seconds"] < 5 and 0 <= row["seen_seconds_ago"] < 10, row
            assert now - 10 < row["last_seen"] <= now + 1, row
        text = a.cli("fleet", "status")
        assert text.returncode == 0 and GATEWAY_A in text.stdout and GATEWAY_B in text.stdout, text.stdout + text.stderr

        # Every sample of A's metrics names A; the fleet's series are there.
        wait_until(lambda: sample(a.metrics(), "walled_garden_fleet_applied_sequence") == 1, 5,
                   "the applied sequence in A's metrics")
        metrics = a.metrics()
        samples = parse_metrics(metrics)
        unnamed = [s for s in samples if s[1].get("gateway") != GATEWAY_A]
        assert not unnamed, unnamed[:10]
        assert sample(metrics, "walled_garden_fleet_connected") == 1
        assert sample(metrics, "walled_garden_fleet_stream_sequence") == 1
        assert sample(metrics, "walled_garden_fleet_published_total", result="accepted") == 1
        assert sample(metrics, "walled_garden_fleet_applied_total", kind="event", result="applied") == 1
        assert sample(metrics, "walled_garden_fleet_lag_seconds") is not None
        assert sample(metrics, "walled_garden_fleet_apply_retries_total") == 0
        assert sample(metrics, "walled_garden_fleet_peer_seen_seconds_ago", peer=GATEWAY_B) is not None, "A sees B"
        check = a.topo.run(a.topo.gateway.netns, "sh", "-c", f"{promtool} check metrics <<'EOF'\n{metrics}EOF\n")
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

        # B killed: A goes on, and its fleet status shows B behind (B's last heartbeat stays).
        b.lab.stop_daemon(kill=True)
        ok(a.post(event("subscriber.released", sid(2), "msg_status_release"))[0], "release on A while B is down")

        def b_behind() -> bool:
            view = a.cli_json("fleet", "status")
            by_name = {row["gateway"]: row for row in view["gateways"]}
            return bool(view["stream_last_sequence"] == 2 and by_name[GATEWAY_A]["applied_sequence"] == 2
                        and by_name[GATEWAY_B]["applied_sequence"] == 1 and by_name[GATEWAY_B]["behind"] == 1)
        wait_until(b_behind, 6, "A's fleet status shows B one message behind", interval=0.3,
                   detail=lambda: str(a.cli_json("fleet", "status")))

        def b_gone() -> bool:
            rows = {row["gateway"]: row for row in a.cli_json("fleet", "status")["gateways"]}
            return rows[GATEWAY_B]["connected"] is False and rows[GATEWAY_A]["connected"] is True
        waited = wait_until(b_gone, 10, "A's fleet status shows B not seen", interval=0.5,
                            detail=lambda: str(a.cli_json("fleet", "status")))
        rows = {row["gateway"]: row for row in a.cli_json("fleet", "status")["gateways"]}
        assert rows[GATEWAY_B]["seen_seconds_ago"] >= 5, (waited, rows)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text scrape: (name, labels, value)."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            found.append((match.group(1), dict(_LABEL.findall(match.group(2) or "")), float(match.group(3))))
    return found


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels`` (None if there is none)."""
    values = [v for n, have, v in parse_metrics(text) if n == name and labels.items() <= have.items()]
    assert len(values) <= 1, (name, labels, values)
    return values[0] if values else None


def test_a_gateway_started_while_nats_is_down_enforces_its_local_state(tmp_path: Path) -> None:
    catch_up = 6.0

    def short_catch_up(config: dict[str, Any]) -> None:
        config["fleet"]["catch_up_timeout"] = f"{catch_up:g}s"
    with running_fleet(tmp_path, listed(1, 2), adjust=short_catch_up) as fleet:
        a, b = fleet.a, fleet.b
        ok(a.post(event("payment.received", sid(1), "msg_before_down"))[0], "payment before the outage")
        wait_until(lambda: b.reaches_upstream(1), LIFT_BOUND, "B applies the payment", detail=fleet.logs)
        kernel = b.kernel_set()
        fleet.nats.stop_all()
        b.lab.stop_daemon(kill=True)
        started = time.monotonic()
        b.lab.start_daemon(timeout=catch_up + 15)
        took = time.monotonic() - started
        # It enforces what it had (safety rule 6): the kernel as before, real traffic as before.
        assert b.kernel_set() == kernel and b.redirected(2) and b.reaches_upstream(1)
        status = b.fleet_status()
        assert status["connected"] is False, status
        log_then = b.lab.log()

        # NATS back: B joins again without a restart and applies what comes next.
        fleet.nats.start_all()
        ok(a.post(event("subscriber.released", sid(2), "msg_after_down"), retry=True, deadline=30)[0],
           "release once NATS is back")
        wait_until(lambda: b.reaches_upstream(2), 20, "B, started without NATS, applies what follows", interval=0.2,
                   detail=fleet.logs)
        wait_until(lambda: applied_everywhere(fleet), 10, "both gateways at the stream's end", detail=fleet.logs)

        # READY with the local state at once (not after the whole catch_up_timeout), logged, in status.
        assert took < catch_up - 2, f"READY=1 came {took:.1f}s after start: it waited for NATS that was not there"
        assert status.get("error"), f"status shows no error while NATS is unreachable: {status}"
        assert "event=fleet_unavailable" in log_then, "nothing logged about NATS being unreachable before READY=1"


def test_list_verdicts_and_notice_acknowledgements_travel(tmp_path: Path) -> None:
    def guarded(config: dict[str, Any]) -> None:
        config["subscribers"]["guard"] = {"max_restrict": 2, "max_lift": 2}

    def first_list(topo: Topology) -> list[dict[str, Any]]:
        return [{"id": sid(1), "addresses": [topo.subscribers[0].addr4], "reason": "overdue"},
                {"id": sid(2), "addresses": [topo.subscribers[1].addr4], "reason": "overdue", "mode": "notice"}]
    with running_fleet(tmp_path, first_list, adjust=guarded) as fleet:
        a, b = fleet.a, fleet.b
        # A notice acknowledged on A's portal lets the subscriber's HTTP through on B too.
        acknowledge_on_portal(a, 2)
        assert a.reaches_upstream(2)
        wait_until(lambda: b.reaches_upstream(2), LIFT_BOUND, "B lets through the notice acknowledged on A",
                   detail=fleet.logs)
        assert b.lab.lookup(b.addr(2))["ack_until"] is not None

        # A list restricting three more is held on both; approved once, on A, it applies on both.
        for gateway in (a, b):
            gateway.lab.write_list([*first_list(gateway.topo), *(
                {"id": sid(i), "addresses": [gateway.addr(i)], "reason": "overdue"} for i in (3, 4)),
                {"id": "C-1005", "addresses": ["100.64.50.10"], "reason": "overdue"}])
        wait_until(lambda: all(g.cli_json("status")["held_changes"] for g in (a, b)), 10, "the list held on both",
                   interval=0.2, detail=fleet.logs)
        digests = {g.name: g.cli_json("status")["held_changes"][0]["digest"] for g in (a, b)}
        assert digests[a.name] == digests[b.name], digests
        approve = a.cli("approve", "--reason", "the new month's list, checked")
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert a.redirected(3) and a.redirected(4)
        wait_until(lambda: b.redirected(3) and b.redirected(4), LIFT_BOUND, "B applies the list approved on A",
                   detail=fleet.logs)
        assert not b.cli_json("status")["held_changes"]
        # B's log names the approval and where it was given (the audit row says only "on the restricted list").
        assert re.search(rf"event=list_approved by=[^\n]* via {GATEWAY_A} ", b.lab.log()), b.lab.log()

        # A list lifting everyone is held on both; rejected once, on B, it is dropped on both.
        for gateway in (a, b):
            gateway.lab.write_list([])
        wait_until(lambda: all(g.cli_json("status")["held_changes"] for g in (a, b)), 10, "the lift held on both",
                   interval=0.2, detail=fleet.logs)
        reject = b.cli("reject", "--reason", "an empty export is a billing bug")
        assert reject.returncode == 0, reject.stdout + reject.stderr
        wait_until(lambda: not a.cli_json("status")["held_changes"], LIFT_BOUND, "A drops the list rejected on B",
                   detail=fleet.logs)
        for gateway in (a, b):
            assert gateway.redirected(1) and gateway.redirected(3), gateway.name
            assert set(gateway.kernel_set()) >= {gateway.addr(1), gateway.addr(3), gateway.addr(4), "100.64.50.10"}


def acknowledge_on_portal(gateway: Gateway, i: int) -> None:
    """Notice subscriber ``i`` is redirected, opens the portal page and presses "Continue"
    (tests/kernel/test_portal_flow.py)."""
    topo, lab = gateway.topo, gateway.lab
    assert gateway.redirected(i)
    jar = str(lab.work / f"cookies-ack-{i}")
    status, page, _, _ = topo.curl(gateway.sub(i), lab.portal_url, extra=("-c", jar, "-b", jar))
    assert status == 200, page[:2000]
    form = re.search(r'<form[^>]*action="([^"]+)"', page)
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page))
    assert form and fields, page[:2000]
    action = form.group(1) if form.group(1).startswith("http") else lab.portal_url.rstrip("/") + form.group(1)
    data = tuple(arg for name, value in fields.items() for arg in ("--data-urlencode", f"{name}={value}"))
    status, _, headers, _ = topo.curl(gateway.sub(i), action, extra=("-c", jar, "-b", jar, *data))
    assert status == 303, headers
