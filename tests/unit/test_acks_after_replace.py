"""After any replace of the table, notice acknowledgements come back by subscriber, never by address.

An acknowledgement belongs to a subscriber (``Engine.acknowledged``, saved in meta): after a
replace ``PortalActions._reacknowledge`` (an ``Engine.on_replaced`` callback) puts back those
still due, for subscribers still in notice or throttle, at their addresses now. A replace does
not carry the old table's ``noticeack`` elements (``Layout.carried_sets``): carried by address,
subscriber A's acknowledgement would go to B, who holds A's old address now and never pressed
"continue", and one the daemon dropped (A walled since) would outlive it in the kernel while
``/api/captive`` calls A captive. And every replace runs the callbacks: a start's, a reload's,
and the repair loop's (``Timers.tick`` after a table check found damage), which used not to, so
a repair lost every acknowledgement.
"""

from __future__ import annotations

from pathlib import Path

from daemon_helpers import NoConntrack, acknowledge, operator_change, portal_lookup
from enforcer.config import Config, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.transaction import ReplaceTable
from enforcer.model import Mode
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0


def config(tmp_path: Path, rate: str = "") -> Config:
    policy = f"policy: {{throttle_rate: '{rate}'}}\n" if rate else ""
    return parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        f"portal: {{notice_ack_for: 1h}}\n{policy}", str(tmp_path / "c.yaml"))


def sub(sid: str, address: str, mode: Mode = Mode.NOTICE) -> Subscriber:
    return Subscriber(sid, (parse_address(address),), mode, "overdue")


def replaces(fake: FakeDataplane) -> int:
    return sum(isinstance(op, ReplaceTable) for tx in fake.transactions for op in tx.operations)


async def started(tmp_path: Path) -> tuple[Enforcer, FakeDataplane]:
    """C-1 (notice, 100.64.0.10) has acknowledged the notice."""
    fake = FakeDataplane()
    e = Enforcer(config(tmp_path), dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10")], "l.yaml", "1"))
    assert (await acknowledge(e, "100.64.0.10"))[0] == 200
    assert "100.64.0.10" in fake.view["noticeack4_32"]
    return e, fake


async def test_after_a_replace_the_address_s_new_holder_does_not_get_the_old_holder_s_acknowledgement(
        tmp_path: Path) -> None:
    """A's address moves to B (notice, never acknowledged) and A to another address; then a
    reload with another layout replaces the table: B is redirected again, A's acknowledgement
    goes on at A's new address."""
    e, fake = await started(tmp_path)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.20"), sub("C-2", "100.64.0.10")], "l.yaml", "2"))
    before = replaces(fake)
    await e.engine.reload(config(tmp_path, "2 mbit/s"))   # the throttle rate is in the layout
    assert replaces(fake) == before + 1
    assert set(fake.view["noticeack4_32"]) == {"100.64.0.20"}, fake.view["noticeack4_32"]
    status, answer = await portal_lookup(e, "100.64.0.10")
    assert status == 200 and answer["subscriber"] == "C-2" and answer["ack_until"] is None, answer
    await e.close()


async def test_an_acknowledgement_the_daemon_dropped_does_not_outlive_a_replace(tmp_path: Path) -> None:
    """A is walled after acknowledging: the daemon forgets the acknowledgement at the next
    replace (``_reacknowledge``), and so does the kernel."""
    e, fake = await started(tmp_path)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", Mode.WALLED_GARDEN)], "l.yaml", "2"))
    await e.engine.reload(config(tmp_path, "2 mbit/s"))
    assert fake.view["noticeack4_32"] == {} and "C-1" not in e.engine.acknowledged
    await e.close()


async def test_a_repair_puts_back_the_acknowledgement_of_a_subscriber_still_in_notice(tmp_path: Path) -> None:
    """A set flushed behind our back: the table check asks for a repair, the timer's next round
    replaces the table, and the acknowledgement is back (it used to lapse at every repair)."""
    e, fake = await started(tmp_path)
    fake.flush_set("notice4_32")
    assert not await e.health.verify() and e.engine.reconciler.needs_full
    before = replaces(fake)
    await e.timers.tick()
    assert replaces(fake) == before + 1 and not e.engine.reconciler.needs_full
    assert set(fake.view["noticeack4_32"]) == {"100.64.0.10"}, fake.view["noticeack4_32"]
    assert e.engine.table_repairs == 1   # counted once, by the check (the repair's callbacks add none)
    await e.close()


async def test_a_repair_made_by_an_operator_action_puts_back_the_acknowledgement(tmp_path: Path) -> None:
    """The table check found damage (a full sync needed); the next change to come is an operator's,
    whose ``Engine.apply`` makes the replace: the acknowledgement comes back there too (review:
    only the timer's repair, a start and a reload put acknowledgements back)."""
    e, fake = await started(tmp_path)
    try:
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10"), sub("C-2", "100.64.0.11")], "l.yaml", "2"))
        fake.flush_set("notice4_32")
        assert not await e.health.verify()
        await operator_change(e, "alice", "C-2", False, "checking")   # Engine.apply -> NeedsFullSync -> sync_all
        assert set(fake.view["noticeack4_32"]) == {"100.64.0.10"}
    finally:
        await e.close()
