"""The start and restart path at scale (issue 16): what a restart may skip, and what it must not.

A restart does not parse again the list whose content is in force (the digest is compared
before the parse), but still parses a changed one; the webhook worker is started before the
state is read, and no event reaches the daemon before the restore is done.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import enforcer.sources as sources
from daemon_helpers import NoConntrack
from enforcer.address_space import AddressSpace
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.demo.billing import signed_request
from enforcer.engine import PENDING_LIST
from enforcer.events import PAYMENT
from enforcer.outcome import Refusal
from enforcer.sources import FileSource, ListUpdate, content_digest
from enforcer.store import Store
from enforcer.subscribers import Mode, Subscriber, parse_address
from enforcer.webhook_worker import WorkerBridge

NOW = 1_795_000_000.0
LIST = "id,addresses,mode,reason\nC-1,100.64.0.1,walled-garden,overdue\nC-2,100.64.0.2 2001:db8:2::/56,notice,\n"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def make_config(tmp: Path, guard: str = "") -> Any:
    return parse_config(f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.csv{guard}}}\n"
                        "gateway: {subscriber_prefixes: [100.64.0.0/10, 2001:db8::/32]}\n", str(tmp / "c.yaml"))


async def started(config: Any, fake: FakeDataplane) -> Enforcer:
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    return e


def watch(e: Enforcer) -> FileSource:
    """The file source exactly as ``Service`` builds it."""
    lists = e.lists
    return FileSource(e.engine.config.subscribers.source, lists.on_list, lists.on_source_failure,
                      space=e.engine.space, applied=lists.applied_digest, on_unchanged=lists.on_source_unchanged)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``parse_list`` a source makes, by name."""
    seen: list[str] = []
    real = sources.parse_list

    def counted(text: str, name: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(name)
        return real(text, name, *args, **kwargs)

    monkeypatch.setattr(sources, "parse_list", counted)
    return seen


async def test_a_restart_does_not_parse_the_list_in_force_but_a_changed_one(tmp_path: Path,
                                                                            parses: list[str]) -> None:
    config, fake = make_config(tmp_path), FakeDataplane()
    (tmp_path / "l.csv").write_text(LIST)
    e = await started(config, fake)
    await watch(e).check()
    assert len(parses) == 1 and e.lists.list_status["entries"] == 2
    in_force = dict(e.lists.list_status)
    await e.close()
    kernel = fake.view

    e = await started(config, fake)       # the restart
    e.lists.source_error = {"reason": "left from before"}
    await watch(e).check()
    assert len(parses) == 1, "the unchanged list was parsed again"
    assert e.lists.list_status == in_force and e.lists.source_error is None
    assert fake.view == kernel and e.queries.status()["kernel_in_sync"]
    assert sum(e.queries.status()["modes"].values()) == 2

    (tmp_path / "l.csv").write_text(LIST.replace("C-2,", "C-3,"))   # one byte: parsed, applied
    await watch(e).check()
    assert len(parses) == 2 and set(e.engine.inputs.listed) == {"C-1", "C-3"}
    await e.close()


async def test_a_held_list_is_read_again_even_when_the_file_is_back_to_the_list_in_force(
        tmp_path: Path, parses: list[str]) -> None:
    """Reading the list in force again releases a held change: that read must happen."""
    config, fake = make_config(tmp_path, ", guard: {max_lift: 1, max_lift_share: 0.1}"), FakeDataplane()
    (tmp_path / "l.csv").write_text(LIST)
    e = await started(config, fake)
    await watch(e).check()
    digest = e.lists.applied_digest()
    assert digest
    (tmp_path / "l.csv").write_text("id,addresses\nC-9,100.64.0.9\n")   # lifts both: held
    await watch(e).check()
    assert e.lists.held is not None and e.lists.applied_digest() is None
    (tmp_path / "l.csv").write_text(LIST)
    await watch(e).check()
    assert e.lists.held is None and len(parses) == 3
    assert e.lists.applied_digest() == digest
    await e.close()


def test_the_digest_changes_with_whatever_the_parse_reads() -> None:
    space = AddressSpace((ipaddress.ip_network("100.64.0.0/10"),))
    data = LIST.encode()
    same = content_digest(data, "l.csv", space)
    assert content_digest(data, "l.csv", AddressSpace((ipaddress.ip_network("100.64.0.0/10"),))) == same
    assert content_digest(data + b"\n", "l.csv", space) != same
    assert content_digest(data, "l.yaml", space) != same
    assert content_digest(data, "l.csv", None) != same
    assert content_digest(data, "l.csv", space, "text/csv") != same


async def test_events_wait_for_the_restore_when_the_worker_started_first(tmp_path: Path,
                                                                         unused_tcp_port: int) -> None:
    """The worker listens before the daemon has read its state; a payment sent then is answered
    200 once the daemon attached its sink, and only then is it applied."""
    (tmp_path / "secret").write_text(SECRET)
    config = make_config(tmp_path)
    bridge = WorkerBridge(None, "127.0.0.1", unused_tcp_port, str(tmp_path / "secret"))
    await bridge.spawn_early()
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    e: Enforcer | None = None
    try:
        assert await bridge.wait_ready(15.0)
        url = f"http://127.0.0.1:{unused_tcp_port}/v1/events"
        request = signed_request(url, SECRET, {"type": PAYMENT, "timestamp": "2026-11-23T10:00:00Z",
                                               "data": {"subscriber": "C-1"}}, event_id="msg_early")

        async def pay() -> tuple[int, Any]:
            async with (aiohttp.ClientSession() as session,
                        session.post(url, data=request.data, headers=dict(request.header_items())) as response):
                return response.status, await response.json()

        paid = asyncio.create_task(pay())
        await asyncio.sleep(0.5)
        assert not paid.done(), "answered before the daemon could apply it"
        fake = FakeDataplane()
        e = await started(config, fake)
        await e.lists.on_list(ListUpdate([Subscriber("C-1", (parse_address("100.64.0.1"),), Mode.WALLED_GARDEN)],
                                         "l.csv", "1"))
        assert not paid.done()
        bridge.attach(e.sink)
        status, answer = await asyncio.wait_for(paid, 10)
        assert status == 200 and answer["mode"] == "free"
        assert e.queries.explain("C-1")["mode"] == "free"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        if e is not None:
            await e.close()


async def test_an_early_worker_never_taken_over_is_stopped(tmp_path: Path, unused_tcp_port: int) -> None:
    (tmp_path / "secret").write_text(SECRET)
    bridge = WorkerBridge(None, "127.0.0.1", unused_tcp_port, str(tmp_path / "secret"))
    await bridge.spawn_early()
    assert bridge._early is not None
    process = bridge._early[0]
    await bridge.discard_early()
    assert process.returncode is not None and bridge._early is None


# -- the first list: enforced first, saved after --------------------------------------------------

def first_list() -> list[Subscriber]:
    return [Subscriber("C-1", (parse_address("100.64.0.1"),), Mode.WALLED_GARDEN, "overdue"),
            Subscriber("C-2", (parse_address("100.64.0.2"),), Mode.WALLED_GARDEN, "overdue")]


class Killed(BaseException):
    """The daemon killed at this point (nothing of it runs after)."""


async def test_the_first_list_is_enforced_before_its_save_and_nothing_is_answered_meanwhile(tmp_path: Path) -> None:
    import threading

    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)
    release = threading.Event()
    real = e.engine.store.save_list

    def slow(*args: Any) -> None:
        assert release.wait(10)
        real(*args)

    e.engine.store.save_list = slow  # type: ignore[method-assign]
    reading = asyncio.create_task(e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1")))
    await asyncio.wait_for(e.lists.enforced.wait(), 5)
    assert set(fake.view["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}
    status = e.queries.status()
    assert status["kernel_in_sync"] and sum(status["modes"].values()) == 2
    assert status["source"]["list_in_force"]["entries"] == 2
    from daemon_helpers import submit_event
    from enforcer.events import Event
    paid = submit_event(e, Event("p-1", PAYMENT, NOW, "C-1"))
    await asyncio.sleep(0.2)
    assert not paid.done() and not reading.done(), "answered before the list it changes was durable"
    release.set()
    await asyncio.wait_for(reading, 10)
    assert (await asyncio.wait_for(paid, 5))[0] == 200
    assert Store(str(tmp_path / "state")).get_meta("list")["entries"] == 2
    assert Store(str(tmp_path / "state")).get_meta(PENDING_LIST) is None
    await e.close()


async def test_killed_between_the_kernel_and_the_save_the_restart_keeps_the_kernel_until_the_list(
        tmp_path: Path) -> None:
    """The list file is still there and the kernel holds it: the restart frees nobody the kernel
    restricts (even with other inputs saved before), gives nobody a grace, and applies the list
    when it is read again; a payment answered before the list stays."""
    from daemon_helpers import handle_event
    from enforcer.events import Event

    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)
    assert (await handle_event(e, Event("p-3", PAYMENT, NOW, "C-3"), 0.0))[0] == 200   # an input saved before

    def killed(*args: Any) -> None:
        raise Killed

    e.engine.store.save_list = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"))
    kernel = fake.view
    assert set(kernel["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}

    e = await started(config, fake)     # the restart, on the same kernel table
    assert e.queries.status()["rebuilding_from_kernel"] and fake.view == kernel
    await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"))
    assert not e.queries.status()["rebuilding_from_kernel"]
    assert set(fake.view["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}
    assert not e.engine.inputs.graces.keys() - {"C-3"}, "the kernel's list is not a lost state: no graces"
    assert "C-3" in e.engine.inputs.graces
    await e.close()
    e = await started(config, fake)
    assert set(e.engine.inputs.listed) == {"C-1", "C-2"} and not e.queries.status()["rebuilding_from_kernel"]
    await e.close()


async def test_killed_mid_save_then_another_mass_list_is_held_with_the_kernel_kept(tmp_path: Path) -> None:
    """The marker names the list being saved by its digest: another list written meanwhile is
    weighed by the mass-change guard like any list, the kernel table kept as it is until an
    operator approves it (found in review: it was applied without the guard)."""
    config = make_config(tmp_path, ", guard: {max_restrict: 1, max_restrict_share: 0.1}")
    fake = FakeDataplane()
    e = await started(config, fake)

    def killed(*args: Any) -> None:
        raise Killed

    e.engine.store.save_list = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"), approved_by="root")
    kernel = {name: dict(items) for name, items in fake.view.items()}
    assert set(kernel["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}

    e = await started(config, fake)     # the restart, on the same kernel table
    other = [Subscriber(f"C-{i}", (parse_address(f"100.64.1.{i}"),), Mode.WALLED_GARDEN, "overdue") for i in range(5)]
    await e.lists.on_list(ListUpdate(other, "l.csv", "2", "d2"))
    assert e.lists.held is not None, "another list than the one being saved goes through the guard"
    assert e.queries.status()["rebuilding_from_kernel"] and fake.view == kernel, "the kernel kept as it is"
    result = await e.lists.approve("root", "")   # the operator's approval applies it
    assert not isinstance(result, Refusal), result
    assert not e.queries.status()["rebuilding_from_kernel"]
    assert set(fake.view["mode4_32"]) == {f"100.64.1.{i}" for i in range(5)}
    await e.close()


async def test_a_first_list_that_cannot_be_saved_is_withdrawn_and_retried(tmp_path: Path) -> None:
    import sqlite3

    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)
    real = e.engine.store.save_list
    failures = [1]

    def flaky(*args: Any) -> None:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("disk I/O error")
        real(*args)

    e.engine.store.save_list = flaky  # type: ignore[method-assign]
    await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"))
    assert not fake.view.get("mode4_32") and not e.engine.inputs.listed
    status = e.queries.status()
    assert status["source"]["list_in_force"] == {} and status["source"]["last_error"]["reason"] == "state"
    # withdrawn from the kernel: a start must not take the table for the list being saved
    assert e.engine.store.get_meta(PENDING_LIST) is None
    assert e.lists.due() is not None
    await e.lists.run()                 # the timer's retry
    assert set(fake.view["mode4_32"]) == {"100.64.0.1", "100.64.0.2"}
    assert Store(str(tmp_path / "state")).get_meta("list")["entries"] == 2
    await e.close()


def test_the_daemon_loads_no_fleet_client_unless_a_fleet_is_configured() -> None:
    """NATS' client (and the fleet's modules) are imported by ``Enforcer`` only with ``fleet``:
    every start without one would pay their import time and memory."""
    import subprocess
    import sys

    code = ("import sys, enforcer.cli, enforcer.service; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nats' or m.startswith('enforcer.fleet')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_restart_that_finds_everything_as_left_counts_without_rewriting_the_record(tmp_path: Path) -> None:
    """The record is written again only when a decision changed while the daemon was down."""
    from daemon_helpers import handle_event
    from enforcer.events import Event

    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)
    await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"))
    assert (await handle_event(e, Event("p-1", PAYMENT, NOW, "C-1"), 0.0))[0] == 200   # C-1 free for a grace
    await e.close()

    writes: list[Any] = []

    def restarted(now: float) -> Enforcer:
        e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: now)  # type: ignore[arg-type]
        real = e.engine.store.record_state

        def counted(*args: Any, **kwargs: Any) -> None:
            writes.append(args)
            real(*args, **kwargs)

        e.engine.store.record_state = counted  # type: ignore[method-assign]
        return e

    e = restarted(NOW + 60)
    await e.engine.restore()
    assert writes == [] and e.queries.status()["modes"]["walled-garden"] == 1
    await e.close()

    e = restarted(NOW + 40 * 86400)   # the grace ended while the daemon was down
    await e.engine.restore()
    assert len(writes) == 1 and e.queries.status()["modes"]["walled-garden"] == 2
    assert set(e.engine.store.enforced()) == {"C-1", "C-2"}
    assert [(r["subscriber"], r["new"]) for r in e.engine.store.audit()][-1] == ("C-1", "walled-garden")
    await e.close()


async def test_the_first_lists_save_lets_the_start_finish_first_but_not_for_long(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    import enforcer.list_intake as list_intake

    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)
    e.lists.started.clear()            # as during Service.start
    reading = asyncio.create_task(e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1")))
    await asyncio.wait_for(e.lists.enforced.wait(), 5)
    await asyncio.sleep(0.1)
    assert not reading.done() and e.engine.store.get_meta("list") is None
    e.lists.started.set()              # READY=1 sent
    await asyncio.wait_for(reading, 5)
    assert e.engine.store.get_meta("list")["entries"] == 2
    await e.close()

    monkeypatch.setattr(list_intake, "START_WAIT", 0.2)
    config, fake = make_config(tmp_path / "again"), FakeDataplane()
    e = await started(config, fake)
    e.lists.started.clear()            # a start that never finishes: the save goes on after the bound
    await asyncio.wait_for(e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1")), 5)
    assert e.engine.store.get_meta("list")["entries"] == 2
    await e.close()


async def test_a_bug_while_enforcing_the_first_list_still_saves_it_then_is_raised(tmp_path: Path) -> None:
    config, fake = make_config(tmp_path), FakeDataplane()
    e = await started(config, fake)

    async def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    e.lists._apply = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await e.lists.on_list(ListUpdate(first_list(), "l.csv", "1", "d1"))
    assert e.engine.store.get_meta("list")["entries"] == 2 and e.engine.store.get_meta(PENDING_LIST) is None
    assert e.lists.enforced.is_set()
    await e.close()
