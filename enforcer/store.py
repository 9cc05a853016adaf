"""Durable state in SQLite under ``state_dir``.

What must survive a reboot (when the kernel's table is gone): the last good list, the
overrides and payment graces the policy reads, the answers to processed webhook ids (so a
retry acts once), and what we enforce (for ``status`` and audits). With these the daemon
restores enforcement at start-up before any source answers.

Faults (docs/reference.md, Safety rules 6: the daemon starts whenever it can enforce):

- **A database SQLite cannot use** (not a database, truncated, malformed pages, a failed
  ``PRAGMA quick_check``, one of our tables with other columns, a path that cannot be
  opened) is *moved aside* with its ``-wal``/``-shm`` files to ``state.sqlite3.corrupt-<UTC
  time>`` (kept for inspection, never deleted: ``sqlite3`` opens it with its WAL), reported
  (``event=state_quarantined`` at error level, ``Store.quarantined``, the gauge
  ``walled_garden_state_quarantined_databases`` while such files are kept) and a fresh, empty
  store is used. The daemon then rebuilds enforcement from the kernel and the list.
- **A single row that does not decode** (bad JSON, a wrong type, an invalid address or mode)
  is *skipped and reported*, not the whole database: it is moved to the ``quarantined_rows``
  table of the same database (kept for inspection), logged (``event=state_row_quarantined``)
  and listed in ``Store.skipped_rows``. Quarantining the whole file for one bad grace would
  cost every other subscriber's grace, override and exemption; skipping costs that one row.
- **A transient error** (``database is locked``, disk I/O, a full disk, a read-only file
  system) while the database is in use raises ``StoreError`` (also a ``sqlite3.Error``),
  naming the operation; nothing is quarantined for it. A write that fails changes nothing
  (each write is one transaction). ``Store.write_fault`` lets tests make writes fail.

Threads: the store is called from the event loop's thread (answers to webhook ids, the audit
log, the outbox, small writes) and from ``asyncio.to_thread`` workers (a 100k-row list save,
the enforcement record after a full sync). Each thread gets **its own connection**, opened on
its first call with the same settings (WAL, ``synchronous=NORMAL``, ``BUSY_TIMEOUT``), and
``close()`` closes them all. Chosen over one owner thread running every call because WAL lets
readers and the writer proceed together: while a worker saves a 100k-entry list (2–3 s on a
2-core VM, ``tests/bench/bench_store.py``), the loop's small reads (a webhook id's answer,
``status``, the outbox) read the last commit on their own connection instead of queueing behind
the save, and no call has to become a message to another thread. Writes are serialised by one
writer lock (``threading.Lock``): a write method is one transaction (``BEGIN IMMEDIATE`` …
``COMMIT``) taken on the calling thread's connection under that lock, and write methods called
inside it join it, counted per thread. So a write can only join a transaction of its own
thread; a write on another thread waits for the lock (at most ``BUSY_TIMEOUT``, then
``StoreError`` "database is locked") and commits or fails on its own. (A write on the loop's
thread blocks the loop while it waits; the daemon's writes that could meet a list save are
serialised by its own lock, so such waits are rare.) A thread sees its own transaction's
writes; other threads see the last commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .exemptions import Exemption
from .gc_pause import gc_paused
from .match import NO_MATCH, Match
from .model import Mode
from .policy import LISTED, Decision, Grace, Origin, Override, PolicyInputs, Readdress
from .promises import Promise
from .sessions.book import SessionBook
from .sessions.session import Session, SessionId
from .subscribers import Subscriber, parse_network, saved_key

log = logging.getLogger("walled_garden.store")

#: Meta key: the ``listed`` rows of an earlier version have been copied to ``list_entries``.
LISTED_MIGRATED = "listed_migrated"
#: Meta key set by a trigger of the database itself whenever ``listed`` is written: only a version
#: before ``list_entries`` writes it (this one reads it once), so it marks a downgrade to such a
#: version that saved its list, which an upgrade back must take.
LISTED_WRITTEN = "listed_written"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Before version 2 of the list's rows: one JSON object per entry. Read into list_entries on the
-- first open (``_migrate_listed``) and kept as it was, for a downgrade; never written by us. The
-- triggers (run by whichever version writes the table) mark that a version before list_entries
-- saved its list into it since.
CREATE TABLE IF NOT EXISTS listed (id TEXT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS listed_inserted AFTER INSERT ON listed
    BEGIN INSERT OR REPLACE INTO meta (key, value) VALUES ('listed_written', 'true'); END;
CREATE TRIGGER IF NOT EXISTS listed_updated AFTER UPDATE ON listed
    BEGIN INSERT OR REPLACE INTO meta (key, value) VALUES ('listed_written', 'true'); END;
CREATE TRIGGER IF NOT EXISTS listed_deleted AFTER DELETE ON listed
    BEGIN INSERT OR REPLACE INTO meta (key, value) VALUES ('listed_written', 'true'); END;
-- The list in force, one column per field: read back in bulk at every start (no JSON object
-- per row), ``addresses`` spelt exactly as ``enforced.addresses`` (``Subscriber.address_texts``, as
-- JSON) so the two compare as text.
CREATE TABLE IF NOT EXISTS list_entries (id TEXT PRIMARY KEY, addresses TEXT NOT NULL, mode TEXT NOT NULL,
    reason TEXT NOT NULL, exempt_until REAL, exempt_category TEXT NOT NULL, match TEXT);
CREATE TABLE IF NOT EXISTS overrides (id TEXT PRIMARY KEY, restrict_ INTEGER NOT NULL, at REAL NOT NULL,
    cause TEXT NOT NULL, entry TEXT, origin TEXT NOT NULL DEFAULT 'billing');
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
-- Current sessions (sessions.book): addresses that follow subscribers, reconciled with the
-- lease files on start.
CREATE TABLE IF NOT EXISTS sessions (source TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (source, key));
-- Rows that did not decode, moved here from their table (module docstring); never read back.
CREATE TABLE IF NOT EXISTS quarantined_rows (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    source TEXT NOT NULL, row TEXT NOT NULL, error TEXT NOT NULL);
"""

#: How long a processed webhook id is remembered; Standard Webhooks retries stop well before.
EVENT_RETENTION = 7 * 86400.0
#: Ids per ``IN (...)`` query (SQLite's default limit on bound parameters is 999 before 3.32).
_IN_CHUNK = 500
#: The file name in ``state_dir``; a quarantined one is ``<name>.corrupt-<UTC time>[-n]``.
DB_NAME = "state.sqlite3"
_QUARANTINED = re.compile(re.escape(DB_NAME) + r"\.corrupt-\d{8}T\d{6}Z(?:-\d+)?")
#: SQLite result codes (primary, ``code & 0xff``) that say "not now" rather than "not a usable
#: database": opening fails with these → ``StoreError`` (systemd retries), never quarantine.
TRANSIENT = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                       sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_INTERRUPT,
                       sqlite3.SQLITE_PERM})
#: WAL pages (4 KiB) after which a commit copies the log back into the database itself. With
#: SQLite's default (1,000) a commit every few seconds did that inside the write path: a
#: session or event batch then took 50 ms instead of 10 (measured at 1,000 changes/s). The
#: ``Checkpoints`` duty does it beside the writes every second; this is the safety net.
AUTOCHECKPOINT_PAGES = 16_384
#: Seconds between those checkpoints.
CHECKPOINT_SECONDS = 1.0
#: How long a statement waits for another connection's lock before ``database is locked``.
BUSY_TIMEOUT = 5.0
#: Rows listed in ``Store.skipped_rows`` (the table keeps them all).
SKIPPED_KEPT = 100
#: Rows logged one by one per table read; the rest are summed up in one line.
LOGGED_ROWS = 10
#: What a row's decoding may raise when the row is not what we wrote.
_UNDECODABLE = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)

F = TypeVar("F", bound=Callable[..., Any])


def _override(sid: str, restrict: Any, at: Any, cause: Any, entry: str | None, origin: Any
              ) -> tuple[str, Override]:
    if restrict not in (0, 1) or type(restrict) is not int:
        raise TypeError(f"restrict_: expected 0 or 1, got {restrict!r}")
    return _text(sid), Override(bool(restrict), _real(at), _text(cause),
                                _subscriber(sid, entry) if entry is not None else None, Origin(origin))


def _exemption(sid: str, category: str, until: Any, note: str, set_by: str, set_at: Any) -> tuple[str, Exemption]:
    return _text(sid), Exemption(_text(category), _real(until), _text(note), _text(set_by), _real(set_at))


def _promise(sid: str, made_at: Any, until: Any, outcome: str, address: str) -> Promise:
    return Promise(_text(sid), _real(made_at), _real(until), _text(outcome), _text(address))


#: The ``events`` table's ``status`` column: every stored answer is one a retry gets again as
#: done (applied or ignored), the only kind worth keeping; refusals are weighed again.
_DONE = 200


def _event_answer(event_id: str, status: Any, answer: str) -> tuple[str, dict[str, Any]]:
    if status != _DONE or type(status) is not int:
        raise TypeError(f"status: expected {_DONE}, got {status!r}")
    body = json.loads(answer)
    if not isinstance(body, dict):
        raise TypeError(f"answer: expected an object, got {body!r}")
    return _text(event_id), body


def _enforced(sid: str, mode: str, addresses: str, reason: str, since: Any) -> tuple[str, dict[str, Any]]:
    items = json.loads(addresses)
    if not isinstance(items, list):
        raise TypeError(f"addresses: expected a list, got {items!r}")
    return _text(sid), {"mode": _text(mode), "addresses": [_text(a) for a in items], "reason": _text(reason),
                        "since": _real(since)}


def _outbox_row(message_id: str, created: Any, body: str, attempts: Any) -> tuple[str, float, dict[str, Any], int]:
    data = json.loads(body)
    if not isinstance(data, dict) or type(attempts) is not int:
        raise TypeError(f"expected an object body and integer attempts, got {data!r}, {attempts!r}")
    return _text(message_id), _real(created), data, attempts


#: Columns added to a table after it was first released: a database of an earlier version has
#: the table without them (and no others), and gets them on open (``_migrate``).
ADDED_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # Who gave an override. Earlier databases said so only in the cause text ("operator <user>:
    # ..."), so their rows are read that way once, when the column is added.
    "overrides": (("origin", "TEXT NOT NULL DEFAULT 'billing'",
                   "UPDATE overrides SET origin = 'operator' WHERE cause LIKE 'operator %'"),),
}


def _migrate(db: sqlite3.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        for name, definition, backfill in columns:
            if found and name not in found:
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
                    db.execute(backfill)
                log.warning("event=state_migrated table=%s column=%s", table, name)


def _check_columns(db: sqlite3.Connection) -> None:
    """Each of our tables that exists has exactly our columns, in our order (the inserts are
    positional), or those of an earlier version (``ADDED_COLUMNS``): anything else is a
    database written by something else, or damaged."""
    expected = sqlite3.connect(":memory:")
    try:
        expected.executescript(SCHEMA)
        tables = [row[0] for row in expected.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                     "AND name NOT LIKE 'sqlite_%'")]
        for table in tables:
            found = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            want = [row[1] for row in expected.execute(f"PRAGMA table_info({table})")]
            earlier = want[:len(want) - len(ADDED_COLUMNS.get(table, ()))]
            if found and found not in (want, earlier):
                raise Unusable(f"table {table} has columns {found}, expected {want}")
    finally:
        expected.close()


class StoreError(sqlite3.Error):
    """The state database could not be read or written just now (locked, disk I/O, full).

    A ``sqlite3.Error`` too, so handlers written for SQLite's own errors still catch it; new
    code catches ``StoreError``. ``operation`` names the store method that failed."""

    def __init__(self, operation: str, cause: BaseException | str) -> None:
        super().__init__(f"state database: {operation} failed: {cause}")
        self.operation = operation


class Unusable(Exception):
    """The database file is not one we can use (quarantined, see the module docstring)."""


def _guarded(method: F, injectable: bool, name: str | None = None) -> F:
    """SQLite errors of ``method`` become ``StoreError`` naming it (or ``name``: the public
    method a private one does the SQL of).

    With ``injectable`` (a write), ``method`` runs inside ``Store._transaction`` (its own
    transaction, or its thread's open one) and ``Store.write_fault`` is asked first, inside
    that transaction (fault injection for tests: it rolls back what the batch wrote)."""
    name = name or method.__name__

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._calling():
                if not injectable:
                    return method(self, *args, **kwargs)
                with self._transaction():
                    if self.write_fault is not None:
                        self.write_fault(name)
                    return method(self, *args, **kwargs)
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(name, exc) from exc
    return wrapper  # type: ignore[return-value]


def _reads(method: F) -> F:
    return _guarded(method, injectable=False)


def _writes(method: F) -> F:
    return _guarded(method, injectable=True)


def _writes_as(name: str) -> Callable[[F], F]:
    """``_writes`` for the SQL part of the public write ``name`` (errors and faults are its)."""
    return lambda method: _guarded(method, injectable=True, name=name)


def _streamed(cursor: sqlite3.Cursor, size: int = 2000) -> Iterator[Any]:
    """A query's rows a chunk at a time: ``fetchall`` of 100k rows put them all in memory at once
    beside what is built from them, and the heap kept that peak (issue 16: RSS after a restart)."""
    while rows := cursor.fetchmany(size):
        yield from rows


def _real(value: Any) -> float:
    """A stored instant or number: int or float (not bool, not NaN), else the row is bad."""
    if type(value) not in (int, float) or math.isnan(value):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected text, got {value!r}")
    return value


def _subscriber(sid: str, entry: str) -> Subscriber:
    data = json.loads(entry)
    if not isinstance(data, dict) or data.get("id") != sid:
        raise ValueError(f"entry is not subscriber {sid!r}'s")
    subscriber = Subscriber.from_json(data)
    if subscriber.exempt_until is not None:
        _real(subscriber.exempt_until)
    _text(subscriber.reason)
    return subscriber


#: Modes by their stored text (``Mode(text)`` per row costs more than the rest of a row's decoding).
_MODES: dict[str, Mode] = {mode.value: mode for mode in Mode}


def _address_list(text: Any) -> list[Any]:
    """``json.loads`` of stored addresses (``_list_row``); the usual spelling (no escapes) is split rather
    than decoded, a fifth of a list entry's reading."""
    if type(text) is str and text.startswith('["') and text.endswith('"]') and "\\" not in text:
        return text[2:-2].split('", "')
    items = json.loads(text)
    if type(items) is not list:
        raise TypeError(f"addresses: expected a list, got {items!r}")
    return items


def _list_entry(sid: Any, addresses: Any, mode: Any, reason: Any, exempt_until: Any, category: Any,
                match: Any) -> tuple[str, Subscriber]:
    """A ``list_entries`` row: (id, the entry)."""
    items = _address_list(addresses)
    matched = NO_MATCH
    if match is not None:
        keys = json.loads(match)
        if not isinstance(keys, dict):
            raise TypeError(f"match: expected an object, got {keys!r}")
        matched = Match.from_json(keys)
    subscriber = Subscriber.from_keys(_text(sid), tuple(saved_key(_text(a)) for a in items), _MODES[mode],
                                      _text(reason), None if exempt_until is None else _real(exempt_until),
                                      _text(category), matched)
    return sid, subscriber


#: A ``list_entries`` row as written.
ListRow = tuple[str, str, str, str, float | None, str, str | None]


def _list_row(subscriber: Subscriber) -> ListRow:
    """``_list_entry``'s inverse."""
    s = subscriber
    return (s.id, json.dumps(s.address_texts()), s.mode.value, s.reason, s.exempt_until or None,
            s.exempt_category if s.exempt_until else "", json.dumps(s.match.to_json()) if s.match else None)


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    items = json.loads(text)
    if not isinstance(items, list):
        raise TypeError(f"expected a list of addresses, got {items!r}")
    return tuple(ipaddress.ip_network(_text(a)) for a in items)


@dataclass
class EnforcedWrite:
    """What one kernel change means for the ``enforced`` table and the audit log."""

    rows: dict[str, tuple[str, list[str], str]] = field(default_factory=dict)   # id → (mode, addresses, reason)
    gone: set[str] = field(default_factory=set)
    audit: list[tuple[float, str, str, str, str]] = field(default_factory=list)


class Store:
    def __init__(self, state_dir: str, clock: Callable[[], float] = time.time) -> None:
        """Open (or create) ``state_dir``/state.sqlite3; an unusable one is quarantined and a
        fresh one used (module docstring). Raises ``StoreError`` only when no database can
        be used now (a transient error, or the unusable file cannot be moved aside)."""
        Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DB_NAME)
        self.clock = clock
        #: This thread's connection (``db``) and transaction depth (``depth``), see ``_Tx``.
        self._local = threading.local()
        #: Held by the thread whose transaction is open (module docstring).
        self._write_lock = threading.Lock()
        #: Every connection opened and not yet closed, with its thread (for ``close()``).
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        #: Store calls running, per thread ident: ``close()`` waits for other threads' (``_calling``).
        self._busy: dict[int, int] = {}
        self._calls = threading.Condition()
        self._closing = False
        #: Set when this start moved an unusable database aside: ``{"path", "reason", "at"}``.
        self.quarantined: dict[str, Any] | None = None
        #: Rows moved to ``quarantined_rows`` by this process (the first ``SKIPPED_KEPT``).
        self.skipped_rows: list[dict[str, Any]] = []
        self.skipped_count = 0
        #: Called with the operation's name before each write; tests raise a ``sqlite3.Error``
        #: in it to make that write fail as a full or failing disk would.
        self.write_fault: Callable[[str], None] | None = None
        try:
            db = self._open()
        except Unusable as exc:
            self._quarantine(str(exc))
            try:
                db = self._open()
            except Unusable as again:
                raise StoreError("open", f"a fresh database is not usable either: {again}") from again
        self._adopt(db)
        try:
            self._migrate_listed()
        except sqlite3.Error as exc:
            raise StoreError("open", exc) from exc

    @property
    def db(self) -> sqlite3.Connection:
        """The calling thread's connection (opened on its first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        return db if db is not None else self._connect()

    def _connect(self) -> sqlite3.Connection:
        """A connection for this thread, set up as ``_open``'s (WAL is a property of the file).

        ``mode=rw``: a database removed while the daemon runs is an error, not a new empty one."""
        if self._closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        db = sqlite3.connect(f"{Path(self.path).resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT,
                             isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        except sqlite3.Error:
            db.close()
            raise
        self._adopt(db)
        return db

    def _adopt(self, db: sqlite3.Connection) -> None:
        """Make ``db`` this thread's connection; close those of threads that have ended (a
        connection is used only by its own thread, so nobody else holds them)."""
        me = threading.current_thread()
        with self._connections_lock:
            ended = [c for t, c in self._connections if not t.is_alive()]
            self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
            self._connections.append((me, db))
        for old in ended:
            old.close()
        self._local.db = db
        self._local.depth = 0

    def _open(self) -> sqlite3.Connection:
        """Check an existing file read-only (integrity, our tables' columns), then connect
        and create what is missing.

        Read-only first: closing the last read-write connection checkpoints the WAL into the
        file and deletes it, which must not happen to a database about to be kept for
        inspection."""
        db: sqlite3.Connection | None = None
        try:
            if os.path.lexists(self.path):
                if not os.path.isfile(self.path):
                    raise Unusable("not a regular file")
                db = sqlite3.connect(f"{Path(self.path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
                # quick_check reads every page of every table and index (integrity_check also
                # matches each index against its table: 5x the time, 0.2 s of a restart at 100k
                # subscribers, growing with the audit log). An index whose entries no longer match
                # its table fails the queries that use it, as a transient error would.
                problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise Unusable(("quick_check: " + "; ".join(problems).replace("\n", "; "))[:500])
                _check_columns(db)
                db.close()
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            _migrate(db)
            db.executescript(SCHEMA)
            return db
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in TRANSIENT:
                raise StoreError("open", exc) from exc
            raise Unusable(f"{type(exc).__name__}: {exc}") from exc
        except Unusable:
            if db is not None:
                db.close()
            raise

    def _quarantine(self, reason: str) -> None:
        """Move the unusable database and its companions aside, never deleting anything."""
        at = self.clock()
        target = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at))}"
        n = 0
        while any(os.path.lexists(target + suffix) for suffix in ("", "-wal", "-shm", "-journal")):
            n += 1
            target = f"{target.rsplit('Z', 1)[0]}Z-{n}"
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.lexists(self.path + suffix):
                    os.rename(self.path + suffix, target + suffix)
        except OSError as exc:
            raise StoreError("open", f"{self.path} is unusable ({reason}) and could not be moved aside: {exc}") from exc
        self.quarantined = {"path": target, "reason": reason, "at": at}
        log.error("event=state_quarantined path=%s moved_to=%s reason=%r (kept for inspection; a fresh state is "
                  "used and enforcement is rebuilt from the kernel and the list)", self.path, target, reason)

    def quarantined_files(self) -> list[str]:
        """Quarantined databases kept in ``state_dir`` (this start's and earlier ones)."""
        try:
            names = os.listdir(self.state_dir)
        except OSError:
            return []
        return sorted(os.path.join(self.state_dir, n) for n in names if _QUARANTINED.fullmatch(n))

    @_reads
    def quarantined_row_count(self) -> int:
        """Rows in ``quarantined_rows`` (set aside by this or an earlier start)."""
        return int(self.db.execute("SELECT COUNT(*) FROM quarantined_rows").fetchone()[0])

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """Count a store call running on this thread (``close`` waits for them)."""
        ident = threading.get_ident()
        with self._calls:
            if self._closing:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            self._busy[ident] = self._busy.get(ident, 0) + 1
        try:
            yield
        finally:
            with self._calls:
                left = self._busy.pop(ident) - 1
                if left:
                    self._busy[ident] = left
                else:
                    self._calls.notify_all()

    def close(self) -> None:
        """Close every thread's connection. A write transaction or any other store call still
        running on a worker thread (a shutdown while a read or a WAL checkpoint runs in
        ``asyncio.to_thread``) is waited for, at most ``BUSY_TIMEOUT``: closing a connection
        another thread is using crashes the interpreter (seen in the chaos test, and once in
        libsqlite3 at a SIGTERM). A connection still in use after that is left open (the
        process is ending). Later calls fail (``StoreError``), as on a closed connection."""
        me = threading.get_ident()
        with self._calls:   # no call starts from now on; those running end first
            self._closing = True
            self._calls.wait_for(lambda: not self._busy.keys() - {me}, timeout=BUSY_TIMEOUT)
            busy = set(self._busy) - {me}
        idle = self._write_lock.acquire(timeout=0 if busy else BUSY_TIMEOUT)
        try:
            with self._connections_lock:
                self._closed = True
                connections, self._connections = self._connections, []
            for thread, db in connections:
                if thread.ident in busy:
                    log.error("event=state_close_busy thread=%s (a store call still runs: its connection is left "
                              "open)", thread.name)
                    continue
                db.close()
        finally:
            if idle:
                self._write_lock.release()

    def checkpoint(self) -> None:
        """Copy the write-ahead log back into the database without waiting for (or blocking)
        writers (``PRAGMA wal_checkpoint(PASSIVE)``), on this thread's own connection."""
        try:
            with self._calling():
                self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:   # the next one tries again; the autocheckpoint is the net
            log.warning("event=wal_checkpoint_failed error=%r", str(exc))

    def connection_count(self) -> int:
        """Connections open now (one per thread that has used the store and is alive)."""
        with self._connections_lock:
            return len(self._connections)

    # -- rows that do not decode ----------------------------------------------------------------
    def _decoded(self, table: str, columns: str, decode: Callable[..., Any], where: str = "",
                 args: Iterable[Any] = ()) -> Iterator[Any]:
        """``decode(*row)`` of each row; rows it refuses are set aside (module docstring)."""
        bad: list[tuple[int, tuple[Any, ...], BaseException]] = []
        for rowid, *row in _streamed(self.db.execute(f"SELECT rowid, {columns} FROM {table} {where}", tuple(args))):
            try:
                yield decode(*row)
            except _UNDECODABLE as exc:
                bad.append((rowid, tuple(row), exc))
        if bad:
            self._set_aside(table, columns, bad)

    def _set_aside(self, table: str, columns: str, bad: list[tuple[int, tuple[Any, ...], BaseException]]) -> None:
        now = self.clock()
        names = [c.strip() for c in columns.split(",")]
        records = []
        for rowid, row, exc in bad:
            text = json.dumps(dict(zip(names, row, strict=True)), default=repr)
            error = f"{type(exc).__name__}: {exc}"[:500]
            records.append((now, table, text, error, rowid))
            self.skipped_count += 1
            if len(self.skipped_rows) < SKIPPED_KEPT:
                self.skipped_rows.append({"table": table, "row": text[:500], "error": error, "at": now})
            if len(records) <= LOGGED_ROWS:
                log.error("event=state_row_quarantined table=%s row=%r error=%r (skipped; kept in quarantined_rows)",
                          table, text[:500], error)
        if len(records) > LOGGED_ROWS:
            log.error("event=state_rows_quarantined table=%s rows=%d (the first %d logged above; all kept in "
                      "quarantined_rows)", table, len(records), LOGGED_ROWS)
        try:
            with self._transaction():
                self.db.executemany("INSERT INTO quarantined_rows (at, source, row, error) VALUES (?, ?, ?, ?)",
                                    [r[:4] for r in records])
                self.db.executemany(f"DELETE FROM {table} WHERE rowid = ?", [(r[4],) for r in records])
        except sqlite3.Error as exc:   # skipped all the same; set aside on the next read
            log.error("event=state_row_quarantine_failed table=%s rows=%d error=%r", table, len(records), str(exc))

    # -- meta ---------------------------------------------------------------------------
    @_reads
    def get_meta(self, key: str) -> Any:
        for value in self._decoded("meta", "value", json.loads, "WHERE key = ?", (key,)):
            return value
        return None

    @_writes
    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- policy inputs --------------------------------------------------------------------
    @_reads
    def load_inputs(self) -> PolicyInputs:
        with gc_paused():    # 100k listed entries at start-up: see gc_pause
            return self._load_inputs()

    @_reads
    def load_state(self) -> tuple[PolicyInputs, dict[str, Decision]]:
        """The policy inputs, and what the kernel enforced before this start (the ``enforced``
        table) as decisions, in one read (a restart: the kernel's table is reconciled with them).

        An enforced row that says exactly what the subscriber's list entry says (mode, reason,
        the addresses as text, as stored: ``_load_inputs`` hands over the entries' texts) becomes
        that entry's own decision (``LISTED``, the entry's ``Subscriber`` object): no second
        parse of 125k addresses, and a decision that has not changed since compares equal, so its
        row is not written again. Other rows are decided "enforced before the restart" with a
        subscriber of their own. A row whose mode or address no longer reads is left out
        (enforced as the policy decides now). The comparison is a dict lookup per row, not SQL's
        correlated ``EXISTS`` (0.27 s of a 100k restart)."""
        with gc_paused():
            texts: dict[str, str] = {}
            inputs = self._load_inputs(texts)
            listed = inputs.listed
            before: dict[str, Decision] = {}
            unread: list[Any] = []   # the other rows (and any whose entry did not read): decoded alone
            for sid, mode, addresses, reason, since in _streamed(self.db.execute(
                    "SELECT id, mode, addresses, reason, since FROM enforced")):
                entry = listed.get(sid)
                if (entry is None or texts.get(sid) != addresses or entry.mode.value != mode
                        or entry.reason != reason or type(since) not in (int, float)):
                    unread.append(sid)
                else:   # keyed by the entry's own id: this row's copy of it (100k strings) is let go
                    before[entry.id] = Decision(entry.id, entry.mode, LISTED, entry)
            del texts

            def decode(sid: Any, mode: Any, addresses: Any, reason: Any, since: Any) -> None:
                _, row = _enforced(sid, mode, addresses, reason, since)
                try:
                    subscriber = Subscriber(sid, tuple(parse_network(a) for a in row["addresses"]),
                                            Mode(row["mode"]), row["reason"])
                except ValueError:
                    return
                before[sid] = Decision(sid, subscriber.mode, "enforced before the restart", subscriber)

            for start in range(0, len(unread), _IN_CHUNK):
                chunk = unread[start:start + _IN_CHUNK]
                for _ in self._decoded("enforced", "id, mode, addresses, reason, since", decode,
                                       f"WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    pass
            return inputs, before

    def _load_inputs(self, texts: dict[str, str] | None = None) -> PolicyInputs:
        """``texts``, when given, receives each list entry's saved addresses text as stored
        (``load_state`` compares the ``enforced`` rows with them)."""
        listed = self._list_entries(texts)
        overrides = dict(self._decoded("overrides", "id, restrict_, at, cause, entry, origin", _override))
        graces = dict(self._decoded("graces", "id, paid_at, until, cause", lambda sid, paid, until, cause: (
            _text(sid), Grace(_real(paid), _real(until), _text(cause)))))
        readdressed = dict(self._decoded("readdressed", "id, addresses, at, cause", lambda sid, text, at, cause: (
            _text(sid), Readdress(_networks(text), _real(at), _text(cause)))))
        exemptions: dict[str, dict[str, Exemption]] = {}
        for sid, exemption in self._decoded("exemptions", "id, category, until, note, set_by, set_at", _exemption):
            exemptions.setdefault(sid, {})[exemption.category] = exemption
        promises: dict[str, list[Promise]] = {}
        for promise in self._decoded("promises", "id, made_at, until, outcome, address", _promise,
                                     "ORDER BY id, made_at"):
            promises.setdefault(promise.subscriber_id, []).append(promise)
        since = self._listed_since(listed)
        sessions = SessionBook(self._decoded("sessions", "body", lambda body: Session.from_json(json.loads(body))))
        return PolicyInputs(listed, overrides, graces, readdressed, exemptions, promises, since, sessions=sessions)

    def _list_entries(self, texts: dict[str, str] | None) -> dict[str, Subscriber]:
        """The ``list_entries`` rows (100k at a restart): the usual row (no match keys, no
        exemption, addresses in ``_list_row``'s own spelling) decoded inline, any other through
        ``_list_entry``, as ``_decoded`` would (a third of the state load was the calls per row
        that path makes). A row neither decodes is set aside (module docstring)."""
        columns = "id, addresses, mode, reason, exempt_until, exempt_category, match"
        listed: dict[str, Subscriber] = {}
        bad: list[tuple[int, tuple[Any, ...], BaseException]] = []
        modes, key, entry_of = _MODES, saved_key, Subscriber.from_keys
        for rowid, sid, addresses, mode, reason, until, category, match in _streamed(
                self.db.execute(f"SELECT rowid, {columns} FROM list_entries")):
            try:
                if (match is None and until is None and type(sid) is str and type(reason) is str
                        and type(category) is str and type(addresses) is str and addresses[:2] == '["'
                        and addresses[-2:] == '"]' and "\\" not in addresses):
                    entry = entry_of(sid, tuple(map(key, addresses[2:-2].split('", "'))), modes[mode], reason,
                                     None, category)
                else:
                    sid, entry = _list_entry(sid, addresses, mode, reason, until, category, match)
            except _UNDECODABLE as exc:
                bad.append((rowid, (sid, addresses, mode, reason, until, category, match), exc))
                continue
            listed[sid] = entry
            if texts is not None:
                texts[sid] = addresses
        if bad:
            self._set_aside("list_entries", columns, bad)
        return listed

    def _listed_since(self, listed: Mapping[str, Subscriber]) -> dict[str, float]:
        """``listed_since`` (100k rows): taken whole when every row is (text, float), as written;
        otherwise row by row, setting aside those that do not decode. Each listed subscriber's
        row is keyed by the entry's own id string, not the row's copy of it (5.8 MB at 100k)."""
        since: dict[str, float] = {}
        for sid, at in _streamed(self.db.execute("SELECT id, since FROM listed_since")):
            if type(sid) is not str or type(at) is not float:
                break
            since[entry.id if (entry := listed.get(sid)) is not None else sid] = at
        else:
            return since
        return dict(self._decoded("listed_since", "id, since", lambda sid, at: (_text(sid), _real(at))))

    def _migrate_listed(self) -> None:
        """Rows of the list in the ``listed`` table (one JSON object each, before version 2) are
        copied to ``list_entries``, replacing what is there: on the first open after the upgrade
        (no ``listed_migrated`` meta), and after a downgrade to such a version that saved a list
        and an upgrade back (``LISTED_WRITTEN``, set by the table's triggers, even when it saved
        an empty list): the list it took, perhaps approved by an operator, is the one in force,
        not the one before the downgrade, which would wall again whom it freed (upgrade audit). A
        version between the two (``list_entries`` but no triggers) writes ``list_entries`` itself
        and leaves ``listed`` alone, so nothing is copied after it (review: inferring it from the
        ``list`` meta brought back the list of before the first upgrade). A row that does not
        decode is set aside as any other. The old rows stay: an older version started on this
        database again finds the list it knew rather than none, which would free everyone it
        restricted until an operator approved the list again (found in review)."""
        again = self.get_meta(LISTED_WRITTEN) is not None
        if self.get_meta(LISTED_MIGRATED) is not None and not again:
            return
        if not again and self.db.execute("SELECT 1 FROM listed LIMIT 1").fetchone() is None:
            return
        with gc_paused():
            rows = [_list_row(entry) for _, entry in self._decoded(
                "listed", "id, entry", lambda sid, entry: (_text(sid), _subscriber(sid, entry)))]
        with self._transaction():
            self.db.execute("DELETE FROM list_entries")
            self.db.executemany("INSERT OR REPLACE INTO list_entries VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.set_meta(LISTED_MIGRATED, {"rows": len(rows)})
            self.db.execute("DELETE FROM meta WHERE key = ?", (LISTED_WRITTEN,))
        log.warning("event=state_migrated table=listed rows=%d to=list_entries%s", len(rows),
                    " cause=\"an older version saved the list since this one did\"" if again else "")

    def save_list(self, old: dict[str, Subscriber], new: dict[str, Subscriber], meta: dict[str, Any],
                  since: dict[str, float] | None = None, changed: set[str] | None = None) -> None:
        """Store a new good list as a diff against the previous one, in one transaction.

        ``changed``: the ids whose entry was added, removed or altered, when the caller has
        computed them already (``policy.apply_list``); otherwise they are computed here."""
        if changed is None:
            changed = set(old.keys() ^ new.keys()) | {s for s in old.keys() & new.keys() if old[s] != new[s]}
        gone = [(sid,) for sid in changed if sid not in new]
        # Encoded before the transaction: the writer lock (module docstring) is held for the SQL
        # only, not for the text of 100k entries that other threads' writes need not wait for.
        entries = [_list_row(new[sid]) for sid in changed if sid in new]
        started = None if since is None else [(sid, since[sid]) for sid in changed if sid in new and sid in since]
        self._save_list(gone, entries, started, [(sid,) for sid in changed], meta)

    @_writes_as("save_list")
    def _save_list(self, gone: list[tuple[str]], entries: list[ListRow],
                   started: list[tuple[str, float]] | None, superseded: list[tuple[str]], meta: dict[str, Any]) -> None:
        if started is not None:
            self.db.executemany("DELETE FROM listed_since WHERE id = ?", gone)
            self.db.executemany("INSERT OR IGNORE INTO listed_since VALUES (?, ?)", started)
        self.db.executemany("DELETE FROM list_entries WHERE id = ?", gone)
        self.db.executemany("INSERT OR REPLACE INTO list_entries VALUES (?, ?, ?, ?, ?, ?, ?)", entries)
        self.db.executemany("DELETE FROM overrides WHERE id = ?", superseded)
        self.db.executemany("DELETE FROM readdressed WHERE id = ?", superseded)
        self.set_meta("list", meta)

    @_writes
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
        for table in ("overrides", "readdressed", "graces", "exemptions"):
            self.db.executemany(f"DELETE FROM {table} WHERE id = ?", keys)
        self.db.executemany("INSERT INTO overrides VALUES (?, ?, ?, ?, ?, ?)",
                            [(sid, int(o.restrict), o.at, o.cause,
                              json.dumps(o.subscriber.to_json()) if o.subscriber else None, o.origin.value)
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

    @_writes
    def save_clock(self, inputs: PolicyInputs, ids: Iterable[str], anchor: dict[str, Any],
                   sessions: Sequence[Session] = ()) -> None:
        """Graces, promises and sessions a clock step moved, with the clock anchor they were
        moved by, in one commit (``Engine.now``)."""
        self.save_subscribers(inputs, ids)
        self._save_sessions(sessions, ())
        self.set_meta("clock_anchor", anchor)

    def _save_sessions(self, started: Sequence[Session], stopped: Sequence[SessionId]) -> None:
        if started or stopped:
            self.db.executemany("DELETE FROM sessions WHERE source = ? AND key = ?", list(stopped))
            self.db.executemany("INSERT OR REPLACE INTO sessions (source, key, body) VALUES (?, ?, ?)",
                                [(s.source, s.key, json.dumps(s.to_json())) for s in started])

    # -- billing order ------------------------------------------------------------------------
    @_reads
    def billing_order(self) -> list[tuple[str, str, float]]:
        return list(self._decoded("billing_order", "id, stream, ts",
                                  lambda sid, stream, ts: (_text(sid), _text(stream), _real(ts))))

    @_writes
    def save_billing_order(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """Upsert (subscriber, stream, newest billing timestamp) rows; see ``billing_order``."""
        self.db.executemany("INSERT OR REPLACE INTO billing_order (id, stream, ts) VALUES (?, ?, ?)", list(rows))

    # -- webhook ids ----------------------------------------------------------------------
    @_reads
    def event_answer(self, event_id: str) -> dict[str, Any] | None:
        return self.event_answers([event_id]).get(event_id)

    @_reads
    def event_answers(self, event_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The recorded answers of those ids that were processed before: one query per batch."""
        ids = list(event_ids)
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            where = f"WHERE event_id IN ({','.join('?' * len(chunk))})"
            for event_id, answer in self._decoded("events", "event_id, status, answer", _event_answer,
                                                  where, chunk):
                found[event_id] = answer
        return found

    @_writes
    def record_events(self, records: Sequence[tuple[str, dict[str, Any], str | None]],
                      inputs: PolicyInputs | None) -> None:
        """A batch's answers, (webhook id, answer, subscriber), and with ``inputs`` the policy
        state of the subscribers they name, in one commit."""
        now = time.time()
        if inputs is not None:
            self.save_subscribers(inputs, (sid for _, _, sid in records if sid is not None))
        self.db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                            [(event_id, now, _DONE, json.dumps(answer)) for event_id, answer, _ in records])

    @_writes
    def record_state(self, writes: Iterable[EnforcedWrite], inputs: PolicyInputs | None = None,
                     ids: Iterable[str] = (), events: Sequence[tuple[str, dict[str, Any], str | None]] = (),
                     billing_order: Iterable[tuple[str, str, float]] = (),
                     sessions: tuple[Sequence[Session], Sequence[SessionId]] = ((), ())) -> None:
        """What kernel changes mean for the ``enforced`` table and the audit log, the policy
        inputs of ``ids``, the answers to the webhook ids that caused them, billing's order and
        the sessions (started, stopped) that changed, in one commit (a webhook batch's whole
        state): a retry finds its answer exactly when the change it answers is durable."""
        now = time.time()
        self._save_sessions(*sessions)
        for write in writes:
            self.save_enforced(write.rows, write.gone)
            self.append_audit(write.audit)
        if inputs is not None:
            self.save_subscribers(inputs, ids)
        if events:
            self.db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                                [(event_id, now, _DONE, json.dumps(answer)) for event_id, answer, _ in events])
        self.save_billing_order(billing_order)

    @_writes
    def prune_events(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - EVENT_RETENTION
        return self.db.execute("DELETE FROM events WHERE received_at < ?", (cutoff,)).rowcount

    # -- enforcement record ------------------------------------------------------------------
    @_writes
    def save_enforced(self, rows: dict[str, tuple[str, list[str], str]], removed: Iterable[str]) -> None:
        """Upsert ``id → (mode, addresses, reason)`` rows; ``since`` is kept when nothing changed."""
        now = time.time()
        self.db.executemany("DELETE FROM enforced WHERE id = ?", [(sid,) for sid in removed])
        # One statement: "since" only moves when mode, addresses or reason really changed.
        self.db.executemany(
            "INSERT INTO enforced VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET mode = excluded.mode, "
            "addresses = excluded.addresses, reason = excluded.reason, since = excluded.since "
            "WHERE mode != excluded.mode OR addresses != excluded.addresses OR reason != excluded.reason",
            [(sid, mode, json.dumps(addresses), reason, now) for sid, (mode, addresses, reason) in rows.items()])

    @_reads
    def enforced(self) -> dict[str, dict[str, Any]]:
        return dict(self._decoded("enforced", "id, mode, addresses, reason, since", _enforced))

    # -- audit log ----------------------------------------------------------------------------
    @_writes
    def append_audit(self, rows: list[tuple[float, str, str, str, str]]) -> None:
        """(at, subscriber, old mode, new mode, cause) rows; never updated afterwards."""
        if rows:
            self.db.executemany("INSERT INTO audit (at, subscriber, old_mode, new_mode, cause) VALUES (?, ?, ?, ?, ?)",
                                rows)

    @_reads
    def audit(self, subscriber: str | None = None, since: float | None = None, limit: int = 1000
              ) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (optionally of one subscriber, since a time), oldest first.

        Ordered by time, not by insertion: a webhook batch's rows are written after its
        conntrack flush, possibly after a change that happened later."""
        where: list[str] = []
        args: list[Any] = []
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

    @_writes
    def prune_audit(self, before: float) -> int:
        return self.db.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount

    # -- outgoing webhooks ----------------------------------------------------------------------
    @_writes
    def add_outbox(self, message_id: str, body: dict[str, Any], now: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO outbox (id, created, body, next_at) VALUES (?, ?, ?, ?)",
                        (message_id, now, json.dumps(body), now))

    @_reads
    def outbox_due(self, now: float, limit: int = 50) -> list[tuple[str, float, dict[str, Any], int]]:
        return list(self._decoded("outbox", "id, created, body, attempts", _outbox_row,
                                  "WHERE next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)))

    @_reads
    def outbox_next(self) -> float | None:
        row = self.db.execute("SELECT MIN(next_at) FROM outbox").fetchone()
        return row[0] if row else None

    @_reads
    def outbox_size(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @_writes
    def outbox_delivered(self, message_id: str) -> None:
        self.db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    @_writes
    def outbox_failed(self, message_id: str, next_at: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
                        (next_at, error[:500], message_id))

    def _transaction(self) -> _Tx:
        return _Tx(self)


class _Tx:
    """``BEGIN IMMEDIATE``/``COMMIT`` on this thread's connection (autocommit mode) under the
    store's writer lock, rolled back on error.

    Nested uses *on the same thread* join the outermost transaction (the depth is the
    thread's own), so a batch's writes compose from the single-purpose methods and still cost
    one commit (~0.4 ms in WAL mode). Another thread never joins it: its outermost use waits
    for the writer lock, at most ``BUSY_TIMEOUT``."""

    __slots__ = ("local", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.local = store._local

    def __enter__(self) -> None:
        local = self.local
        db = self.store.db      # opens this thread's connection (and sets its depth) if needed
        if local.depth == 0:
            if not self.store._write_lock.acquire(timeout=BUSY_TIMEOUT):
                raise sqlite3.OperationalError(f"database is locked (another thread's transaction in this process "
                                               f"did not end within {BUSY_TIMEOUT:g}s)")
            try:
                db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._write_lock.release()
                raise
        local.depth += 1

    def __exit__(self, exc_type: object, *rest: object) -> None:
        local = self.local
        local.depth -= 1
        if local.depth != 0:
            return
        db: sqlite3.Connection = local.db
        try:
            db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error:
            if db.in_transaction:   # a failed COMMIT (busy, I/O) leaves it open: the next BEGIN would fail
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.error("event=state_rollback_failed error=%r", str(exc))
            if not exc_type:
                raise
        finally:
            self.store._write_lock.release()


class Checkpoints:
    """A timer duty (``Engine.duties``): ``Store.checkpoint`` every ``CHECKPOINT_SECONDS`` on a
    worker thread, so copying the log back never lands inside a change's commit."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.clock = store, clock
        self._last = clock()

    def due(self) -> float | None:
        return max(self._last + CHECKPOINT_SECONDS - self.clock(), 0.0)

    async def run(self) -> None:
        if self.clock() < self._last + CHECKPOINT_SECONDS:
            return
        self._last = self.clock()
        await asyncio.to_thread(self.store.checkpoint)
