"""A subscriber one of whose addresses another holds: the holder keeps it, this one gets the
rest of its addresses, and the diffs (``Engine.apply_resolving``), a full sync and a restart all
enforce exactly that (``claims.uncontested``, ``Reconciler._desired_exact``), whatever the ids'
order. Found in review: the diffs trimmed while a full sync left the subscriber out whole (its
other addresses free until the next timer round), a full sync handed a list address to the
lower id instead of its holder, and a trim that let go of an address did not let the subscriber
now leasing it take it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_session_intake import MAC_1, MAC_2, Clock, _daemon, _lease, walled

from enforcer.dataplane.fake import FakeDataplane
from enforcer.match import Match
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address


def owners(e: Any) -> dict[str, str | None]:
    return {k: e.engine.reconciler.owner_of("mode4_32", k) for k in ("100.64.0.10", "100.64.0.30", "100.64.0.31")}


async def _trimmed(tmp_path: Path, holder: str, session: str) -> tuple[Any, FakeDataplane, Clock]:
    """``holder`` is listed on .30 and .31; ``session``'s lease gives it .10 and .30 (the holder's)."""
    fake, clock = FakeDataplane(), Clock()
    e = await _daemon(tmp_path, fake, clock)
    await e.lists.on_list(ListUpdate([
        Subscriber(session, (), reason="overdue", match=Match(mac=MAC_1)),
        Subscriber(holder, (parse_address("100.64.0.30"), parse_address("100.64.0.31")), reason="overdue")],
        "l", "2"))
    await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1), _lease("100.64.0.30", MAC_1)])
    return e, fake, clock


def _as_it_should_be(e: Any, fake: FakeDataplane, holder: str, session: str) -> None:
    assert walled(fake) == {"100.64.0.10", "100.64.0.30", "100.64.0.31"}, sorted(walled(fake))
    assert owners(e) == {"100.64.0.10": session, "100.64.0.30": holder, "100.64.0.31": holder}
    assert set(e.engine.conflicts) == {session}
    assert e.engine.decisions[session].restricted and e.engine.decisions[holder].restricted
    assert "held back (enforced for another subscriber): 100.64.0.30/32" in e.engine.decisions[session].cause


@pytest.mark.parametrize(("holder", "session"), [("A-holder", "Z-sess"), ("Z-holder", "A-sess")])
async def test_a_full_sync_enforces_what_the_diffs_did(tmp_path: Path, holder: str, session: str) -> None:
    e, fake, _ = await _trimmed(tmp_path, holder, session)
    try:
        _as_it_should_be(e, fake, holder, session)
        async with e.engine.lock:
            await e.engine.sync_all()
        _as_it_should_be(e, fake, holder, session)
    finally:
        await e.close()


@pytest.mark.parametrize(("holder", "session"), [("A-holder", "Z-sess"), ("Z-holder", "A-sess")])
async def test_a_restart_and_the_timer_enforce_what_the_diffs_did(tmp_path: Path, holder: str, session: str) -> None:
    e, fake, clock = await _trimmed(tmp_path, holder, session)
    await e.close()
    again = await _daemon(tmp_path, fake, clock)
    try:
        _as_it_should_be(again, fake, holder, session)
        clock.now += 60
        await again.timers.tick()
        _as_it_should_be(again, fake, holder, session)
    finally:
        await again.close()


async def test_an_address_a_trim_lets_go_of_is_taken_by_its_new_lessee_at_once(tmp_path: Path) -> None:
    """C-1 moves onto C-3's listed .30 while its old .20 is leased to C-2 (restricted too), in
    one read of the lease file: C-1 is trimmed (it lets go of .20), then C-2 takes .20."""
    fake, clock = FakeDataplane(), Clock()
    e = await _daemon(tmp_path, fake, clock)
    try:
        await e.lists.on_list(ListUpdate([
            Subscriber("C-1", (), reason="overdue", match=Match(mac=MAC_1)),
            Subscriber("C-2", (), reason="overdue", match=Match(mac=MAC_2)),
            Subscriber("C-3", (parse_address("100.64.0.30"),), reason="overdue")], "l", "2"))
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.20", MAC_1)])
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.30", MAC_1), _lease("100.64.0.20", MAC_2)])
        assert walled(fake) == {"100.64.0.20", "100.64.0.30"}, sorted(walled(fake))
        assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.20") == "C-2"
        assert set(e.engine.conflicts) == {"C-1"}, dict(e.engine.conflicts)
    finally:
        await e.close()


async def test_a_lasting_clash_does_not_split_a_timer_round_into_one_commit_each(tmp_path: Path) -> None:
    """While one session address stays held back, a timer round that ends 80 graces is still one
    kernel transaction (it was one per subscriber: 1,500 ended graces took 1,500 commits)."""
    from enforcer import policy
    fake, clock = FakeDataplane(), Clock()
    e = await _daemon(tmp_path, fake, clock)
    try:
        listed = [Subscriber(f"C-{i:04d}", (parse_address(f"100.64.{1 + i // 200}.{i % 200 + 1}"),), reason="overdue")
                  for i in range(80)]
        await e.lists.on_list(ListUpdate([*listed, Subscriber("S", (), reason="overdue", match=Match(mac=MAC_1))],
                                         "l", "2"))
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1), _lease("100.64.1.1", MAC_1)])
        assert set(e.engine.conflicts) == {"S"} and "100.64.0.10" in walled(fake)
        async with e.engine.lock:
            for entry in listed[1:]:
                policy.record_payment(e.engine.inputs, entry.id, clock.now, 3600, "paid", clock.now)
            e.engine.store.save_subscribers(e.engine.inputs, [entry.id for entry in listed[1:]])
            await e.engine.sync_all()
        assert len(walled(fake)) == 2
        commits = len(fake.transactions)
        clock.now += 3601
        await e.timers.tick()
        assert len(walled(fake)) == 81 and set(e.engine.conflicts) == {"S"}
        assert len(fake.transactions) - commits == 1, len(fake.transactions) - commits
        assert "100.64.1.1/32 is already enforced for subscriber C-0000" in e.engine.conflicts["S"]["detail"]
    finally:
        await e.close()


async def test_a_subscriber_whose_every_address_is_held_is_held_back_alike_by_syncs_and_timers(
        tmp_path: Path) -> None:
    """Z-sess's only lease moves onto A-holder's listed .30: nothing of Z-sess's is in the kernel,
    so it is free there, held back (``claims.held_back``) with its wish in ``conflicts``. The diffs
    called it restricted with no address and a full sync called it free: it flipped between the
    two in the audit log, the gauge and ``explain`` at every full sync and timer round (review)."""
    fake, clock = FakeDataplane(), Clock()
    e = await _daemon(tmp_path, fake, clock)
    try:
        await e.lists.on_list(ListUpdate([
            Subscriber("Z-sess", (), reason="overdue", match=Match(mac=MAC_1)),
            Subscriber("A-holder", (parse_address("100.64.0.30"),), reason="overdue")], "l", "2"))
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.10", MAC_1)])
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.30", MAC_1)])
        audit_rows = e.engine.store.db.execute("SELECT COUNT(*) FROM audit WHERE subscriber = 'Z-sess'").fetchone()[0]
        for _ in range(3):
            for step in ("timer", "full sync"):
                if step == "timer":
                    clock.now += 60
                    await e.timers.tick()
                else:
                    async with e.engine.lock:
                        await e.engine.sync_all()
                decision = e.engine.decisions["Z-sess"]
                assert not decision.restricted and "enforced for another subscriber" in decision.cause, (step, decision)
                assert e.engine.conflicts["Z-sess"]["wanted"] == "walled-garden", step
                assert walled(fake) == {"100.64.0.30"}, step
                assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.30") == "A-holder", step
        assert e.engine.store.db.execute(
            "SELECT COUNT(*) FROM audit WHERE subscriber = 'Z-sess'").fetchone()[0] == audit_rows
        await e.sessions.replace("dnsmasq", [_lease("100.64.0.11", MAC_1)])   # off the holder's address
        assert e.engine.decisions["Z-sess"].restricted and "Z-sess" not in e.engine.conflicts
        assert walled(fake) == {"100.64.0.11", "100.64.0.30"}
    finally:
        await e.close()
