"""A payment answered 200 keeps the subscriber free for the grace, whatever the clocks say.

docs/reference.md, Safety rules: billing's clock may be ahead or behind (within the signature tolerance), the gateway's
clock may be stepped either way, and retries arrive in any order. Inputs are ordered by receipt
(``receipt_clock``), billing's events among themselves by billing's clock (``billing_order``).
Each scenario checks that the payment is not beaten by a restriction it made stale, and that a
full sync after a step back does not re-restrict a subscriber who has just paid.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import SteppedClocks, clocked_enforcer, grace_config, handle_event, submit_event
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, RELEASED, RESTRICTED, Event
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

NOW = 1_795_000_000.0   # 2026-11-18
GRACE = 3600.0


class Clocks(SteppedClocks):
    def __init__(self) -> None:
        super().__init__(NOW)


def config(tmp: Path) -> Any:
    return grace_config(tmp, GRACE)


SUB = Subscriber("C-1", (parse_address("100.64.0.10"),), Mode.WALLED_GARDEN, "overdue")


@contextlib.asynccontextmanager
async def enforcer(tmp: Path, clocks: Clocks, fake: FakeDataplane | None = None,
                   listed: bool = True) -> AsyncIterator[tuple[Enforcer, FakeDataplane]]:
    fake = fake or FakeDataplane()
    async with clocked_enforcer(config(tmp), clocks, fake, [SUB] if listed else []) as e:
        yield e, fake


def walled(fake: FakeDataplane) -> bool:
    return "100.64.0.10" in fake.view["mode4_32"]


async def send(e: Enforcer, kind: str, ts: float, eid: str) -> tuple[int, dict[str, Any]]:
    subscriber = SUB if kind == RESTRICTED else None
    return await handle_event(e, Event(eid, kind, ts, "C-1", subscriber), 0.0)


async def test_billing_clock_ahead_restriction_then_payment(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        assert (await send(e, RESTRICTED, NOW + 60, "r1"))[0] == 200
        assert walled(fake)
        status, answer = await send(e, PAYMENT, NOW + 61, "p1")
        assert (status, answer["result"], answer["mode"]) == (200, "applied", "free")
        assert not walled(fake)


async def test_billing_clock_ahead_both_in_one_batch(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        restricted = submit_event(e, Event("r1", RESTRICTED, NOW + 60, "C-1", SUB), 0.0)
        paid = submit_event(e, Event("p1", PAYMENT, NOW + 61, "C-1"), 0.0)
        assert (await restricted)[0] == 200
        status, answer = await paid
        assert (status, answer["mode"]) == (200, "free")
        assert not walled(fake)


async def test_gateway_clock_stepped_back_then_payment(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        await send(e, RESTRICTED, NOW, "r1")
        clocks.step(-600)
        status, answer = await send(e, PAYMENT, NOW + 5, "p1")
        assert (status, answer["mode"]) == (200, "free")
        assert not walled(fake)


async def test_step_back_then_full_sync_keeps_the_payer_free(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks) as (e, fake):
        assert walled(fake)
        assert (await send(e, PAYMENT, NOW, "p1"))[1]["mode"] == "free"
        clocks.step(-600)
        async with e.engine.lock:
            await e.engine.sync_all(read_kernel=True)
        assert not walled(fake)


async def test_forward_step_does_not_end_the_grace_early(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks) as (e, fake):
        await send(e, PAYMENT, NOW, "p1")
        clocks.pass_(60)
        clocks.step(86400)          # NTP fixes a clock that was a day behind
        await e.timers.tick()
        assert not walled(fake)
        clocks.pass_(GRACE - 120)   # still inside the grace as really lived
        await e.timers.tick()
        assert not walled(fake)
        clocks.pass_(120)           # now it has really ended
        await e.timers.tick()
        assert walled(fake)


@pytest.mark.parametrize("restriction_ts", [NOW - 30, NOW])
async def test_late_retry_of_an_older_restriction_is_stale(tmp_path: Path, restriction_ts: float) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        await send(e, PAYMENT, NOW, "p1")
        status, answer = await send(e, RESTRICTED, restriction_ts, "r-late")
        assert (status, answer["result"]) == (200, "ignored")
        assert not walled(fake)


async def test_a_payment_booked_late_still_lifts(tmp_path: Path) -> None:
    """Billing stamped the payment before the restriction it sent first: the payment still lifts."""
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        await send(e, RESTRICTED, NOW, "r1")
        status, answer = await send(e, PAYMENT, NOW - 3600, "p-booked-late")
        assert (status, answer["result"], answer["mode"]) == (200, "applied", "free")
        assert not walled(fake)


async def test_a_newer_restriction_after_the_payment_applies(tmp_path: Path) -> None:
    clocks = Clocks()
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        await send(e, PAYMENT, NOW, "p1")
        assert (await send(e, RESTRICTED, NOW + 10, "r-new"))[1]["result"] == "applied"
        assert walled(fake)
        assert (await send(e, RELEASED, NOW + 5, "rel-old"))[1]["result"] == "ignored"
        assert walled(fake)


async def test_order_survives_a_restart_after_a_step_back(tmp_path: Path) -> None:
    clocks = Clocks()
    fake = FakeDataplane()
    async with enforcer(tmp_path, clocks, fake=fake) as (e, _):
        await send(e, PAYMENT, NOW, "p1")
    clocks.step(-3600)
    async with enforcer(tmp_path, clocks, fake=fake, listed=False) as (e, _):
        assert e.engine.receipts.stamp() > NOW
        # a late retry of an older restriction, after the restart: still stale
        assert (await send(e, RESTRICTED, NOW - 1, "r-late"))[1]["result"] == "ignored"
        assert not walled(fake)


async def test_an_address_conflict_in_the_timer_does_not_stop_the_timers(tmp_path: Path) -> None:
    """C-1 pays, billing restricts C-2 on an address no list names, then a list gives it to
    C-1, C-1's grace ends: C-1 cannot be walled on an address C-2 holds. That is reported and
    retried; the timer task lives on and still ends C-3's grace. (While C-1 was listed on it,
    a restriction of C-2 there would have been a 409: the address is listed for C-1.)"""
    import asyncio

    clocks = Clocks()
    c3 = Subscriber("C-3", (parse_address("100.64.0.30"),), Mode.WALLED_GARDEN, "overdue")
    async with enforcer(tmp_path, clocks, listed=False) as (e, fake):
        await e.lists.on_list(ListUpdate([c3], "l.yaml", "2"))
        await send(e, PAYMENT, NOW, "p1")
        await handle_event(e, Event("p3", PAYMENT, NOW, "C-3"), 0.0)
        c2 = Subscriber("C-2", (parse_address("100.64.0.10"),), Mode.NOTICE, "overdue")
        assert (await handle_event(e, Event("r2", RESTRICTED, NOW + 1, "C-2", c2), 0.0))[0] == 200
        await e.lists.on_list(ListUpdate([SUB, c3], "l.yaml", "3"))
        assert (await handle_event(e, Event("r2b", RESTRICTED, NOW + 2, "C-2", c2), 0.0))[0] == 200, \
            "C-2 holds it: a holder keeps what it holds"
        stop = asyncio.Event()
        timers = asyncio.create_task(e.timers.run(stop))
        await asyncio.sleep(0.05)   # the timer is waiting for its next instant
        clocks.pass_(GRACE + 1)
        e.engine.changed.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "100.64.0.30" in fake.view["mode4_32"]:
                break
        assert "100.64.0.30" in fake.view["mode4_32"], "C-3's grace did not end"
        assert not timers.done(), timers.exception() if timers.done() else None
        assert fake.view["mode4_32"]["100.64.0.10"] == "goto notice"     # C-2 keeps its address
        assert "C-1" in e.queries.status()["address_conflicts"]
        stop.set()
        await asyncio.wait_for(timers, 5)


async def test_forward_step_does_not_end_a_session_early_and_the_moved_end_survives_a_restart(
        tmp_path: Path) -> None:
    """A RADIUS session ends at its receipt plus the session timeout (wall clock): a forward step
    must not end it early and free the restricted subscriber's address until the next Interim."""
    from enforcer.match import Match
    from enforcer.sessions.session import Session

    by_name = Subscriber("C-2", (), Mode.WALLED_GARDEN, "overdue", match=Match(username="alice"))
    session = Session("bng", "nas1/s1", Match(username="alice"), (parse_address("100.64.0.20"),),
                      expires=NOW + 300)

    def session_walled(fake: FakeDataplane) -> bool:
        return "100.64.0.20" in fake.view.get("mode4_32", {})

    async def timers(e: Enforcer) -> None:
        """The timer's round, and the session expiry duty when it says it is due."""
        await e.timers.tick()
        if e.sessions.due() == 0:
            await e.sessions.run()

    clocks = Clocks()
    fake = FakeDataplane()
    async with enforcer(tmp_path, clocks, fake, listed=False) as (e, _):
        await e.lists.on_list(ListUpdate([SUB, by_name], "l.yaml", "1"))
        await e.sessions.update("bng", started=[session])
        assert session_walled(fake)
        clocks.pass_(60)
        clocks.step(86400)            # NTP fixes a clock that was a day behind
        await timers(e)
        assert session_walled(fake), "the step ended the session early"
    async with enforcer(tmp_path, clocks, fake, listed=False) as (e, _):   # the moved end was saved
        await timers(e)
        assert session_walled(fake)
        clocks.pass_(200)             # 260 s of the session's 300 really lived
        await timers(e)
        assert session_walled(fake)
        clocks.pass_(60)              # now it has really ended
        await timers(e)
        assert not session_walled(fake)
