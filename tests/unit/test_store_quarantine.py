"""A damaged state database never stops the daemon (docs/reference.md, Safety rules).

An unusable file (garbage, truncated, malformed pages, a table of other columns, a path that
cannot be opened) is moved aside with its WAL, kept, reported, and a fresh store is used; one
row that does not decode is skipped, kept in ``quarantined_rows`` and reported, the others are
loaded; a transient error raises ``StoreError`` naming the operation and quarantines nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from daemon_helpers import NoConntrack
from enforcer import store as store_module
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.model import Mode
from enforcer.policy import Grace, Override
from enforcer.sources import ListUpdate
from enforcer.store import Store, StoreError
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0


def sub(sid: str, address: str) -> Subscriber:
    return Subscriber(sid, (parse_address(address),), Mode.WALLED_GARDEN, "overdue")


def populated(state: Path, graces: int = 300) -> Path:
    """A store with many graces (several pages), checkpointed: the file holds everything."""
    store = Store(str(state))
    inputs = store.load_inputs()
    for i in range(graces):
        inputs.graces[f"C-{i}"] = Grace(1.0, 2.0, "event e (payment.received)" + "x" * 40)
    store.save_subscribers(inputs, list(inputs.graces))
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return state / "state.sqlite3"


def page_of(path: Path, name: str) -> tuple[int, int]:
    db = sqlite3.connect(path)
    try:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        return root, db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()


def garbage(path: Path) -> None:
    path.write_bytes(b"not a database " * 500)


def truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2 + 100)


def noisy_index(path: Path) -> None:
    """The graces primary-key index page overwritten: only the check at open reads it."""
    root, size = page_of(path, "sqlite_autoindex_graces_1")
    with open(path, "r+b") as f:
        f.seek((root - 1) * size + 8)
        f.write(bytes(range(256)) * ((size - 8) // 256))


def noisy_table(path: Path) -> None:
    root, size = page_of(path, "graces")
    with open(path, "r+b") as f:
        f.seek((root - 1) * size + 8)
        f.write(bytes(range(256)) * ((size - 8) // 256))


def foreign_columns(path: Path) -> None:
    """One of our tables, written by something else: other columns."""
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE graces; CREATE TABLE graces (id TEXT PRIMARY KEY, amount INTEGER);")
    db.close()


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage", [garbage, truncated, noisy_index, noisy_table, foreign_columns, a_directory])
def test_an_unusable_database_is_moved_aside_reported_and_replaced(
        tmp_path: Path, damage: Callable[[Path], None], caplog: pytest.LogCaptureFixture) -> None:
    path = populated(tmp_path / "state")
    damage(path)
    (tmp_path / "state" / "state.sqlite3-wal").write_bytes(b"wal")   # companions go along
    (tmp_path / "state" / "state.sqlite3-shm").write_bytes(b"shm")
    with caplog.at_level(logging.ERROR, "walled_garden.store"):
        store = Store(str(tmp_path / "state"), clock=lambda: NOW)
    assert store.quarantined is not None, "the damaged database was used as it is"
    moved = Path(store.quarantined["path"])
    assert moved.name == "state.sqlite3.corrupt-20261118T110640Z"
    assert store.quarantined["at"] == NOW and store.quarantined["reason"]
    # the WAL is kept byte for byte (never checkpointed into the file nor deleted); the -shm is
    # only SQLite's index of the WAL, rebuilt by whoever opens it, and goes along
    assert moved.exists() and Path(f"{moved}-wal").read_bytes() == b"wal" and Path(f"{moved}-shm").exists()
    assert store.quarantined_files() == [str(moved)]
    assert any("event=state_quarantined" in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records)
    # the fresh store works, and a second open finds nothing wrong (the kept file is not touched)
    assert store.load_inputs().graces == {}
    store.set_meta("k", 1)
    store.close()
    again = Store(str(tmp_path / "state"), clock=lambda: NOW)
    assert again.quarantined is None and again.get_meta("k") == 1
    assert again.quarantined_files() == [str(moved)]


def test_two_quarantines_in_one_second_keep_both(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    kept = []
    for _ in range(2):
        garbage(state / "state.sqlite3")
        store = Store(str(state), clock=lambda: NOW)
        assert store.quarantined is not None
        kept.append(store.quarantined["path"])
        store.close()
    assert len(set(kept)) == 2 and all(Path(p).read_bytes().startswith(b"not a database") for p in kept)
    assert len(Store(str(state)).quarantined_files()) == 2


def test_the_daemon_starts_and_enforces_on_a_garbage_database(tmp_path: Path) -> None:
    """From the Enforcer's side: it is built, restores, takes the list and reports the quarantine."""
    import asyncio

    async def scenario() -> None:
        config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n",
                              str(tmp_path / "c.yaml"))
        (tmp_path / "state").mkdir()
        garbage(tmp_path / "state" / "state.sqlite3")
        fake = FakeDataplane()
        e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
        assert e.engine.store.quarantined is not None
        await e.engine.restore()
        await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.1")], "l.yaml", "1"))
        assert set(fake.view["mode4_32"]) == {"100.64.0.1"}
        text = generate_latest(e.metrics.registry).decode()
        assert "walled_garden_state_quarantined_databases 1.0" in text
        assert "walled_garden_state_rows_quarantined 0.0" in text
        await e.close()

    asyncio.run(scenario())


# -- single rows -------------------------------------------------------------------------------

def _good_grace_and_override(store: Store) -> None:
    inputs = store.load_inputs()
    inputs.graces["GOOD"] = Grace(1.0, 99.0, "event g")
    inputs.overrides["GOOD"] = Override(True, 1.0, "event r", sub("GOOD", "100.64.0.9"))
    store.save_subscribers(inputs, ["GOOD"])
    store.save_enforced({"GOOD": ("walled-garden", ["100.64.0.9/32"], "overdue")}, [])
    store.set_meta("list", {"entries": 1})
    store.add_outbox("m-good", {"type": "promise.made"}, 1.0)
    store.save_billing_order([("GOOD", "restriction", 5.0)])
    store.record_events([("e-good", {"id": "e-good", "result": "applied"}, None)], None)


#: (table, a bad row's INSERT, how the bad row would be read)
BAD_ROWS: list[tuple[str, str, Callable[[Store], Any]]] = [
    ("list_entries", "INSERT INTO list_entries VALUES ('BAD', '[not json', 'notice', '', NULL, '', NULL)",
     lambda s: s.load_inputs().listed),
    ("list_entries", """INSERT INTO list_entries VALUES ('BAD', '["300.1.1.1"]', 'notice', '', NULL, '', NULL)""",
     lambda s: s.load_inputs().listed),
    ("list_entries", """INSERT INTO list_entries VALUES ('BAD', '["100.64.0.7"]', 'sometimes', '', NULL, '', NULL)""",
     lambda s: s.load_inputs().listed),
    ("list_entries", """INSERT INTO list_entries VALUES ('BAD', '["100.64.0.7"]', 'notice', '', NULL, '', '[1]')""",
     lambda s: s.load_state()[0].listed),
    ("enforced", "INSERT INTO enforced VALUES ('BAD', 'notice', '[\"100.64.0.1\"]', 'r', 'now')",
     lambda s: s.load_state()[1]),
    ("overrides", "INSERT INTO overrides VALUES ('BAD', 'yes', 1.0, 'c', NULL, 'billing')",
     lambda s: s.load_inputs().overrides),
    ("overrides", "INSERT INTO overrides VALUES ('BAD', 1, 1.0, 'c', NULL, 'someone')",
     lambda s: s.load_inputs().overrides),
    ("graces", "INSERT INTO graces VALUES ('BAD', 1.0, 'soon', 'c')", lambda s: s.load_inputs().graces),
    ("readdressed", """INSERT INTO readdressed VALUES ('BAD', '["nowhere"]', 1.0, 'c')""",
     lambda s: s.load_inputs().readdressed),
    ("exemptions", "INSERT INTO exemptions VALUES ('BAD', 'dispute', X'00', '', 'x', 1.0)",
     lambda s: s.load_inputs().exemptions),
    ("promises",
     "INSERT INTO promises (id, made_at, until, outcome, address) VALUES ('BAD', 1.0, 'never', 'active', '')",
     lambda s: s.load_inputs().promises),
    ("listed_since", "INSERT INTO listed_since VALUES ('BAD', 'yesterday')", lambda s: s.load_inputs().listed_since),
    ("enforced", "INSERT INTO enforced VALUES ('BAD', 'notice', '100.64.0.1', 'r', 1.0)", lambda s: s.enforced()),
    ("meta", "INSERT INTO meta VALUES ('reference_key', '{oops')", lambda s: {"BAD": 1} if s.get_meta("reference_key")
     is not None else {}),
    ("outbox", "INSERT INTO outbox (id, created, body, next_at) VALUES ('BAD', 1.0, '[1', 0.0)",
     lambda s: {r[0]: r for r in s.outbox_due(10.0)}),
    ("billing_order", "INSERT INTO billing_order VALUES ('BAD', 'restriction', 'late')",
     lambda s: {r[0]: r for r in s.billing_order()}),
    ("events", "INSERT INTO events VALUES ('BAD', 1.0, 200, 'not json')", lambda s: s.event_answers(["BAD", "e-good"])),
    ("events", "INSERT INTO events VALUES ('BAD', 1.0, 503, '{}')", lambda s: s.event_answers(["BAD", "e-good"])),
]


@pytest.mark.parametrize("table,insert,read", BAD_ROWS, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(BAD_ROWS)])
def test_a_row_that_does_not_decode_is_skipped_kept_and_reported_alone(
        tmp_path: Path, table: str, insert: str, read: Callable[[Store], Any],
        caplog: pytest.LogCaptureFixture) -> None:
    store = Store(str(tmp_path))
    _good_grace_and_override(store)
    store.db.execute(insert)
    with caplog.at_level(logging.ERROR, "walled_garden.store"):
        found = read(store)
    assert "BAD" not in found
    # every other row is there
    inputs = store.load_inputs()
    assert inputs.graces["GOOD"] == Grace(1.0, 99.0, "event g") and "GOOD" in inputs.overrides
    assert "GOOD" in store.enforced() and store.get_meta("list") == {"entries": 1}
    assert [r[0] for r in store.outbox_due(10.0)] == ["m-good"]
    assert ("GOOD", "restriction", 5.0) in store.billing_order()
    assert "e-good" in store.event_answers(["e-good"])
    # reported: log line, attribute, kept in quarantined_rows (and no longer in its table)
    assert any("event=state_row_quarantined" in r.getMessage() and f"table={table}" in r.getMessage()
               for r in caplog.records)
    assert [r["table"] for r in store.skipped_rows] == [table] and store.skipped_count == 1
    kept = store.db.execute("SELECT source, row, error FROM quarantined_rows").fetchall()
    assert len(kept) == 1 and kept[0][0] == table and kept[0][2]
    assert store.quarantined_row_count() == 1
    assert store.quarantined is None
    store.close()
    again = Store(str(tmp_path))
    read(again)
    assert again.skipped_rows == [], "a row set aside is reported once, not at every start"


def test_many_bad_rows_are_logged_in_a_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(str(tmp_path))
    store.db.executemany("INSERT INTO graces VALUES (?, 1.0, 'soon', 'c')", [(f"B-{i}",) for i in range(500)])
    with caplog.at_level(logging.ERROR, "walled_garden.store"):
        assert store.load_inputs().graces == {}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == store_module.LOGGED_ROWS + 1 and "rows=500" in lines[-1]
    assert store.skipped_count == 500 and len(store.skipped_rows) == store_module.SKIPPED_KEPT
    assert store.quarantined_row_count() == 500


# -- transient errors ---------------------------------------------------------------------------

def test_a_failed_write_raises_store_error_and_changes_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    inputs = store.load_inputs()
    inputs.graces["C-1"] = Grace(1.0, 99.0, "event g")
    store.save_subscribers(inputs, ["C-1"])
    faults: list[str] = []

    def disk_error(operation: str) -> None:
        faults.append(operation)
        raise sqlite3.OperationalError("disk I/O error")

    store.write_fault = disk_error
    inputs.graces["C-1"] = Grace(5.0, 500.0, "event h")
    inputs.graces["C-2"] = Grace(5.0, 500.0, "event h")
    with pytest.raises(StoreError, match="record_state failed: disk I/O error") as caught:
        store.record_state([], inputs, ["C-1", "C-2"])
    assert caught.value.operation == "record_state" and isinstance(caught.value, sqlite3.Error)
    assert faults == ["record_state"]
    store.write_fault = None
    assert store.load_inputs().graces == {"C-1": Grace(1.0, 99.0, "event g")}
    store.record_state([], inputs, ["C-1", "C-2"])        # and the store goes on working
    assert set(store.load_inputs().graces) == {"C-1", "C-2"}


def test_a_fault_inside_a_batch_rolls_back_the_whole_batch(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    inputs = store.load_inputs()
    inputs.graces["C-1"] = Grace(1.0, 99.0, "event g")

    def fail_audit(operation: str) -> None:
        if operation == "append_audit":
            raise sqlite3.OperationalError("database or disk is full")

    store.write_fault = fail_audit
    from enforcer.store import EnforcedWrite
    write = EnforcedWrite({"C-1": ("notice", ["100.64.0.1/32"], "r")}, set(), [(1.0, "C-1", "free", "notice", "x")])
    with pytest.raises(StoreError, match="append_audit"):
        store.record_state([write], inputs, ["C-1"])
    store.write_fault = None
    assert store.enforced() == {} and store.load_inputs().graces == {} and not store.db.in_transaction


def test_a_locked_database_is_a_store_error_not_a_quarantine(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.05)
    store = Store(str(tmp_path))
    other = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")          # another writer holds the lock
    with pytest.raises(StoreError, match="set_meta failed: database is locked"):
        store.set_meta("k", 1)
    inputs = store.load_inputs()
    inputs.graces["C-1"] = Grace(1.0, 2.0, "event g")
    with pytest.raises(StoreError, match="save_subscribers failed: database is locked"):
        store.save_subscribers(inputs, ["C-1"])
    assert not store.db.in_transaction
    other.execute("ROLLBACK")
    store.set_meta("k", 2)                     # the lock gone, the same store writes again
    assert store.get_meta("k") == 2
    store.close()
    # at start-up: locked out entirely (another process holds it exclusively) is no reason to quarantine
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO meta VALUES ('other', '1')")
    try:
        with pytest.raises(StoreError, match="open failed: database is locked"):
            Store(str(tmp_path))
    finally:
        other.execute("ROLLBACK")
        other.close()
    again = Store(str(tmp_path))
    assert again.quarantined is None and again.quarantined_files() == [] and again.get_meta("k") == 2


def test_a_database_that_cannot_be_moved_aside_is_a_store_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    garbage(state / "state.sqlite3")

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(store_module.os, "rename", refuse)
    with pytest.raises(StoreError, match="could not be moved aside"):
        Store(str(state))
    assert (state / "state.sqlite3").read_bytes().startswith(b"not a database"), "nothing is ever deleted"


def test_quarantined_rows_survive_as_json(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.db.execute("INSERT INTO graces VALUES ('BAD', 1.0, 'soon', 'c')")
    store.load_inputs()
    row = json.loads(store.db.execute("SELECT row FROM quarantined_rows").fetchone()[0])
    assert row == {"id": "BAD", "paid_at": 1.0, "until": "soon", "cause": "c"}
