"""An expiry the timer could not save is saved again, so what a restart reads converges on what
is enforced, also after the wall clock steps back.

docs/reference.md, Safety rules (durable state; clock steps). At its end an exemption (or a
grace, a promise) is dropped from memory and the kernel enforces what follows at once, even when
the save of that end fails (``event=expiry_not_saved ... enforced=yes``). While the wall clock
runs on, the unsaved end is harmless: a restart reads an exemption whose end has passed and
expires it again. After a step back the saved exemption's end lies in the future again, so a
restart would free the subscriber: the timer therefore keeps the end pending and saves it at its
next round (``Engine.save_later``, saved by ``Engine.now``). An ended exemption stays ended: a
step back never brings it back, in memory or on disk (``receipt_clock``: backward steps only ever
make what is still running last longer).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, SteppedClocks, clocked_enforcer, exempt, grace_config, handle_event
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, Event
from enforcer.policy import PolicyInputs
from enforcer.sources import ListUpdate
from enforcer.store import Store
from enforcer.subscribers import Mode, Subscriber, parse_address
from enforcer.timers import RESYNC_SECONDS

NOW = 1_795_000_000.0   # 2026-11-18
GRACE = 3600.0
SUB = Subscriber("C-1", (parse_address("100.64.0.10"),), Mode.NOTICE, "overdue")


class Clocks(SteppedClocks):
    def __init__(self) -> None:
        super().__init__(NOW)


def config(tmp: Path) -> Any:
    return grace_config(tmp, GRACE)


@contextlib.asynccontextmanager
async def enforcer(tmp: Path, clocks: Clocks, fake: FakeDataplane,
                   listed: bool = True) -> AsyncIterator[Enforcer]:
    async with clocked_enforcer(config(tmp), clocks, fake, [SUB] if listed else []) as e:
        yield e


def noticed(fake: FakeDataplane) -> bool:
    return fake.view.get("mode4_32", {}).get("100.64.0.10") == "goto notice"


def persisted(e_or_tmp: Enforcer | Path) -> PolicyInputs:
    """What a restart would read (a fresh ``Store`` over the state directory)."""
    state = e_or_tmp.engine.config.state_dir if isinstance(e_or_tmp, Enforcer) else e_or_tmp / "state"
    store = Store(str(state))
    try:
        return store.load_inputs()
    finally:
        store.close()


def fail_once(e: Enforcer, operation: str) -> list[str]:
    """Make the next write named ``operation`` fail as a full disk would; returns the failures."""
    failed: list[str] = []

    def fault(name: str) -> None:
        if name == operation and not failed:
            failed.append(name)
            raise sqlite3.OperationalError("disk I/O error (injected)")
    e.engine.store.write_fault = fault
    return failed


async def exempt_then_expire_unsaved(e: Enforcer, fake: FakeDataplane, clocks: Clocks) -> None:
    """C-1 is exempt for a minute; the minute passes and the timer's save of the end fails."""
    assert (await exempt(e, "noc", "C-1", "outage", NOW + 60, "fault ticket"))[0] == 200
    assert not noticed(fake)
    clocks.pass_(61)
    failed = fail_once(e, "save_subscribers")
    await e.timers.tick()
    assert failed, "the injected failure did not happen"
    assert noticed(fake), "the ended exemption is enforced although its save failed"
    assert "C-1" not in e.engine.inputs.exemptions
    assert "C-1" in persisted(e).exemptions


async def test_an_unsaved_expiry_is_saved_at_the_next_round_after_a_step_back(tmp_path: Path) -> None:
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        await exempt_then_expire_unsaved(e, fake, clocks)
        assert e.engine.clock_unsaved, "the unsaved end is not pending"
        assert e.timers._wait() <= RESYNC_SECONDS, "the timer does not come back soon for the unsaved end"
        clocks.step(-600)             # now the saved end lies in the future again
        await e.timers.tick()         # the next round saves the end
        assert noticed(fake)
        assert "C-1" not in persisted(tmp_path).exemptions
        assert persisted(tmp_path).decide("C-1", clocks.wall).mode == Mode.NOTICE
        assert not e.engine.clock_unsaved
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:   # a restart decides the same
        await e.timers.tick()
        assert noticed(fake)
        assert e.engine.decisions["C-1"].mode == Mode.NOTICE


async def test_any_input_saves_a_pending_expiry(tmp_path: Path) -> None:
    """``Engine.now`` (every input and timer round) saves what is pending, not only the timer."""
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        await exempt_then_expire_unsaved(e, fake, clocks)
        async with e.engine.lock:
            e.engine.now()
        assert "C-1" not in persisted(tmp_path).exemptions


async def test_a_failing_retry_stays_pending_until_a_save_succeeds(tmp_path: Path) -> None:
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        await exempt_then_expire_unsaved(e, fake, clocks)
        failed = fail_once(e, "save_clock")
        await e.timers.tick()
        assert failed and e.engine.clock_unsaved
        assert "C-1" in persisted(tmp_path).exemptions
        clocks.pass_(RESYNC_SECONDS)
        await e.timers.tick()
        assert not e.engine.clock_unsaved
        assert "C-1" not in persisted(tmp_path).exemptions
        assert noticed(fake)


async def test_a_restart_before_the_retry_expires_it_again(tmp_path: Path) -> None:
    """Killed before the retry (the clock did not step): the saved end has passed, so the restart
    enforces and expires it again, and saves that."""
    clocks, fake = Clocks(), FakeDataplane()
    e = Enforcer(config(tmp_path), dataplane=fake, conntrack=NoConntrack(),  # type: ignore[arg-type]
                 clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([SUB], "l.yaml", "1"))
    await exempt_then_expire_unsaved(e, fake, clocks)
    await e.close()
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        assert e.engine.inputs.decide("C-1", clocks.wall).mode == Mode.NOTICE
        await e.timers.tick()
        assert noticed(fake)
        assert "C-1" not in e.engine.inputs.exemptions
        assert "C-1" not in persisted(tmp_path).exemptions


async def test_a_step_back_does_not_bring_an_ended_exemption_back(tmp_path: Path) -> None:
    """Saved or not, an exemption that ended stays ended when the clock steps back to before its
    end: nothing in memory or on disk frees the subscriber again."""
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        assert (await exempt(e, "noc", "C-1", "outage", NOW + 60, "fault ticket"))[0] == 200
        clocks.pass_(61)
        await e.timers.tick()
        assert noticed(fake)
        clocks.step(-600)
        await e.timers.tick()
        assert noticed(fake)
        assert "C-1" not in e.engine.inputs.exemptions
        assert "C-1" not in persisted(tmp_path).exemptions
        assert e.engine.inputs.decide("C-1", clocks.wall).mode == Mode.NOTICE


async def test_an_unsaved_grace_end_is_saved_too(tmp_path: Path) -> None:
    """The same for a payment's grace: ended, its save failed, the clock stepped back into it;
    the next round saves the end, so a restart does not free the subscriber for the rest of it."""
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        assert (await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0))[0] == 200
        assert not noticed(fake)
        clocks.pass_(GRACE + 1)
        failed = fail_once(e, "save_subscribers")
        await e.timers.tick()
        assert failed and noticed(fake)
        assert "C-1" in persisted(tmp_path).graces
        clocks.step(-600)
        await e.timers.tick()
        assert "C-1" not in persisted(tmp_path).graces
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        await e.timers.tick()
        assert noticed(fake)


# -- the chaos model's sequence, by hand -------------------------------------------------------

@pytest.fixture
def machine() -> Iterator[Any]:
    from test_daemon_chaos import FakeChaos

    m = FakeChaos()
    yield m
    m.teardown()


@pytest.mark.parametrize("restart", [None, "kill"])
def test_the_chaos_models_expiry_sequence(machine: Any, restart: str | None) -> None:
    """What the model found: C-1 (listed, notice) is exempt for a minute; the timer's save of its
    end fails; the wall clock steps back 600 s. Kernel, memory and what a restart reads must agree
    again by the next round (with a restart in between: the restart's reading, which frees C-1
    until the saved end comes again, is what the kernel then holds)."""
    machine.boot(listed=["C-1"])
    machine.edit_list(edits=[("C-1", Mode.NOTICE, None)])
    machine.exemption(sid="C-1", end=False, seconds=60.0)
    machine.store_failure(op="save_subscribers")
    machine.time_passes(seconds=299.0)
    machine.kernel_matches_persisted_policy()
    machine.clock_step(seconds=-600.0)
    machine.kernel_matches_persisted_policy()
    if restart:
        machine.restart(how=restart, down=0.0)
        machine.kernel_matches_persisted_policy()
    machine.timer_round()
    machine.kernel_matches_persisted_policy()
    assert machine.persisted().exemptions == machine.e.engine.inputs.exemptions
    assert not machine.e.engine.clock_unsaved


async def test_a_pending_save_never_writes_a_change_that_is_then_undone(tmp_path: Path) -> None:
    """The pending save writes what memory holds, so it runs only at the start of an operation
    (``Engine.now``), never inside one: here a first list drops C-9's event restriction in
    memory, its own save fails and memory is restored; a save of the pending expiry in the
    middle (``sync_all``) had persisted the dropped restriction, and a restart freed C-9,
    whose restriction billing was answered 200 for (found in review)."""
    from enforcer.events import RESTRICTED
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        walled = Subscriber("C-9", (parse_address("100.64.0.9"),), Mode.WALLED_GARDEN, "overdue")
        assert (await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", walled), 0.0))[0] == 200
        assert (await exempt(e, "noc", "C-9", "outage", NOW + 60, "ticket"))[0] == 200
        clocks.pass_(61)
        assert fail_once(e, "save_subscribers") is not None
        await e.timers.tick()
        assert e.engine.clock_unsaved
        failed = fail_once(e, "save_list")
        listed = Subscriber("C-9", (parse_address("100.64.0.9"),), Mode.NOTICE, "overdue")
        await e.lists.on_list(ListUpdate([listed], "l.yaml", "1"))
        assert failed, "the list's save did not fail"
        assert "C-9" in persisted(tmp_path).overrides, "a change the list then undid was saved"
        other = Subscriber("C-1", (parse_address("100.64.0.1"),), Mode.NOTICE, "overdue")
        await e.lists.on_list(ListUpdate([other], "l.yaml", "2"))     # the fixed export, without C-9
        for _ in range(3):
            clocks.pass_(RESYNC_SECONDS)
            await e.timers.tick()
        assert not e.engine.clock_unsaved
        assert persisted(tmp_path).decide("C-9", clocks.wall).mode == Mode.WALLED_GARDEN
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        await e.timers.tick()
        assert e.engine.decisions["C-9"].mode == Mode.WALLED_GARDEN
        assert fake.view.get("mode4_32", {}).get("100.64.0.9") == "goto garden"


async def test_a_list_entrys_past_exemption_is_enforced_once_not_at_every_round(tmp_path: Path) -> None:
    """The list keeps an entry's ``exempt_until`` after it passed; the timer re-decides that entry
    when the end passes (and once after a start), not again at every later round."""
    clocks, fake = Clocks(), FakeDataplane()
    exempt_entry = Subscriber("C-1", (parse_address("100.64.0.10"),), Mode.NOTICE, "overdue", NOW + 30, "other")
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        await e.lists.on_list(ListUpdate([exempt_entry], "l.yaml", "1"))
        assert not noticed(fake)
        saved: list[set[str]] = []
        original = e.engine.store.save_subscribers
        def spy(inputs: PolicyInputs, ids: Any) -> None:
            ids = set(ids)
            if ids:                       # the clock anchor's save passes none
                saved.append(ids)
            original(inputs, ids)
        e.engine.store.save_subscribers = spy  # type: ignore[method-assign]
        clocks.pass_(31)
        await e.timers.tick()
        assert noticed(fake) and saved == [{"C-1"}]
        for _ in range(3):
            clocks.pass_(5)
            await e.timers.tick()
        assert saved == [{"C-1"}], "the passed end was taken up again at later rounds"
        assert noticed(fake)


async def test_an_exemption_that_ended_while_down_is_expired_at_once_after_the_start(tmp_path: Path) -> None:
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        assert (await exempt(e, "noc", "C-1", "outage", NOW + 60, "fault ticket"))[0] == 200
    clocks.pass_(120)
    async with enforcer(tmp_path, clocks, fake, listed=False) as e:
        assert e.engine.decisions["C-1"].mode == Mode.NOTICE and noticed(fake)
        assert e.timers._wait() == 0.0, "the timer would wait although an exemption has ended"
        await e.timers.tick()
        assert "C-1" not in persisted(tmp_path).exemptions
        assert e.timers._wait() > 0.0


async def test_a_step_seen_inside_an_operation_that_is_undone_does_not_shorten_a_grace(tmp_path: Path) -> None:
    """C-1 pays (grace 3600 s). An operator's change for C-1 needs a full sync (drift seen),
    the wall clock steps +3000 s while it waits on the kernel, and its save fails, so it is
    undone from the snapshot taken at its start. The step was moved into the grace inside the
    operation and undone with it, so the grace ended 3000 s early: C-1 re-walled 700 s
    later (found in review). Inside an operation the step is not taken up; the next start is."""
    import sqlite3
    clocks, fake = Clocks(), FakeDataplane()
    async with enforcer(tmp_path, clocks, fake) as e:
        assert (await handle_event(e, Event("p1", PAYMENT, NOW, "C-1", None), 0.0))[0] == 200
        assert not noticed(fake)
        e.engine.reconciler.needs_full = True
        original = e.engine.reconciler.update

        def update(decisions: Any) -> Any:
            clocks.step(3000)          # stepped while the change waits for the kernel thread
            e.engine.reconciler.update = original  # type: ignore[method-assign]
            return original(decisions)
        e.engine.reconciler.update = update  # type: ignore[method-assign]
        saves: list[str] = []

        def fault(name: str) -> None:
            if name == "record_state":
                saves.append(name)
                if len(saves) == 2:         # the full sync's record passes, the change's fails
                    raise sqlite3.OperationalError("disk I/O error (injected)")
        e.engine.store.write_fault = fault
        assert (await exempt(e, "noc", "C-1", "outage", NOW + 100_000, "ticket"))[0] == 503
        e.engine.store.write_fault = None
        await e.timers.tick()
        clocks.pass_(700)                   # 3,700 s by the wall clock, 700 s by the receipt clock
        await e.timers.tick()
        assert not noticed(fake), "a paid subscriber re-walled early by a forward clock step"
        assert persisted(tmp_path).graces["C-1"].until >= NOW + GRACE + 3000
