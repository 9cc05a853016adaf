"""No input walls a neighbour: overlapping addresses are refused wherever they come from
(docs/reference.md, Safety rules)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon_helpers import NoConntrack, handle_event, operator_change, submit_event
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import RESTRICTED, Event
from enforcer.policy import weight
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

NOW = 1_795_000_000.0


def sub(sid: str, *addresses: str, mode: Mode = Mode.WALLED_GARDEN) -> Subscriber:
    return Subscriber(sid, tuple(parse_address(a) for a in addresses), mode, "overdue")


@contextlib.asynccontextmanager
async def enforcer(tmp: Path, guard: str = "") -> AsyncIterator[tuple[Enforcer, FakeDataplane]]:
    fake = FakeDataplane()
    config = parse_config(f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.yaml{guard}}}\n",
                          str(tmp / "c.yaml"))
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", "2001:db8:10:100::/56")], "l.yaml", "1"))
    try:
        yield e, fake
    finally:
        await e.close()


async def test_a_broad_ipv4_prefix_event_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, fake):
        before = {name: dict(items) for name, items in fake.view.items()}
        status, answer = await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "100.64.0.0/16")), 0.0)
        assert status == 409
        assert "100.64.0.0/16 covers 100.64.0.10/32, held by subscriber C-1" in answer["error"]
        assert {name: dict(items) for name, items in fake.view.items()} == before


async def test_a_broad_ipv6_prefix_event_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        status, answer = await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "2001:db8:10::/48")), 0.0)
        assert status == 409 and "C-1" in answer["error"]


async def test_an_address_inside_anothers_prefix_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        status, answer = await handle_event(e,
            Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "2001:db8:10:100::5")), 0.0)
        assert status == 409 and "lies within 2001:db8:10:100::/56" in answer["error"]


async def test_an_operator_cannot_wall_a_neighbour_either(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, fake):
        status, _answer = await operator_change(e, "alice", "C-9", True, "test", addresses=["100.64.0.0/24"])
        assert status == 409
        assert "100.64.0.10" in fake.view["mode4_32"] and fake.view["mode4_32"]["100.64.0.10"] == "goto garden"


async def test_in_one_batch_the_second_claim_of_an_address_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        first = submit_event(e, Event("a", RESTRICTED, NOW, "C-7", sub("C-7", "100.64.1.0/24")), 0.0)
        second = submit_event(e, Event("b", RESTRICTED, NOW, "C-8", sub("C-8", "100.64.1.9")), 0.0)
        assert (await first)[0] == 200
        assert (await second)[0] == 409


def test_the_guard_weighs_prefixes_by_the_space_they_cover() -> None:
    assert weight(sub("a", "100.64.0.10")) == 1
    assert weight(sub("a", "100.64.0.0/16")) == 65536
    assert weight(sub("a", "100.64.0.10", "2001:db8:10:100::/56")) == 1
    assert weight(sub("a", "2001:db8::/48")) == 256


async def test_one_broad_list_entry_is_held_by_the_guard(tmp_path: Path) -> None:
    async with enforcer(tmp_path, ", guard: {max_restrict: 100}") as (e, fake):
        await e.lists.on_list(ListUpdate(
            [sub("C-1", "100.64.0.10", "2001:db8:10:100::/56"), sub("C-2", "100.65.0.0/16")], "l.yaml", "2"))
        assert e.lists.held is not None and "65536" in e.lists.held.why
        assert "100.65.0.0" not in fake.view.get("mode4_16", {})


async def test_addresses_outside_the_subscriber_prefixes_are_refused(tmp_path: Path) -> None:
    fake = FakeDataplane()
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "gateway: {subscriber_prefixes: ['100.64.0.0/10', '2001:db8::/32']}\n",
                          str(tmp_path / "c.yaml"))
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    try:
        status, answer = await handle_event(e, Event("r1", RESTRICTED, NOW, "C-1", sub("C-1", "198.51.100.7")), 0.0)
        assert status == 400 and "outside gateway.subscriber_prefixes" in answer["error"]
        status, answer = await operator_change(e, "alice", "C-1", True, "test", addresses=["2001:db9::1"])
        assert status == 400 and "2001:db9::1" in answer["error"]
        assert not fake.view.get("mode4_32") and not fake.view.get("mode6_128")
        assert (await handle_event(e, Event("r2", RESTRICTED, NOW, "C-1", sub("C-1", "100.64.0.7")), 0.0))[0] == 200
    finally:
        await e.close()


async def _two_restricted(e: Enforcer) -> None:
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", "2001:db8:10:100::/56"), sub("C-2", "100.64.0.20"),
                                      sub("C-3", "100.64.0.30")], "l.yaml", "2"))


def _walled(fake: FakeDataplane) -> dict[str, str | None]:
    return {k: v for k, v in fake.view.get("mode4_32", {}).items()}


@pytest.mark.parametrize("order", [("C-2", "C-3"), ("C-3", "C-2")])
async def test_one_batch_moving_an_address_between_restricted_subscribers_keeps_it_walled(
        tmp_path: Path, order: tuple[str, str]) -> None:
    """An address leaving C-2 for C-3 in one batch (a session moved, as the timers and session
    intake apply them) is claimed after C-2 let it go, in either order of the batch: it is never
    left free while C-3 waits in ``conflicts``, and a swap works as well."""
    from enforcer.policy import Decision
    async with enforcer(tmp_path) as (e, fake):
        await _two_restricted(e)
        wanted = {"C-2": Decision("C-2", Mode.WALLED_GARDEN, "moved", sub("C-2", "100.64.0.21")),
                  "C-3": Decision("C-3", Mode.NOTICE, "moved", sub("C-3", "100.64.0.20", "100.64.0.30",
                                                                     mode=Mode.NOTICE))}
        async with e.engine.lock:
            await e.engine.apply_resolving({sid: wanted[sid] for sid in order}, "test")
        assert not e.engine.conflicts
        walled = _walled(fake)
        assert walled.get("100.64.0.20") == "goto notice" and walled.get("100.64.0.21") == "goto garden", walled
        swap = {"C-2": Decision("C-2", Mode.WALLED_GARDEN, "swap", sub("C-2", "100.64.0.30")),
                "C-3": Decision("C-3", Mode.NOTICE, "swap", sub("C-3", "100.64.0.21", mode=Mode.NOTICE))}
        async with e.engine.lock:
            await e.engine.apply_resolving({sid: swap[sid] for sid in order}, "test")
        assert not e.engine.conflicts
        walled = _walled(fake)
        assert walled.get("100.64.0.30") == "goto garden" and walled.get("100.64.0.21") == "goto notice", walled
        assert "100.64.0.20" not in walled


async def test_a_batch_whose_kernel_commit_fails_gives_every_claim_back(tmp_path: Path) -> None:
    from enforcer.dataplane.backend import DataplaneError
    from enforcer.policy import Decision
    async with enforcer(tmp_path) as (e, fake):
        await _two_restricted(e)
        held = dict(e.engine.claims.held)
        fake.fail_next = "injected"
        wanted = {"C-2": Decision("C-2", Mode.WALLED_GARDEN, "moved", sub("C-2", "100.64.0.21")),
                  "C-3": Decision("C-3", Mode.WALLED_GARDEN, "moved", sub("C-3", "100.64.0.20"))}
        async with e.engine.lock:
            with pytest.raises(DataplaneError):
                await e.engine.apply(wanted, "test")
        assert e.engine.claims.held == held


@pytest.mark.parametrize("prefix", ["100.64.3.0/30", "100.64.0.0/16"])
async def test_a_list_prefix_around_an_address_an_event_holds_is_held_back_and_reported(
        tmp_path: Path, prefix: str) -> None:
    """Billing restricts C-5 on 100.64.3.3 (200); a new list then names C-6 on a prefix around it.
    The prefix length is new, so the list goes through a full sync, which used to see equal keys
    only: both were enforced, C-6's prefix walling C-5's address too. Now C-6 is held back and
    reported, as an equal key is (found by a SPEC audit)."""
    async with enforcer(tmp_path, guard=", guard: {max_restrict: 1000000, max_lift: 1000000}") as (e, fake):
        assert (await handle_event(e, Event("r5", RESTRICTED, NOW, "C-5", sub("C-5", "100.64.3.3", mode=Mode.THROTTLE)),
                                   0.0))[0] == 200
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", "2001:db8:10:100::/56"), sub("C-6", prefix)],
                                         "l.yaml", "2"))
        plen = prefix.split("/")[1]
        assert fake.view.get(f"mode4_{plen}", {}) == {}, fake.view.get(f"mode4_{plen}")
        assert fake.view["mode4_32"].get("100.64.3.3") == "goto throttle"
        conflicts = e.queries.status()["address_conflicts"]
        holder = "C-5" if prefix.endswith("/30") else "C-1"      # the /16 covers C-1's address as well
        assert "C-6" in conflicts and holder in conflicts["C-6"]["detail"], conflicts
        assert e.engine.decisions["C-6"].mode == Mode.FREE


@pytest.mark.parametrize("held", ["100.64.0.1", "100.64.0.0/30"])
async def test_a_restart_keeps_a_contested_address_with_its_holder(tmp_path: Path, held: str) -> None:
    """Billing restricts C-9 on ``held`` (200); a list then names C-2 on 100.64.0.1 (equal, or
    inside the /30): C-2 is held back. A restart used to give the address to the lower id (the
    reconciler's holders were empty at a start), lifting what billing was told and walling C-2
    instead; the saved decisions now say who held it (found in review)."""
    from daemon_helpers import SteppedClocks, clocked_enforcer, grace_config
    clocks, fake = SteppedClocks(NOW), FakeDataplane()
    other = sub("C-1", "100.64.0.100", mode=Mode.NOTICE)
    key = ("mode4_" + held.split("/")[1] if "/" in held else "mode4_32", held.split("/")[0])

    def kernel() -> str | None:
        return fake.view.get(key[0], {}).get(key[1])
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, fake, [other]) as e:
        assert (await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", held)), 0.0))[0] == 200
        await e.lists.on_list(ListUpdate([other, sub("C-2", "100.64.0.1", mode=Mode.NOTICE)], "l.yaml", "2"))
        assert kernel() == "goto garden" and "C-2" in e.engine.conflicts
    async with clocked_enforcer(grace_config(tmp_path, 3600), clocks, fake, []) as e:
        await e.timers.tick()
        assert kernel() == "goto garden", "a restart lifted the restriction billing was answered 200 for"
        assert e.engine.decisions["C-9"].mode == Mode.WALLED_GARDEN and "C-2" in e.engine.conflicts


async def test_a_move_in_a_batch_with_an_unrelated_clash_still_moves(tmp_path: Path) -> None:
    """A batch with a genuine clash (C-4 wants C-1's address) falls back to one subscriber at a
    time; the move inside it (C-3 takes C-2's address) must still go through, in whatever order
    the batch names them: releases first, and refused claims tried again while others let go.
    Only C-4 waits in ``conflicts``, its contested address held back and the rest of its change
    applied (``Engine._without_contested``). (A swap needs both at once: beside a clash it waits in
    ``conflicts`` too, its addresses still held by their old holders.)"""
    from enforcer.policy import Decision
    async with enforcer(tmp_path) as (e, fake):
        await _two_restricted(e)
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", "2001:db8:10:100::/56"), sub("C-2", "100.64.0.20"),
                                          sub("C-3", "100.64.0.30"), sub("C-4", "100.64.0.40")], "l.yaml", "3"))
        batch = {"C-3": Decision("C-3", Mode.NOTICE, "moved", sub("C-3", "100.64.0.20", "100.64.0.30",
                                                                   mode=Mode.NOTICE)),
                 "C-4": Decision("C-4", Mode.WALLED_GARDEN, "clash", sub("C-4", "100.64.0.10")),
                 "C-2": Decision("C-2", Mode.WALLED_GARDEN, "moved", sub("C-2", "100.64.0.21"))}
        async with e.engine.lock:
            await e.engine.apply_resolving(batch, "test")
        assert set(e.engine.conflicts) == {"C-4"}, e.engine.conflicts
        walled = _walled(fake)
        assert walled.get("100.64.0.20") == "goto notice" and walled.get("100.64.0.21") == "goto garden", walled
        # C-4's contested .10 stays C-1's (walled all the same); the rest of C-4's change applies:
        # it no longer holds .40, which is let go (it may be someone else's now)
        assert walled.get("100.64.0.10") == "goto garden" and "100.64.0.40" not in walled, walled
        assert e.engine.reconciler.owned["C-1"].subscriber.keys[0][2] == "100.64.0.10"


@pytest.mark.parametrize("address", ["100.64.0.10", "2001:db8:10:100::1", "2001:db8:10::/48"])
async def test_an_address_listed_for_a_subscriber_who_paid_is_still_theirs(tmp_path: Path, address: str) -> None:
    """C-1 is listed but free on a payment grace: an event or operator command restricting
    someone else on C-1's listed address (or inside or around it) would wall the customer who
    paid; it is a 409 naming C-1, as for an enforced holder (SPEC 8; operator audit)."""
    from enforcer.events import PAYMENT
    async with enforcer(tmp_path) as (e, fake):
        status, _ = await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0)
        assert status == 200 and "100.64.0.10" not in fake.view["mode4_32"]
        status, answer = await handle_event(e, Event("r2", RESTRICTED, NOW, "C-2", sub("C-2", address)), 0.0)
        assert status == 409 and "listed for subscriber C-1" in answer["error"], answer
        status, answer = await operator_change(e, "noc", "C-3", True, "test", addresses=[address])
        assert status == 409 and "C-1" in answer["error"], answer
        assert "100.64.0.10" not in fake.view["mode4_32"] and not fake.view.get("mode6_56")
        # C-1 itself may be restricted again, and then the address is an enforced holder's as before
        status, _ = await handle_event(e, Event("r1", RESTRICTED, NOW + 1, "C-1", sub("C-1", "100.64.0.10")), 0.0)
        assert status == 200 and "100.64.0.10" in fake.view["mode4_32"]
        status, answer = await handle_event(e, Event("r4", RESTRICTED, NOW, "C-4", sub("C-4", "100.64.0.10")), 0.0)
        assert status == 409 and "held by subscriber C-1" in answer["error"], answer


async def test_a_subscriber_no_longer_listed_frees_its_address_for_others(tmp_path: Path) -> None:
    from enforcer.events import PAYMENT
    async with enforcer(tmp_path) as (e, fake):
        assert (await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0))[0] == 200
        await e.lists.on_list(ListUpdate([], "l.yaml", "2"))   # billing reassigned the address
        status, answer = await handle_event(e, Event("r2", RESTRICTED, NOW, "C-2", sub("C-2", "100.64.0.10")), 0.0)
        assert status == 200, answer
        assert "100.64.0.10" in fake.view["mode4_32"]


async def test_a_subscriber_who_paid_while_held_back_by_a_clash_keeps_the_listed_address(tmp_path: Path) -> None:
    """C-2 holds .10 by an event, the list gives .10 to C-1 (held back), C-1 pays, C-2 pays
    and lets .10 go: a new restriction of C-2 there walls C-1, who is listed on it and paid
    (review: ``free_listed`` skipped whoever was in a clash, and nothing put them back)."""
    from enforcer.events import PAYMENT
    async with enforcer(tmp_path) as (e, fake):
        await e.lists.on_list(ListUpdate([sub("C-9", "100.64.0.99")], "l.yaml", "2"))
        assert (await handle_event(e, Event("r2", RESTRICTED, NOW, "C-2", sub("C-2", "100.64.0.10")), 0.0))[0] == 200
        await e.lists.on_list(ListUpdate([sub("C-9", "100.64.0.99"), sub("C-1", "100.64.0.10")], "l.yaml", "3"))
        assert "C-1" in e.engine.conflicts
        assert (await handle_event(e, Event("p1", PAYMENT, NOW + 1, "C-1"), 0.0))[0] == 200
        await e.timers.tick()
        assert (await handle_event(e, Event("p2", PAYMENT, NOW + 2, "C-2"), 0.0))[0] == 200
        status, answer = await handle_event(e, Event("r2b", RESTRICTED, NOW + 3, "C-2", sub("C-2", "100.64.0.10")),
                                            0.0)
        assert status == 409 and "listed for subscriber C-1" in answer["error"], answer
        assert "100.64.0.10" not in fake.view["mode4_32"]


async def test_in_one_batch_a_payment_then_a_claim_of_the_payers_listed_address_is_refused(tmp_path: Path) -> None:
    """The same two events one after the other give a 409; in one batch the payment's effect
    on ``free_listed`` must be seen by the next event at once, as claims are."""
    from enforcer.events import PAYMENT
    async with enforcer(tmp_path) as (e, fake):
        first = submit_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0)
        second = submit_event(e, Event("r2", RESTRICTED, NOW, "C-2", sub("C-2", "100.64.0.10")), 0.0)
        assert (await first)[0] == 200
        status, answer = await second
        assert status == 409 and "listed for subscriber C-1" in answer["error"], answer
        assert "100.64.0.10" not in fake.view["mode4_32"]


async def test_billings_own_move_of_a_listed_subscriber_frees_the_old_address(tmp_path: Path) -> None:
    """After ``subscriber.addresses_changed`` moves C-1 (paid, listed on .10) to .11, .10 is no
    longer C-1's: a restriction of C-2 there is applied, one on .11 is refused."""
    from enforcer.events import PAYMENT, READDRESSED
    async with enforcer(tmp_path) as (e, _):
        assert (await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0))[0] == 200
        status, _ = await handle_event(e, Event("m1", READDRESSED, NOW + 1, "C-1", sub("C-1", "100.64.0.11")), 0.0)
        assert status == 200
        status, answer = await handle_event(e, Event("r2", RESTRICTED, NOW + 2, "C-2", sub("C-2", "100.64.0.10")), 0.0)
        assert status == 200, answer
        status, answer = await handle_event(e, Event("r3", RESTRICTED, NOW + 2, "C-3", sub("C-3", "100.64.0.11")), 0.0)
        assert status == 409 and "C-1" in answer["error"], answer
