"""What lasts from a fleet input that takes no receipt instant runs from its ``at`` too: a notice
acknowledgement and a list verdict applied by a gateway catching up hours later are as old there
as everywhere else (``receipt_clock``'s module docstring; docs/reference.md, Fleet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.list_intake import VERDICT_DAYS
from enforcer.model import Mode
from enforcer.outcome import Outcome
from enforcer.portal_actions import ACKNOWLEDGED, promise_message_id
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address
from tests.daemon_helpers import NoConntrack

NOW = 1_795_000_000.0
ACK_FOR = 3600.0


async def gateway(tmp_path: Path, clock: list[float]) -> Enforcer:
    conf = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        f"portal: {{notice_ack_for: {ACK_FOR:.0f}s}}\n", str(tmp_path / "c.yaml"))
    e = Enforcer(conf, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda: clock[0])
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-4", (parse_address("100.64.0.40"),), Mode.NOTICE, "overdue")],
                                     "l.yaml", "1"))
    return e


def counting(e: Enforcer) -> list[int]:
    """The seconds of each acknowledgement put in the kernel."""
    given: list[int] = []
    reconciler = e.engine.reconciler
    kernel_ack = reconciler.acknowledge

    def counted(decision: Any, seconds: int) -> None:
        given.append(seconds)
        kernel_ack(decision, seconds)

    reconciler.acknowledge = counted   # type: ignore[method-assign]
    return given


async def test_an_acknowledgement_runs_from_when_the_fleet_received_it(tmp_path: Path) -> None:
    clock = [NOW]
    e = await gateway(tmp_path, clock)
    kernel = counting(e)
    try:
        # Received elsewhere 20 minutes ago, applied here now: what is left of it, to the instant.
        result = await e.portal.apply_acknowledge("C-4", "100.64.0.40", "gw-a", NOW - 1200)
        assert isinstance(result, Outcome) and result.body["until"] == NOW - 1200 + ACK_FOR, result
        assert kernel == [ACK_FOR - 1200] and e.engine.acknowledged["C-4"] == NOW - 1200 + ACK_FOR
        # An ``at`` ahead of this clock counts as now (as for receipt instants).
        await e.portal.apply_acknowledge("C-4", "100.64.0.40", "gw-a", NOW + 600)
        assert kernel[-1] == ACK_FOR and e.engine.acknowledged["C-4"] == NOW + ACK_FOR
        # Over by the time it is applied (a gateway catching up): nothing is let through, nothing kept.
        del e.engine.acknowledged["C-4"]
        result = await e.portal.apply_acknowledge("C-4", "100.64.0.40", "gw-a", NOW - ACK_FOR - 1)
        assert isinstance(result, Outcome) and result.body["until"] == NOW - 1, result
        assert len(kernel) == 2 and "C-4" not in e.engine.acknowledged
        # A lone gateway's own: the full term from now.
        await e.portal.apply_acknowledge("C-4", "100.64.0.40")
        assert kernel[-1] == ACK_FOR and e.engine.store.get_meta(ACKNOWLEDGED)["C-4"] == NOW + ACK_FOR
    finally:
        await e.close()


async def test_a_verdict_is_kept_from_when_the_fleet_received_it(tmp_path: Path) -> None:
    clock = [NOW]
    e = await gateway(tmp_path, clock)
    day = VERDICT_DAYS * 86400.0
    try:
        old, recent, ahead = "a" * 64, "b" * 64, "c" * 64
        for digest, at in ((old, NOW - day - 60), (recent, NOW - day + 60), (ahead, NOW + 600)):
            answer = await e.lists.apply_approve("root", "checked", digest, "gw-a", at)
            assert isinstance(answer, Outcome) and answer.body["approved"] is True, answer
        assert e.lists.verdicts[ahead][2] == NOW                     # ahead of this clock: now
        assert e.lists._take_verdict(old) is None                     # given more than a day ago
        assert e.lists._take_verdict(recent) is not None
        await e.lists.apply_reject("root", "no", old, "gw-a", NOW - 30)
        assert e.lists.verdicts[old][2] == NOW - 30
    finally:
        await e.close()


async def test_a_replayed_promise_is_judged_when_the_fleet_received_it(tmp_path: Path) -> None:
    """A second "I promise to pay" pressed while the first was running was refused by every live
    gateway; one catching up after the first's term ends must refuse it too, not make it alone."""
    clock = [NOW]
    conf = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        "policy: {promise_to_pay: {enabled: true, term: 1d}}\n", str(tmp_path / "c.yaml"))
    e = Enforcer(conf, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda: clock[0])
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.10"),), Mode.WALLED_GARDEN,
                                                 "overdue")], "l.yaml", "1"))
    try:
        clock[0] = NOW + 2 * 86400     # catching up two days later: the first promise's term is over
        first = await e.portal.apply_promise("C-1", "100.64.0.10", NOW, "gw-a", notify=False)
        assert isinstance(first, Outcome), first
        second = await e.portal.apply_promise("C-1", "100.64.0.10", NOW + 600, "gw-a", notify=False)
        assert not isinstance(second, Outcome) and "promise_active" in str(second), second
        assert len(e.engine.inputs.promises["C-1"]) == 1
    finally:
        await e.close()


async def test_a_promise_tells_billing_under_the_id_its_fleet_message_gives_whatever_the_local_stamp(
        tmp_path: Path) -> None:
    """The ``promise.made`` webhook-id comes from the stream message's ``at``, not this gateway's
    receipt stamp: a stamp is pushed past ``at`` by an earlier message stamped later (another
    gateway's clock a little ahead), differently live and in a replay after a wipe, and billing
    got the same promise twice under two ids (review)."""
    ids = []
    for clock_now, later_input in ((NOW + 0.1, NOW + 0.5), (NOW + 600, NOW + 0.5), (NOW + 0.1, None)):
        work = tmp_path / f"g{len(ids)}"
        work.mkdir()
        (work / "outbox.secret").write_text("whsec_" + "b3V0Ym94LXNlY3JldC1mb3ItdGVzdHMtMTIzNDU2")
        clock = [clock_now]
        conf = parse_config(
            f"state_dir: {work}/state\nsubscribers: {{source: {work}/l.yaml}}\n"
            "policy: {promise_to_pay: {enabled: true, term: 1d, webhook_url: 'http://127.0.0.1:9/hook', "
            f"webhook_secret_file: '{work}/outbox.secret'}}}}\n", str(work / "c.yaml"))
        e = Enforcer(conf, dataplane=FakeDataplane(), conntrack=NoConntrack(), clock=lambda c=clock: c[0])
        await e.engine.restore()
        await e.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.10"),), Mode.WALLED_GARDEN,
                                                     "overdue")], "l.yaml", "1"))
        try:
            if later_input is not None:   # a message the stream orders first, stamped after the promise
                e.engine.receipts.stamp(later_input)
            result = await e.portal.apply_promise("C-1", "100.64.0.10", NOW, "gw-a", notify=True)
            assert isinstance(result, Outcome), result
            sent = [message for message, _, body, _ in e.engine.store.outbox_due(clock[0] + 1)
                    if body["type"] == "promise.made"]
            assert len(sent) == 1, sent
            ids.append(sent[0])
        finally:
            await e.close()
    assert ids == [promise_message_id("C-1", NOW)] * 3, ids
