"""Durable state in SQLite under ``state_dir``.

What must survive a reboot (when the kernel's table is gone): the last good list, the
overrides and payment graces the policy reads, the answers to processed webhook ids (so a
retry acts once), and what we enforce (for ``status`` and audits). With these the daemon
restores enforcement at start-up before any source answers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .exemptions import Exemption
from .gc_pause import gc_paused
from .policy import Grace, Override, PolicyInputs, Readdress
from .promises import Promise
from .subscribers import Subscriber

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listed (id TEXT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS overrides (id TEXT PRIMARY KEY, restrict_ INTEGER NOT NULL, at REAL NOT NULL,
    cause TEXT NOT NULL, entry TEXT);
CREATE TABLE IF NOT EXISTS graces (id TEXT PRIMARY KEY, paid_at REAL NOT NULL, until REAL NOT NULL,
    cause TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, received_at REAL NOT NULL,
    status INTEGER NOT NULL, answer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enforced (id TEXT PRIMARY KEY, mode TEXT NOT NULL, addresses TEXT NOT NULL,
    reason TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS readdressed (id TEXT PRIMARY KEY, addresses TEXT NOT NULL, at REAL NOT NULL,
    cause TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_time ON events (received_at);
CREATE TABLE IF NOT EXISTS listed_since (id TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS exemptions (id TEXT NOT NULL, category TEXT NOT NULL, until REAL NOT NULL,
    note TEXT NOT NULL, set_by TEXT NOT NULL, set_at REAL NOT NULL, PRIMARY KEY (id, category));
CREATE TABLE IF NOT EXISTS promises (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, made_at REAL NOT NULL,
    until REAL NOT NULL, outcome TEXT NOT NULL, address TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS promises_by_id ON promises (id, made_at);
-- Append-only: rows are inserted, and deleted only by retention.
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, subscriber TEXT NOT NULL,
    old_mode TEXT NOT NULL, new_mode TEXT NOT NULL, cause TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_subscriber ON audit (subscriber, at);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
-- Newest billing timestamp applied per subscriber and stream (billing_order): late retries stay stale.
CREATE TABLE IF NOT EXISTS billing_order (id TEXT NOT NULL, stream TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (id, stream));
CREATE TABLE IF NOT EXISTS outbox (id TEXT PRIMARY KEY, created REAL NOT NULL, body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '');
"""

#: How long a processed webhook id is remembered; Standard Webhooks retries stop well before.
EVENT_RETENTION = 7 * 86400.0
#: Ids per ``IN (...)`` query (SQLite's default limit on bound parameters is 999 before 3.32).
_IN_CHUNK = 500


@dataclass
class EnforcedWrite:
    """What one kernel change means for the ``enforced`` table and the audit log."""

    rows: dict[str, tuple[str, list[str], str]] = field(default_factory=dict)   # id → (mode, addresses, reason)
    gone: set[str] = field(default_factory=set)
    audit: list[tuple[float, str, str, str, str]] = field(default_factory=list)


class Store:
    def __init__(self, state_dir: str) -> None:
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        self.path = os.path.join(state_dir, "state.sqlite3")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._depth = 0          # nested _transaction()s join the outermost one

    def close(self) -> None:
        self.db.close()

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- policy inputs --------------------------------------------------------------------
    def load_inputs(self) -> PolicyInputs:
        with gc_paused():    # 100k listed entries at start-up: see gc_pause
            return self._load_inputs()

    def _load_inputs(self) -> PolicyInputs:
        listed = {row[0]: Subscriber.from_json(json.loads(row[1]))
                  for row in self.db.execute("SELECT id, entry FROM listed")}
        overrides = {
            row[0]: Override(bool(row[1]), row[2], row[3],
                             Subscriber.from_json(json.loads(row[4])) if row[4] else None)
            for row in self.db.execute("SELECT id, restrict_, at, cause, entry FROM overrides")}
        graces = {row[0]: Grace(row[1], row[2], row[3])
                  for row in self.db.execute("SELECT id, paid_at, until, cause FROM graces")}
        readdressed = {row[0]: Readdress(tuple(ipaddress.ip_network(a) for a in json.loads(row[1])), row[2], row[3])
                       for row in self.db.execute("SELECT id, addresses, at, cause FROM readdressed")}
        exemptions: dict[str, dict[str, Exemption]] = {}
        for row in self.db.execute("SELECT id, category, until, note, set_by, set_at FROM exemptions"):
            exemptions.setdefault(row[0], {})[row[1]] = Exemption(row[1], row[2], row[3], row[4], row[5])
        promises: dict[str, list[Promise]] = {}
        for row in self.db.execute("SELECT id, made_at, until, outcome, address FROM promises ORDER BY id, made_at"):
            promises.setdefault(row[0], []).append(Promise(*row))
        since = dict(self.db.execute("SELECT id, since FROM listed_since").fetchall())
        return PolicyInputs(listed, overrides, graces, readdressed, exemptions, promises, since)

    def save_list(self, old: dict[str, Subscriber], new: dict[str, Subscriber], meta: dict[str, Any],
                  since: dict[str, float] | None = None, changed: set[str] | None = None) -> None:
        """Store a new good list as a diff against the previous one, in one transaction.

        ``changed``: the ids whose entry was added, removed or altered, when the caller has
        computed them already (``policy.apply_list``); otherwise they are computed here."""
        if changed is None:
            changed = set(old.keys() ^ new.keys()) | {s for s in old.keys() & new.keys() if old[s] != new[s]}
        gone = [(sid,) for sid in changed if sid not in new]
        with self._transaction():
            if since is not None:
                self.db.executemany("DELETE FROM listed_since WHERE id = ?", gone)
                self.db.executemany("INSERT OR IGNORE INTO listed_since VALUES (?, ?)",
                                    [(sid, since[sid]) for sid in changed if sid in new and sid in since])
            self.db.executemany("DELETE FROM listed WHERE id = ?", gone)
            self.db.executemany("INSERT OR REPLACE INTO listed (id, entry) VALUES (?, ?)",
                                [(sid, json.dumps(new[sid].to_json())) for sid in changed if sid in new])
            superseded = [(sid,) for sid in changed]
            self.db.executemany("DELETE FROM overrides WHERE id = ?", superseded)
            self.db.executemany("DELETE FROM readdressed WHERE id = ?", superseded)
            self.set_meta("list", meta)

    def save_subscribers(self, inputs: PolicyInputs, ids: Iterable[str]) -> None:
        """Persist these subscribers' overrides, graces, exemptions and promises.

        One statement per table for the whole group (a batch of webhooks touches hundreds of
        subscribers; a statement each cost ~25 µs, a fifth of the daemon's time per event).
        """
        sids = list(dict.fromkeys(ids))
        if not sids:
            return
        keys = [(sid,) for sid in sids]
        overrides = [(sid, inputs.overrides[sid]) for sid in sids if sid in inputs.overrides]
        moved = [(sid, inputs.readdressed[sid]) for sid in sids if sid in inputs.readdressed]
        graces = [(sid, inputs.graces[sid]) for sid in sids if sid in inputs.graces]
        with self._transaction():
            for table in ("overrides", "readdressed", "graces", "exemptions"):
                self.db.executemany(f"DELETE FROM {table} WHERE id = ?", keys)
            self.db.executemany("INSERT INTO overrides VALUES (?, ?, ?, ?, ?)",
                                [(sid, int(o.restrict), o.at, o.cause,
                                  json.dumps(o.subscriber.to_json()) if o.subscriber else None)
                                 for sid, o in overrides])
            self.db.executemany("INSERT INTO readdressed VALUES (?, ?, ?, ?)",
                                [(sid, json.dumps([str(a) for a in m.addresses]), m.at, m.cause) for sid, m in moved])
            self.db.executemany("INSERT INTO graces VALUES (?, ?, ?, ?)",
                                [(sid, g.paid_at, g.until, g.cause) for sid, g in graces])
            self.db.executemany("INSERT INTO exemptions VALUES (?, ?, ?, ?, ?, ?)",
                                [(sid, e.category, e.until, e.note, e.set_by, e.set_at)
                                 for sid in sids for e in inputs.exemptions.get(sid, {}).values()])
            promised = [sid for sid in sids if sid in inputs.promises]
            self.db.executemany("DELETE FROM promises WHERE id = ?", [(sid,) for sid in promised])
            self.db.executemany("INSERT INTO promises (id, made_at, until, outcome, address) VALUES (?, ?, ?, ?, ?)",
                                [(sid, p.made_at, p.until, p.outcome, p.address)
                                 for sid in promised for p in inputs.promises[sid]])

    # -- billing order ------------------------------------------------------------------------
    def billing_order(self) -> list[tuple[str, str, float]]:
        return [(row[0], row[1], float(row[2]))
                for row in self.db.execute("SELECT id, stream, ts FROM billing_order")]

    def save_billing_order(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """Upsert (subscriber, stream, newest billing timestamp) rows; see ``billing_order``."""
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO billing_order (id, stream, ts) VALUES (?, ?, ?)", list(rows))

    # -- webhook ids ----------------------------------------------------------------------
    def event_answer(self, event_id: str) -> tuple[int, dict[str, Any]] | None:
        return self.event_answers([event_id]).get(event_id)

    def event_answers(self, event_ids: Iterable[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """The recorded answers of those ids that were processed before: one query per batch."""
        ids = list(event_ids)
        found: dict[str, tuple[int, dict[str, Any]]] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            sql = f"SELECT event_id, status, answer FROM events WHERE event_id IN ({','.join('?' * len(chunk))})"
            for event_id, status, answer in self.db.execute(sql, chunk):
                found[event_id] = (status, json.loads(answer))
        return found

    def record_events(self, records: list[tuple[str, int, dict[str, Any], str | None]],
                      inputs: PolicyInputs | None) -> None:
        """A batch's answers (and, with ``inputs``, the policy state of the subscribers they
        name), in one commit."""
        now = time.time()
        with self._transaction():
            if inputs is not None:
                self.save_subscribers(inputs, (r[3] for r in records if r[3] is not None))
            self.db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                                [(event_id, now, status, json.dumps(answer)) for event_id, status, answer, _ in records])

    def record_state(self, writes: Iterable[EnforcedWrite], inputs: PolicyInputs | None = None,
                     ids: Iterable[str] = ()) -> None:
        """What kernel changes mean for the ``enforced`` table and the audit log, and the
        policy inputs of ``ids``, in one commit (a webhook batch's whole state)."""
        with self._transaction():
            for write in writes:
                self.save_enforced(write.rows, write.gone)
                self.append_audit(write.audit)
            if inputs is not None:
                self.save_subscribers(inputs, ids)

    def prune_events(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - EVENT_RETENTION
        return self.db.execute("DELETE FROM events WHERE received_at < ?", (cutoff,)).rowcount

    # -- enforcement record ------------------------------------------------------------------
    def save_enforced(self, rows: dict[str, tuple[str, list[str], str]], removed: Iterable[str]) -> None:
        """Upsert ``id → (mode, addresses, reason)`` rows; ``since`` is kept when nothing changed."""
        now = time.time()
        with self._transaction():
            self.db.executemany("DELETE FROM enforced WHERE id = ?", [(sid,) for sid in removed])
            # One statement: "since" only moves when mode, addresses or reason really changed.
            self.db.executemany(
                "INSERT INTO enforced VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET mode = excluded.mode, "
                "addresses = excluded.addresses, reason = excluded.reason, since = excluded.since "
                "WHERE mode != excluded.mode OR addresses != excluded.addresses OR reason != excluded.reason",
                [(sid, mode, json.dumps(addresses), reason, now) for sid, (mode, addresses, reason) in rows.items()])

    def enforced(self) -> dict[str, dict[str, Any]]:
        return {row[0]: {"mode": row[1], "addresses": json.loads(row[2]), "reason": row[3], "since": row[4]}
                for row in self.db.execute("SELECT id, mode, addresses, reason, since FROM enforced")}

    # -- audit log ----------------------------------------------------------------------------
    def append_audit(self, rows: list[tuple[float, str, str, str, str]]) -> None:
        """(at, subscriber, old mode, new mode, cause) rows; never updated afterwards."""
        if rows:
            with self._transaction():
                self.db.executemany("INSERT INTO audit (at, subscriber, old_mode, new_mode, cause) VALUES (?, ?, ?, ?, ?)",
                                    rows)

    def audit(self, subscriber: str | None = None, since: float | None = None, limit: int = 1000
              ) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (optionally of one subscriber, since a time), oldest first.

        Ordered by time, not by insertion: a webhook batch's rows are written after its
        conntrack flush, possibly after a change that happened later."""
        where, args = [], []
        if subscriber:
            where.append("subscriber = ?")
            args.append(subscriber)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        sql = ("SELECT seq, at, subscriber, old_mode, new_mode, cause FROM audit"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at DESC, seq DESC LIMIT ?")
        rows = self.db.execute(sql, (*args, limit)).fetchall()
        return [{"seq": r[0], "at": r[1], "subscriber": r[2], "old": r[3], "new": r[4], "cause": r[5]}
                for r in reversed(rows)]

    def prune_audit(self, before: float) -> int:
        with self._transaction():
            return self.db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount

    # -- outgoing webhooks ----------------------------------------------------------------------
    def add_outbox(self, message_id: str, body: dict[str, Any], now: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO outbox (id, created, body, next_at) VALUES (?, ?, ?, ?)",
                        (message_id, now, json.dumps(body), now))

    def outbox_due(self, now: float, limit: int = 50) -> list[tuple[str, float, dict[str, Any], int]]:
        rows = self.db.execute("SELECT id, created, body, attempts FROM outbox WHERE next_at <= ? ORDER BY next_at "
                               "LIMIT ?", (now, limit)).fetchall()
        return [(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    def outbox_next(self) -> float | None:
        row = self.db.execute("SELECT MIN(next_at) FROM outbox").fetchone()
        return row[0] if row else None

    def outbox_size(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def outbox_delivered(self, message_id: str) -> None:
        self.db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def outbox_failed(self, message_id: str, next_at: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
                        (next_at, error[:500], message_id))

    def _transaction(self) -> "_Tx":
        return _Tx(self)


class _Tx:
    """``BEGIN IMMEDIATE``/``COMMIT`` (autocommit connection), rolled back on error.

    Nested uses join the outermost transaction, so a batch's writes compose from the
    single-purpose methods and still cost one commit (~0.4 ms in WAL mode)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> None:
        if self.store._depth == 0:
            self.store.db.execute("BEGIN IMMEDIATE")
        self.store._depth += 1

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.store._depth -= 1
        if self.store._depth == 0:
            self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
