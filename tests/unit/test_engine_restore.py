"""The state is lost but the table is in the kernel: nobody is freed or walled by the loss
(docs/reference.md, Safety rules).

A quarantined (or deleted) state database leaves the daemon with no inputs. The kernel still
enforces; ``restore`` keeps it as it is until the list arrives, then rebuilds: listed and
restricted in the kernel stays restricted, listed but free in the kernel (a payment the lost
state knew) stays free for a grace, restricted but unlisted is lifted.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, handle_event
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, RESTRICTED, Event
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

NOW = 1_795_000_000.0


def make_config(tmp: Path) -> Any:
    return parse_config(f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.yaml}}\n", str(tmp / "c.yaml"))


async def started(config: Any, fake: FakeDataplane, now: float = NOW) -> Enforcer:
    """A daemon over ``fake`` after its start-up restore (what ``walled-garden run`` does first)."""
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: now)  # type: ignore[arg-type]
    await e.engine.restore()
    return e


def sub(sid: str, address: str) -> Subscriber:
    return Subscriber(sid, (parse_address(address),), Mode.WALLED_GARDEN, "overdue")


async def test_lost_state_keeps_the_kernel_until_the_list_then_rebuilds(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fake = FakeDataplane()
    listed = [sub("C-1", "100.64.0.1"), sub("C-2", "100.64.0.2")]
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    await handle_event(e, Event("p2", PAYMENT, NOW, "C-2"), 0.0)                       # C-2 paid: free
    await handle_event(e, Event("r3", RESTRICTED, NOW, "C-3", sub("C-3", "100.64.0.3")), 0.0)  # by event only
    await e.close()
    assert set(fake.view["mode4_32"]) == {"100.64.0.1", "100.64.0.3"}

    shutil.rmtree(tmp_path / "state")          # the database is gone (or was quarantined)
    e = await started(config, fake, NOW + 60)
    assert e.queries.status()["rebuilding_from_kernel"]
    assert set(fake.state.elements["portal4_32"]) == {"100.64.0.1", "100.64.0.3"}   # untouched
    status, _ = await handle_event(e, Event("x", RESTRICTED, NOW, "C-4", sub("C-4", "100.64.0.4")), 0.0)
    assert status == 503                        # billing retries once the list has rebuilt the state
    await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    assert not e.queries.status()["rebuilding_from_kernel"]
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}    # C-2 stays free, C-3 (unlisted) lifted
    assert e.queries.explain("C-2")["mode"] == "free"
    await e.close()


async def test_a_list_that_cannot_be_saved_changes_nothing_and_is_retried(tmp_path: Path) -> None:
    """A transient SQLite error while saving a list: reported as a list error, nothing enforced
    from it (it is not durable), the source and the timer live on, and it applies once saving works."""
    import asyncio
    import sqlite3

    config = make_config(tmp_path)
    fake = FakeDataplane()
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
    real = e.engine.store.save_list
    failures = [1]

    def flaky(*args: object) -> None:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("database is locked")
        real(*args)  # type: ignore[arg-type]

    e.engine.store.save_list = flaky  # type: ignore[method-assign]
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1"), sub("C-2", "100.64.0.2")], "l.yaml", "2"))
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}
    assert set(e.engine.inputs.listed) == {"C-1"}
    assert "could not be saved" in e.queries.status()["source"]["last_error"]["message"]
    stop = asyncio.Event()
    timers = asyncio.create_task(e.timers.run(stop))
    for _ in range(50):
        await asyncio.sleep(0.1)
        if "100.64.0.2" in fake.view["mode4_32"]:
            break
    assert set(fake.view["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}
    assert e.queries.status()["source"]["last_error"] is None
    stop.set()
    await timers
    await e.close()


@pytest.mark.parametrize("first", [False, True], ids=["next_list", "first_list"])
async def test_a_list_that_cannot_be_saved_does_not_advance_the_last_success(tmp_path: Path, first: bool) -> None:
    """``walled_garden_source_last_success_timestamp_seconds`` moves only once a list is saved
    (NOC audit: it moved before the save, so WalledGardenSourceStale stayed quiet while every list
    failed to save with reason ``state``); nor does a 'not modified' answer move it (a URL source
    keeps the ETag of the body it handed over) while that list is unsaved. The first list (enforced,
    then saved) and the next ones (saved, then enforced) alike; the retry that saves it moves it."""
    import sqlite3

    now = [NOW]
    e = Enforcer(make_config(tmp_path), dataplane=FakeDataplane(), conntrack=NoConntrack(),  # type: ignore[arg-type]
                 clock=lambda: now[0])
    await e.engine.restore()
    success = e.metrics.source_success
    if not first:
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
        assert success._value.get() == NOW
    real, failing = e.engine.store.save_list, [True]

    def flaky(*args: object) -> None:
        if failing[0]:
            raise sqlite3.OperationalError("database or disk is full")
        real(*args)  # type: ignore[arg-type]

    e.engine.store.save_list = flaky  # type: ignore[method-assign]
    before = success._value.get()
    now[0] = NOW + 100
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1"), sub("C-2", "100.64.0.2")], "l.yaml", "2"))
    assert e.lists.unsaved is not None and e.metrics.source_failures.labels("state")._value.get() == 1
    assert success._value.get() == before, "a list that could not be saved is no success"
    now[0] = NOW + 200
    await e.lists.on_source_unchanged("l.yaml")    # the URL answered 304 for the unsaved list's ETag
    assert success._value.get() == before and e.queries.status()["source"]["last_error"]["reason"] == "state"
    failing[0] = False
    now[0] = NOW + 300
    await e.lists.run()                             # the timer's retry
    assert e.lists.unsaved is None and success._value.get() == NOW + 300
    await e.close()


async def test_a_garbage_database_is_quarantined_and_the_kernel_keeps_enforcing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fake = FakeDataplane()
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
    await e.close()
    database = tmp_path / "state" / "state.sqlite3"
    for extra in ("-wal", "-shm"):
        (tmp_path / "state" / f"state.sqlite3{extra}").unlink(missing_ok=True)
    database.write_bytes(b"this is not a database" * 100)
    e = await started(config, fake)
    status = e.queries.status()
    assert status["state"]["quarantined"] is not None and status["rebuilding_from_kernel"]
    assert list((tmp_path / "state").glob("state.sqlite3.corrupt-*"))   # kept for inspection
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}
    await e.close()


async def test_a_batch_that_cannot_be_saved_is_undone_in_the_kernel_and_answered_503(tmp_path: Path) -> None:
    """Durable and in the kernel, or neither: a state write failing after the kernel commit puts
    the kernel back, answers 503 (billing retries), and the retry then applies."""
    import sqlite3

    config = make_config(tmp_path)
    fake = FakeDataplane()
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))

    def fault(operation: str) -> None:
        if operation == "record_state":
            raise sqlite3.OperationalError("disk I/O error")

    e.engine.store.write_fault = fault
    status, answer = await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0)
    assert status == 503 and "could not be saved" in answer["error"]
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}      # back as it was
    assert "C-1" not in e.engine.inputs.graces
    e.engine.store.write_fault = None
    status, answer = await handle_event(e, Event("p1", PAYMENT, NOW, "C-1"), 0.0)
    assert (status, answer["mode"]) == (200, "free")
    assert not fake.view["mode4_32"]
    await e.close()
    e = await started(config, fake)
    assert not fake.view["mode4_32"], "what billing was told survives the restart"
    await e.close()


async def test_a_background_flush_that_fails_unexpectedly_is_logged_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A flush after a commit runs in the background; a bug in it must not go unseen until
    the process exits: it is logged with its traceback and counted at once."""
    e = await started(make_config(tmp_path), FakeDataplane())

    async def broken() -> None:
        raise RuntimeError("injected")

    with caplog.at_level(logging.ERROR, "walled_garden.enforcer"):
        e.engine.spawn(broken())
        for _ in range(50):
            await asyncio.sleep(0.01)
            if e.metrics.task_failures.labels("flush")._value.get():
                break
    assert e.metrics.task_failures.labels("flush")._value.get() == 1
    assert any("event=task_failed task=flush" in r.getMessage() and r.exc_info for r in caplog.records)
    await e.close()


async def test_a_rebuild_names_what_it_lifted_and_status_shows_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The restrictions no list entry names (events', operators') cannot be kept (no id: no
    payment could lift them) nor held for an operator (webhooks are 503 until the rebuild):
    they are lifted, and the operator learns which from the log and ``status`` (SPEC 8)."""
    from enforcer.cli import _print_health

    config = make_config(tmp_path)
    fake = FakeDataplane()
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
    for n in (6, 7):
        status, _ = await handle_event(e, Event(f"r{n}", RESTRICTED, NOW, f"E-{n}", sub(f"E-{n}", f"100.64.0.{n}")),
                                       0.0)
        assert status == 200
    await e.close()
    shutil.rmtree(tmp_path / "state")
    e = await started(config, fake, NOW + 60)
    state = e.queries.status()["state"]
    assert state["kept_from_kernel"] == {"addresses": 3, "why": "the state was lost"} and state["rebuilt"] is None
    _print_health(e.queries.status())
    assert "KERNEL KEPT AS IT IS (the state was lost): 3 restricted address(es)" in capsys.readouterr().out
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "2"))
    state = e.queries.status()["state"]
    assert state["kept_from_kernel"] is None
    assert state["rebuilt"] == {"at": NOW + 60, "listed": 1, "kept_free": 0, "lifted": 2,
                                "lifted_keys": ["100.64.0.6/32", "100.64.0.7/32"]}
    _print_health(e.queries.status())
    out = capsys.readouterr().out
    assert "STATE REBUILT" in out and "2 restricted address(es) no list entry names lifted" in out
    assert "100.64.0.6/32, 100.64.0.7/32" in out and "KERNEL KEPT" not in out
    assert set(fake.view["mode4_32"]) == {"100.64.0.1"}
    await e.close()
