"""The SQLite state store: grouped writes come back as they went in, a batch is one
transaction (all or nothing), and processed webhook ids are found in one query."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from enforcer.exemptions import Exemption
from enforcer.match import parse_match
from enforcer.model import Mode
from enforcer.policy import Grace, Origin, Override, PolicyInputs, Readdress
from enforcer.promises import Promise
from enforcer.store import EnforcedWrite, Store, StoreError
from enforcer.subscribers import Subscriber, parse_address


def sub(sid: str, ip: str) -> Subscriber:
    return Subscriber(sid, (parse_address(ip),), Mode.NOTICE, "overdue")


def full_inputs() -> PolicyInputs:
    """Three subscribers with every kind of per-subscriber input, one with none at all."""
    return PolicyInputs(
        listed={},
        overrides={"A": Override(True, 10.0, "operator alice: test", sub("A", "100.64.0.1"), Origin.OPERATOR),
                   "B": Override(False, 11.0, "event e1 (payment.received)")},
        graces={"B": Grace(11.0, 99.0, "event e1 (payment.received)")},
        readdressed={"A": Readdress((parse_address("100.64.0.9"), parse_address("2001:db8::/64")), 12.0, "event e2")},
        exemptions={"C": {"dispute": Exemption("dispute", 500.0, "ticket 7", "event e3", 13.0),
                          "vulnerable": Exemption("vulnerable", 900.0, "", "operator bob", 14.0)}},
        promises={"C": [Promise("C", 1.0, 5.0, "kept", "100.64.0.3"), Promise("C", 20.0, 30.0)]})


def test_grouped_subscriber_writes_round_trip(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    inputs = full_inputs()
    store.save_subscribers(inputs, ["A", "B", "C", "D", "A"])
    loaded = store.load_inputs()
    assert loaded.overrides == inputs.overrides
    assert loaded.graces == inputs.graces
    assert loaded.readdressed == inputs.readdressed
    assert loaded.exemptions == inputs.exemptions
    assert loaded.promises == inputs.promises


def test_grouped_writes_remove_what_is_gone_and_leave_others_alone(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    inputs = full_inputs()
    store.save_subscribers(inputs, ["A", "B", "C"])
    inputs.overrides.pop("A")
    inputs.readdressed.pop("A")
    inputs.exemptions["C"].pop("dispute")
    inputs.graces["B"] = Grace(50.0, 60.0, "event e9")   # in memory only: B is not written
    store.save_subscribers(inputs, ["A", "C"])
    loaded = store.load_inputs()
    assert "A" not in loaded.overrides and "A" not in loaded.readdressed
    assert list(loaded.exemptions["C"]) == ["vulnerable"]
    assert loaded.graces["B"] == Grace(11.0, 99.0, "event e1 (payment.received)")
    assert loaded.overrides["B"] == full_inputs().overrides["B"]


def test_event_answers_are_found_in_one_query_per_chunk(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.record_events([(f"msg_{i}", {"id": f"msg_{i}", "n": i}, None) for i in range(0, 1200, 2)], None)
    asked = [f"msg_{i}" for i in range(1200)]          # more ids than one IN (...) may carry
    found = store.event_answers(asked)
    assert set(found) == {f"msg_{i}" for i in range(0, 1200, 2)}
    assert found["msg_1198"] == {"id": "msg_1198", "n": 1198}
    assert store.event_answer("msg_3") is None
    assert store.event_answers([]) == {}


def test_a_batch_state_is_one_transaction_all_or_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    inputs = full_inputs()
    write = EnforcedWrite({"A": ("notice", ["100.64.0.1"], "overdue")}, set(),
                          [(1.0, "A", "free", "notice", "list")])
    inputs.exemptions["C"]["bad"] = Exemption("bad", object(), "", "x", 1.0)  # type: ignore[arg-type]
    with pytest.raises(StoreError):    # a row SQLite cannot store: nothing of the batch may stay
        store.record_state([write], inputs, ["A", "C"])
    assert store.enforced() == {} and store.audit() == []
    assert store.load_inputs().overrides == {}
    del inputs.exemptions["C"]["bad"]
    store.record_state([write], inputs, ["A", "C"])
    assert store.enforced()["A"]["mode"] == "notice"
    assert [(a["subscriber"], a["new"]) for a in store.audit()] == [("A", "notice")]
    assert store.load_inputs().overrides["A"] == inputs.overrides["A"]
    store.record_state([EnforcedWrite({}, {"A"}, [])])
    assert store.enforced() == {}


def test_answers_are_recorded_all_or_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(TypeError):
        store.record_events([("msg_1", {"ok": True}, None), ("msg_2", {"bad": object()}, None)], None)
    assert store.event_answers(["msg_1", "msg_2"]) == {}
    store.record_events([("msg_1", {"ok": True}, "A")], full_inputs())
    assert store.event_answer("msg_1") == {"ok": True}
    assert store.load_inputs().overrides["A"] == full_inputs().overrides["A"]


def test_a_database_of_the_earlier_layout_gets_the_origin_of_its_overrides(tmp_path: Path) -> None:
    """Overrides written before they had an ``origin`` column are read, not quarantined: the
    column is added and a person's override (its cause says "operator ...") stays a person's,
    so it still outranks exemptions and windows after the upgrade."""
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.executescript("""CREATE TABLE overrides (id TEXT PRIMARY KEY, restrict_ INTEGER NOT NULL, at REAL NOT NULL,
        cause TEXT NOT NULL, entry TEXT);
        INSERT INTO overrides VALUES ('A', 1, 10.0, 'operator alice: abuse', NULL);
        INSERT INTO overrides VALUES ('B', 0, 11.0, 'event e1 (payment.received)', NULL);""")
    db.commit()
    db.close()
    store = Store(str(tmp_path))
    loaded = store.load_inputs()
    assert not store.quarantined and store.skipped_count == 0
    assert loaded.overrides["A"].origin is Origin.OPERATOR and loaded.overrides["A"].operator
    assert loaded.overrides["B"].origin is Origin.BILLING
    store.close()
    reopened = Store(str(tmp_path)).load_inputs()   # the column stays; nothing is migrated twice
    assert reopened.overrides["A"].origin is Origin.OPERATOR


def listed_entries() -> dict[str, Subscriber]:
    """Entries with every field a list gives: prefixes of both families, an exemption, match keys."""
    return {"L1": Subscriber("L1", (parse_address("100.64.1.1"), parse_address("2001:db8:1::/56")),
                             Mode.WALLED_GARDEN, "overdue"),
            "L2": Subscriber("L2", (parse_address("100.64.1.2"),), Mode.THROTTLE, "", 1_900_000_000.0, "dispute",
                             parse_match({"username": "l2@isp", "mac": "02:00:00:00:00:02"})),
            "L3": Subscriber("L3", (), Mode.NOTICE, "fraud", match=parse_match({"circuit_id": "olt1/1/3"}))}


def test_the_list_round_trips_field_by_field(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    entries = listed_entries()
    store.save_list({}, entries, {"entries": 3})
    assert store.load_inputs().listed == entries
    smaller = {k: v for k, v in entries.items() if k != "L2"}
    store.save_list(entries, smaller, {"entries": 2})
    store.close()
    assert Store(str(tmp_path)).load_inputs().listed == smaller


def test_a_list_saved_by_an_earlier_version_is_moved_to_its_columns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before version 2 each entry was one JSON object in ``listed``: read on open, moved, a bad
    row set aside (not the list lost)."""
    entries = listed_entries()
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("CREATE TABLE listed (id TEXT PRIMARY KEY, entry TEXT NOT NULL)")
    db.executemany("INSERT INTO listed VALUES (?, ?)", [(k, json.dumps(v.to_json())) for k, v in entries.items()]
                   + [("BAD", '{"id": "BAD", "addresses": ["300.1.1.1"], "mode": "notice"}')])
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, "walled_garden.store"):
        store = Store(str(tmp_path))
    assert store.load_inputs().listed == entries
    assert any("event=state_migrated table=listed rows=3" in r.getMessage() for r in caplog.records)
    # the old rows stay, for an older version started on this database again (a downgrade)
    assert store.db.execute("SELECT COUNT(*) FROM listed").fetchone()[0] == 3
    assert [r["table"] for r in store.skipped_rows] == ["listed"]
    store.close()
    again = Store(str(tmp_path))
    assert again.load_inputs().listed == entries and again.skipped_rows == []


def _as_an_older_version(path: Path, sql: str, *args: object) -> None:
    """A write by another version: its own connection, no code of ours (the triggers still run)."""
    db = sqlite3.connect(path / "state.sqlite3")
    db.execute(sql, args)
    db.commit()
    db.close()


def test_a_list_an_older_version_saved_after_a_downgrade_is_the_one_in_force_after_the_upgrade_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Upgrade, downgrade to a version before ``list_entries`` (it saves its lists into
    ``listed``, as a diff against what it found there), upgrade again: the list that version
    took is in force, not the one from before the downgrade (which walled again five
    subscribers an operator had approved freeing: upgrade audit). A version between the two
    writes ``list_entries`` and its ``list`` meta only: the stale ``listed`` rows stay unread
    (review: inferring the downgrade from the ``list`` meta brought back the list of before the
    first upgrade)."""
    entries = listed_entries()
    db = sqlite3.connect(tmp_path / "state.sqlite3")   # a version before list_entries: L2 and L3
    db.execute("CREATE TABLE listed (id TEXT PRIMARY KEY, entry TEXT NOT NULL)")
    db.executemany("INSERT INTO listed VALUES (?, ?)", [(k, json.dumps(entries[k].to_json())) for k in ("L2", "L3")])
    db.commit()
    db.close()
    store = Store(str(tmp_path))                           # the upgrade: moved once, then our own list
    assert store.load_inputs().listed == {k: entries[k] for k in ("L2", "L3")}
    store.save_list({k: entries[k] for k in ("L2", "L3")}, entries, {"entries": 3, "loaded_at": 1.5})
    store.close()
    # a version between (list_entries, no triggers): its own list, L1 and L2, and its meta
    _as_an_older_version(tmp_path, "DELETE FROM list_entries WHERE id = 'L3'")
    _as_an_older_version(tmp_path, "INSERT OR REPLACE INTO meta VALUES ('list', ?)",
                         json.dumps({"entries": 2, "loaded_at": 2.0}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "walled_garden.store"):
        assert Store(str(tmp_path)).load_inputs().listed == {k: entries[k] for k in ("L1", "L2")}
    assert not any("state_migrated" in r.getMessage() for r in caplog.records)
    # a version before list_entries: its list is L1 alone, saved its way (a diff against what it
    # found in ``listed``: L2 and L3 of before the first upgrade)
    _as_an_older_version(tmp_path, "DELETE FROM listed")
    _as_an_older_version(tmp_path, "INSERT INTO listed VALUES (?, ?)", "L1", json.dumps(entries["L1"].to_json()))
    _as_an_older_version(tmp_path, "INSERT OR REPLACE INTO meta VALUES ('list', ?)",
                         json.dumps({"entries": 1, "loaded_at": 2.5}))
    with caplog.at_level(logging.WARNING, "walled_garden.store"):
        back = Store(str(tmp_path))
    assert back.load_inputs().listed == {"L1": entries["L1"]}
    assert any("an older version saved the list since" in r.getMessage() for r in caplog.records)
    back.save_list({"L1": entries["L1"]}, entries, {"entries": 3, "loaded_at": 3.5})
    back.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "walled_garden.store"):
        assert Store(str(tmp_path)).load_inputs().listed == entries, "our own later save is kept"
    assert not any("state_migrated" in r.getMessage() for r in caplog.records)
    # that older version again, saving an empty list: empty after the upgrade back too
    _as_an_older_version(tmp_path, "DELETE FROM listed")
    assert Store(str(tmp_path)).load_inputs().listed == {}


def test_state_at_a_restart_shares_the_list_entries_the_kernel_enforced_unchanged(tmp_path: Path) -> None:
    """An enforced row saying what the entry says is that entry's decision (no second copy of its
    addresses, equal to what the policy decides again); any other row is its own subscriber."""
    store = Store(str(tmp_path))
    entries = listed_entries()
    store.save_list({}, entries, {"entries": 3})
    store.save_enforced({"L1": ("walled-garden", ["100.64.1.1/32", "2001:db8:1::/56"], "overdue"),
                         "L2": ("walled-garden", ["100.64.1.2/32"], ""),    # escalated: not the entry's mode
                         "X": ("notice", ["100.64.9.9/32"], "operator"),   # not listed (an operator's)
                         "Y": ("sometimes", ["100.64.9.8/32"], "")}, [])  # a mode that does not read
    inputs, before = store.load_state()
    assert inputs.listed == entries and set(before) == {"L1", "L2", "X"}
    assert before["L1"].subscriber is inputs.listed["L1"]
    assert before["L1"] == inputs.decide("L1", NOW_ANY)
    assert before["L2"].cause == before["X"].cause == "enforced before the restart"
    assert before["L2"].mode is Mode.WALLED_GARDEN and before["L2"].subscriber is not inputs.listed["L2"]
    assert before["L2"].subscriber == Subscriber("L2", (parse_address("100.64.1.2"),), Mode.WALLED_GARDEN, "")
    assert before["X"].subscriber == Subscriber("X", (parse_address("100.64.9.9"),), Mode.NOTICE, "operator")


#: Any instant: the entries above carry no time-dependent rule that changes their decision.
NOW_ANY = 1_800_000_000.0


def test_a_restart_keys_the_listed_by_their_entries_own_id_strings(tmp_path: Path) -> None:
    """The ``listed_since`` and ``enforced`` rows carry a copy of each id: a restart keys them by
    the list entry's own string instead (5.8 MB each at 100k); more rows than one read chunk,
    one of them bad, still load whole and set the bad one aside."""
    store = Store(str(tmp_path))
    entries = {f"S-{i}": Subscriber(f"S-{i}", (parse_address(f"100.64.{i // 250}.{i % 250 + 1}"),),
                                    Mode.WALLED_GARDEN, "overdue") for i in range(4500)}
    store.save_list({}, entries, {"entries": len(entries)}, since={sid: 5.0 for sid in entries})
    store.save_enforced({sid: ("walled-garden", [f"{e.keys[0][2]}/32"], "overdue") for sid, e in entries.items()}, [])
    store.db.execute("INSERT INTO graces VALUES ('B-1', 1.0, 'soon', 'c')")
    store.close()
    store = Store(str(tmp_path))
    inputs, before = store.load_state()
    assert len(inputs.listed) == len(before) == len(inputs.listed_since) == 4500 and inputs.graces == {}
    assert [r["table"] for r in store.skipped_rows] == ["graces"]
    ids = {id(k) for k in inputs.listed}
    assert all(id(k) in ids for k in inputs.listed_since) and all(id(k) in ids for k in before)
    assert all(id(d.subscriber_id) in ids for d in before.values())
