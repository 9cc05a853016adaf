"""The store used from several threads at once, as the daemon does: the event loop's thread
writes answers, audits and outbox messages while an ``asyncio.to_thread`` worker saves a large
list. Each thread has its own connection and its own transaction; a write never joins (nor is
rolled back with) another thread's transaction, and a read never sees another thread's
uncommitted rows. Every wait and join here is bounded."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from enforcer import store as store_module
from enforcer.store import Store, StoreError
from enforcer.subscribers import Mode, Subscriber, parse_address

#: Rows of the "long" list save; large enough that its transaction is open for a while.
BIG = 50_000
#: Upper bound of any wait in this file (a wedged thread fails the test instead of hanging it).
WAIT = 20.0


def listing(n: int, prefix: str = "S") -> dict[str, Subscriber]:
    def address(i: int) -> str:
        return f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return {f"{prefix}-{i}": Subscriber(f"{prefix}-{i}", (parse_address(address(i)),), Mode.NOTICE, "overdue")
            for i in range(n)}


def committed(tmp_path: Path, sql: str) -> Any:
    """What a separate connection (another process, say) sees: committed rows only."""
    other = sqlite3.connect(tmp_path / "state.sqlite3")
    try:
        return other.execute(sql).fetchone()[0]
    finally:
        other.close()


class Worker(threading.Thread):
    """Runs ``work`` on its own thread and keeps what it returned or raised."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT)
        assert not self.is_alive(), "the worker thread did not finish in time"


def hold_open(store: Store, at: str, opened: threading.Event, release: Callable[[], object],
              fail: bool) -> None:
    """A ``write_fault`` hook: on a thread other than the caller's (the worker's), at the write
    ``at`` (inside the list save's open transaction), say so, wait for ``release()``, then
    fail the save or not."""
    caller = threading.current_thread()

    def fault(operation: str) -> None:
        if operation == at and threading.current_thread() is not caller:
            opened.set()
            release()
            if fail:
                raise sqlite3.OperationalError("injected: disk I/O error")
    store.write_fault = fault


LOOP_WRITES: dict[str, Callable[[Store], None]] = {
    "record_events": lambda s: s.record_events([("msg_loop", {"ok": True}, None)], None),
    "add_outbox": lambda s: s.add_outbox("m-loop", {"type": "promise.made"}, 1.0),
    "set_meta": lambda s: s.set_meta("loop", 1),
    "append_audit": lambda s: s.append_audit([(1.0, "L-1", "free", "notice", "loop")]),
}
LOOP_ROWS = {"record_events": "SELECT COUNT(*) FROM events WHERE event_id = 'msg_loop'",
             "add_outbox": "SELECT COUNT(*) FROM outbox WHERE id = 'm-loop'",
             "set_meta": "SELECT COUNT(*) FROM meta WHERE key = 'loop'",
             "append_audit": "SELECT COUNT(*) FROM audit WHERE subscriber = 'L-1'"}


@pytest.mark.parametrize("write", sorted(LOOP_WRITES))
def test_a_failing_list_save_on_a_worker_does_not_roll_back_a_write_made_meanwhile(tmp_path: Path,
                                                                                   write: str) -> None:
    """The worker's 50k-row save is open (its rows written, not committed) when this thread
    writes; then the save fails. The save leaves nothing, this thread's write stays."""
    store = Store(str(tmp_path))
    opened, written = threading.Event(), threading.Event()
    worker = Worker(lambda: store.save_list({}, listing(BIG), {"version": "big"}))
    # The worker waits (at most 0.5 s) for this thread's write to return: a write that joined
    # its transaction returns at once and is then rolled back with it; one that waits for the
    # writer lock is still waiting when the save gives up and fails.
    hold_open(store, "set_meta", opened, lambda: written.wait(0.5), fail=True)
    worker.start()
    try:
        assert opened.wait(WAIT), "the list save never reached its last write"
        LOOP_WRITES[write](store)
        written.set()
    finally:
        worker.finish()
    store.write_fault = None
    assert isinstance(worker.error, StoreError) and "injected" in str(worker.error)
    assert committed(tmp_path, "SELECT COUNT(*) FROM list_entries") == 0, "the failed save left nothing"
    assert committed(tmp_path, LOOP_ROWS[write]) == 1, f"{write} made meanwhile was rolled back with the save"
    assert not store.db.in_transaction


def test_a_write_on_the_loop_waits_for_a_workers_transaction_instead_of_joining_it(tmp_path: Path) -> None:
    """While ``asyncio.to_thread(save_list)`` is open, a write on the loop's thread returns
    only once committed on its own (a fresh connection sees it), after the save's commit;
    reads on the loop meanwhile are not held up and do not see the save's uncommitted rows."""
    store = Store(str(tmp_path))
    opened = threading.Event()
    seen: dict[str, Any] = {}

    async def main() -> None:
        release = threading.Event()
        hold_open(store, "set_meta", opened, lambda: release.wait(WAIT), fail=False)
        save = asyncio.ensure_future(asyncio.to_thread(store.save_list, {}, listing(BIG), {"version": "big"}))
        try:
            assert await asyncio.wait_for(asyncio.to_thread(opened.wait, WAIT), WAIT + 1)
            started = time.monotonic()
            seen["listed_during"] = store.db.execute("SELECT COUNT(*) FROM list_entries").fetchone()[0]
            seen["outbox_during"] = store.outbox_size()
            seen["read_took"] = time.monotonic() - started
            # The worker's transaction is still open: let it go on in 0.3 s (from a timer
            # thread: this write blocks the loop while it waits), and write now.
            timer = threading.Timer(0.3, release.set)
            timer.start()
            try:
                store.add_outbox("m-1", {"type": "promise.made"}, 1.0)
            finally:
                timer.cancel()
            seen["outbox_committed"] = committed(tmp_path, "SELECT COUNT(*) FROM outbox")
            seen["listed_committed"] = committed(tmp_path, "SELECT COUNT(*) FROM list_entries")
        finally:
            release.set()
            await asyncio.wait_for(save, WAIT)

    asyncio.run(asyncio.wait_for(main(), WAIT * 2))
    store.write_fault = None
    assert seen["listed_during"] == 0, "a read saw another thread's uncommitted rows"
    assert seen["outbox_during"] == 0 and seen["read_took"] < 1.0
    assert seen["outbox_committed"] == 1, "the loop's write returned before it was committed (it joined)"
    assert seen["listed_committed"] == BIG, "the loop's write did not wait for the open save"
    assert store.get_meta("list") == {"version": "big"}


def test_writers_on_several_threads_never_interleave(tmp_path: Path) -> None:
    """A big list save and three threads recording answers and outbox messages at once: no
    "cannot start a transaction within a transaction", "no transaction is active" or
    "database is locked", and every row of every writer is there."""
    store = Store(str(tmp_path))
    rounds = 150

    def answers(name: str) -> Callable[[], None]:
        def work() -> None:
            for i in range(rounds):
                store.record_events([(f"{name}-{i}", {"i": i}, None)], None)
                if i % 10 == 0:
                    store.add_outbox(f"{name}-m{i}", {"type": "promise.made"}, float(i))
        return work

    workers = [Worker(lambda: store.save_list({}, listing(BIG), {"version": "big"}))]
    workers += [Worker(answers(f"t{n}")) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.finish()
    assert [w.error for w in workers] == [None] * len(workers)
    assert committed(tmp_path, "SELECT COUNT(*) FROM list_entries") == BIG
    assert committed(tmp_path, "SELECT COUNT(*) FROM events") == 3 * rounds
    assert committed(tmp_path, "SELECT COUNT(*) FROM outbox") == 3 * (rounds // 10)


def test_a_threads_nesting_is_its_own(tmp_path: Path) -> None:
    """``record_state`` nests ``save_enforced``, ``append_audit`` and others in its one
    transaction; a failure of its nested write on one thread rolls back that batch only,
    while another thread's batch of the same shape commits."""
    from enforcer.store import EnforcedWrite

    store = Store(str(tmp_path))
    inside, other_done = threading.Event(), threading.Event()
    failing = threading.current_thread()

    def fault(operation: str) -> None:
        if operation == "append_audit" and threading.current_thread() is failing:
            inside.set()
            other_done.wait(0.5)
            raise sqlite3.OperationalError("injected: database or disk is full")
    store.write_fault = fault

    def other_batch() -> None:
        assert inside.wait(WAIT)
        store.record_state([EnforcedWrite({"B-1": ("notice", ["100.64.0.2"], "r")}, set(),
                                          [(1.0, "B-1", "free", "notice", "other")])])
        other_done.set()

    other = Worker(other_batch)
    other.start()
    try:
        with pytest.raises(StoreError, match="append_audit"):
            store.record_state([EnforcedWrite({"A-1": ("notice", ["100.64.0.1"], "r")}, set(),
                                              [(1.0, "A-1", "free", "notice", "mine")])])
    finally:
        other.finish()
    store.write_fault = None
    assert other.error is None
    assert set(store.enforced()) == {"B-1"} and [a["subscriber"] for a in store.audit()] == ["B-1"]


def test_each_thread_has_its_own_connection_and_close_closes_them_all(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    mine = store.db
    connections: list[sqlite3.Connection] = []

    def use() -> None:
        store.set_meta(threading.current_thread().name, 1)
        connections.append(store.db)
        assert store.db is store.db

    for _ in range(3):
        worker = Worker(use)
        worker.start()
        worker.finish()
        assert worker.error is None
    assert len({id(c) for c in connections + [mine]}) == 4
    # Ended threads' connections are closed when the next thread opens one: never more than
    # the live threads' (here: this one and the last worker's, whose thread has ended too).
    assert store.connection_count() <= 2
    store.close()
    assert store.connection_count() == 0
    for db in connections + [mine]:
        with pytest.raises(sqlite3.ProgrammingError):
            db.execute("SELECT 1")
    with pytest.raises(StoreError):
        store.outbox_size()
    late = Worker(lambda: store.set_meta("late", 1))
    late.start()
    late.finish()
    assert isinstance(late.error, StoreError), "a closed store opened a new connection"


def test_a_thread_waiting_too_long_for_the_writer_gets_database_is_locked(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process writer lock waits ``BUSY_TIMEOUT`` like SQLite's own busy wait, then says
    "database is locked", naming the operation; the holder's transaction is unaffected."""
    from enforcer import store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.2)
    store = Store(str(tmp_path))
    opened, done = threading.Event(), threading.Event()
    hold_open(store, "set_meta", opened, lambda: done.wait(WAIT), fail=False)
    worker = Worker(lambda: store.save_list({}, listing(100), {"version": "small"}))
    worker.start()
    try:
        assert opened.wait(WAIT)
        with pytest.raises(StoreError, match="outbox_failed failed: database is locked"):
            store.outbox_failed("m-1", 5.0, "HTTP 500")
    finally:
        done.set()
        worker.finish()
    store.write_fault = None
    assert worker.error is None and committed(tmp_path, "SELECT COUNT(*) FROM list_entries") == 100


def test_close_waits_for_a_read_running_on_another_thread(tmp_path: Path) -> None:
    """A shutdown while a read (or a WAL checkpoint) runs in ``asyncio.to_thread``: its
    connection is closed only once the call is over (closing it under the call crashed
    libsqlite3 once, at a SIGTERM); a call started after ``close`` fails cleanly."""
    store = Store(str(tmp_path))
    inside, results = threading.Event(), []

    def slow_read() -> None:
        def read(self: Store) -> Any:
            inside.set()
            time.sleep(0.3)                      # close() is called meanwhile
            return self.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        try:
            results.append(store_module._reads(read)(store))
        except Exception as exc:   # noqa: BLE001 - the test reports what happened
            results.append(exc)

    worker = threading.Thread(target=slow_read)
    worker.start()
    assert inside.wait(5)
    store.close()
    worker.join(5)
    assert results == [0], results
    with pytest.raises(StoreError):
        store.get_meta("list")
