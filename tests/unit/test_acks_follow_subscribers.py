"""A notice acknowledgement follows its subscriber through element diffs, never stays with an address.

The kernel keeps acknowledgements by address (``noticeack`` elements) while they belong to a
subscriber (``Engine.acknowledged``, saved in meta). Found in review: an element diff never
deleted them, so when acknowledged A lost an address (a lease moved, the list changed A's
addresses, A was walled, lifted or paid) and B (notice, never acknowledged) got it, B skipped the
notice page for up to ``portal.notice_ack_for``, and the portal and ``/api/captive`` said
otherwise. Now the commit that changes A's enforcement drops the elements of the addresses A no
longer holds in notice or throttle mode and adds them at the addresses A gains
(``Reconciler._move_acknowledgements``), on both diff paths (``Reconciler.update`` and a
``sync_all`` that is a diff), and ``engine.acknowledged`` forgets A once A leaves notice and
throttle (``Engine.forget_acknowledgements``), as after a replace (``_reacknowledge``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, acknowledge, operator_change, portal_lookup
from enforcer.config import Config, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.transaction import ReplaceTable
from enforcer.engine import ACKNOWLEDGED
from enforcer.match import Match
from enforcer.model import Mode
from enforcer.sessions.session import Session
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0
HOUR = 3600
MAC_1, MAC_2 = "02:00:00:00:10:01", "02:00:00:00:10:02"
#: Listed and unchanged throughout: a list change of one or two entries stays an element diff
#: (``ListIntake._apply``: more than half changed is a full pass).
OTHERS = [Subscriber(f"Z-{n}", (parse_address(f"100.64.9.{n}"),), Mode.NOTICE, "overdue") for n in range(1, 6)]


def config(tmp_path: Path) -> Config:
    return parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                        f"gateway: {{subscriber_prefixes: [100.64.0.0/16]}}\n"
                        f"portal: {{notice_ack_for: 1h}}\n", str(tmp_path / "c.yaml"))


def sub(sid: str, *addresses: str, mode: Mode = Mode.NOTICE) -> Subscriber:
    return Subscriber(sid, tuple(parse_address(a) for a in addresses), mode, "overdue")


def acks(fake: FakeDataplane) -> dict[str, tuple[int, int]]:
    """The acknowledgements in the kernel: address -> (timeout, seconds left)."""
    return dict(fake.state.expiring.get("noticeack4_32", {})) if fake.state else {}


def replaces(fake: FakeDataplane) -> int:
    return sum(isinstance(op, ReplaceTable) for tx in fake.transactions for op in tx.operations)


def saved(e: Any) -> dict[str, float]:
    return e.engine.store.get_meta(ACKNOWLEDGED) or {}


async def started(tmp_path: Path, fake: FakeDataplane, clock: list[float], listed: list[Subscriber]) -> Enforcer:
    e = Enforcer(config(tmp_path), dataplane=fake, conntrack=NoConntrack(),  # type: ignore[arg-type]
                 clock=lambda: clock[0])
    await e.engine.restore()
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    return e


async def acknowledged_a(tmp_path: Path) -> tuple[Enforcer, FakeDataplane, list[float]]:
    """C-1 (notice, 100.64.0.10) has acknowledged the notice; C-2 (notice, 100.64.0.11) has not."""
    fake, clock = FakeDataplane(), [NOW]
    e = await started(tmp_path, fake, clock, [sub("C-1", "100.64.0.10"), sub("C-2", "100.64.0.11"), *OTHERS])
    assert (await acknowledge(e, "100.64.0.10"))[0] == 200
    assert acks(fake) == {"100.64.0.10": (HOUR, HOUR)}
    return e, fake, clock


async def captive(e: Enforcer, address: str) -> tuple[str, Any]:
    status, answer = await portal_lookup(e, address)
    assert status == 200, answer
    return answer["subscriber"], answer["ack_until"]


@pytest.mark.parametrize("diff", ["update", "sync_all"])
async def test_the_list_moving_a_s_address_to_b_takes_the_acknowledgement_with_a(tmp_path: Path, diff: str) -> None:
    """The list gives A's .10 to B and A .20 instead: B is redirected on .10, A's acknowledgement
    goes on at .20 for what is left of it. As an element diff (no replace), whether the list's
    change is applied as a diff of the two (``Engine.apply``) or a pass over everyone that is
    itself a diff (``sync_all``: more than half the list changed)."""
    e, fake, clock = await acknowledged_a(tmp_path)
    try:
        clock[0] += 600
        before = replaces(fake)
        others = OTHERS if diff == "update" else [sub(s.id, "100.64.8.1" if n == 0 else f"100.64.8.{n + 1}")
                                                  for n, s in enumerate(OTHERS)]
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.20"), sub("C-2", "100.64.0.10"), *others],
                                         "l.yaml", "2"))
        assert replaces(fake) == before, "not the diff path"
        assert acks(fake) == {"100.64.0.20": (HOUR - 600, HOUR - 600)}, acks(fake)
        assert await captive(e, "100.64.0.10") == ("C-2", None)
        assert await captive(e, "100.64.0.20") == ("C-1", NOW + HOUR)
        assert e.engine.acknowledged == {"C-1": NOW + HOUR}
    finally:
        await e.close()


async def test_an_address_moving_between_two_acknowledged_subscribers_takes_its_new_holder_s_time(
        tmp_path: Path) -> None:
    """A's .10 goes to B, who acknowledged later: .10 is B's acknowledgement now, with B's time
    left, not A's (dropped, then added, in one commit)."""
    e, fake, clock = await acknowledged_a(tmp_path)
    try:
        clock[0] += 600
        assert (await acknowledge(e, "100.64.0.11"))[0] == 200
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.20"), sub("C-2", "100.64.0.11", "100.64.0.10"),
                                          *OTHERS], "l.yaml", "2"))
        assert acks(fake) == {"100.64.0.20": (HOUR - 600, HOUR - 600), "100.64.0.11": (HOUR, HOUR),
                              "100.64.0.10": (HOUR, HOUR)}, acks(fake)
        assert await captive(e, "100.64.0.10") == ("C-2", NOW + 600 + HOUR)
    finally:
        await e.close()


@pytest.mark.parametrize("change", ["walled", "lifted", "throttle"])
async def test_a_leaving_notice_loses_the_acknowledgement_in_the_kernel_and_the_daemon(
        tmp_path: Path, change: str) -> None:
    """A walled or lifted (an operator's change, as a payment is): the element goes in the same
    commit and ``engine.acknowledged`` (and its meta copy) forgets A. Throttle keeps it (the
    acknowledgement lets throttle's notice through too)."""
    e, fake, _ = await acknowledged_a(tmp_path)
    try:
        if change == "walled":
            status, body = await operator_change(e, "alice", "C-1", True, "walled", Mode.WALLED_GARDEN.value)
        elif change == "lifted":
            status, body = await operator_change(e, "alice", "C-1", False, "paid at the desk")
        else:
            status, body = await operator_change(e, "alice", "C-1", True, "slow", Mode.THROTTLE.value)
        assert status == 200, body
        if change == "throttle":
            assert acks(fake) == {"100.64.0.10": (HOUR, HOUR)}
            assert e.engine.acknowledged == {"C-1": NOW + HOUR} and saved(e) == {"C-1": NOW + HOUR}
            return
        assert acks(fake) == {} and "100.64.0.10" not in fake.view["noticeack4_32"]
        assert e.engine.acknowledged == {} and saved(e) == {}
        # back in notice: the notice again, as after a replace (``_reacknowledge``)
        status, body = await operator_change(e, "alice", "C-1", True, "again", Mode.NOTICE.value)
        assert status == 200 and acks(fake) == {}, body
        assert await captive(e, "100.64.0.10") == ("C-1", None)
    finally:
        await e.close()


async def test_an_expired_acknowledgement_is_dropped_without_failing_the_change(tmp_path: Path) -> None:
    """The kernel let A's element expire (gone from the set) before A's address moves: the drop
    finds nothing, and the change commits all the same (a plain delete would fail it: ENOENT)."""
    e, fake, clock = await acknowledged_a(tmp_path)
    try:
        assert fake.state is not None
        del fake.state.elements["noticeack4_32"]["100.64.0.10"]   # expired in the kernel
        fake.state.expiring["noticeack4_32"].pop("100.64.0.10")
        clock[0] += HOUR + 1
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.20"), sub("C-2", "100.64.0.10"), *OTHERS],
                                         "l.yaml", "2"))
        assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.10") == "C-2"
        assert acks(fake) == {} and e.engine.acknowledged == {}
    finally:
        await e.close()


def lease(address: str, mac: str) -> Session:
    return Session("dnsmasq", address, Match(mac=mac), (ipaddress.ip_network(address),), detail=f"lease {address}")


async def test_a_lease_moving_a_s_address_to_b_takes_the_acknowledgement_with_a(tmp_path: Path) -> None:
    """The lease file gives A's .10 to B (both matched by MAC, notice) and A .20: B is
    redirected on .10, A's acknowledgement is at .20."""
    fake, clock = FakeDataplane(), [NOW]
    e = await started(tmp_path, fake, clock, [
        Subscriber("C-1", (), Mode.NOTICE, "overdue", match=Match(mac=MAC_1)),
        Subscriber("C-2", (), Mode.NOTICE, "overdue", match=Match(mac=MAC_2)), *OTHERS])
    try:
        await e.sessions.replace("dnsmasq", [lease("100.64.0.10", MAC_1), lease("100.64.0.11", MAC_2)])
        assert (await acknowledge(e, "100.64.0.10"))[0] == 200
        await e.sessions.replace("dnsmasq", [lease("100.64.0.20", MAC_1), lease("100.64.0.10", MAC_2)])
        assert e.engine.reconciler.owner_of("mode4_32", "100.64.0.10") == "C-2"
        assert set(acks(fake)) == {"100.64.0.20"}, acks(fake)
        assert await captive(e, "100.64.0.10") == ("C-2", None)
    finally:
        await e.close()
