"""A restart's read of the saved list (``Store._list_entries``): the usual row is decoded inline
for speed; whatever a row holds, the result must be exactly what the general decoder
(``store._list_entry``) makes of it, and a row it refuses is set aside, not loaded."""

from __future__ import annotations

import json
import tempfile
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from enforcer import store as store_module
from enforcer.store import Store

ADDRESSES = ["100.64.0.1/32", "2001:db8:1::/56", "100.64.0.01/32", "100.64.0.1/31", "::ffff:100.64.0.1/128",
             "2001:DB8::/56", "100.64.0.1", "x", "", "2001:db8::1/128", "100.64.1.0/24", '1"2']
TEXTS = st.one_of(
    st.lists(st.sampled_from(ADDRESSES), max_size=3).map(json.dumps),
    st.lists(st.sampled_from(ADDRESSES), max_size=3).map(lambda a: json.dumps(a, separators=(",", ":"))),
    st.sampled_from(['["100.64.0.1/32"]', '["a\\u0031"]', "[]", '["100.64.0.1/32", 7]', "{}", "null", '[""]',
                     '["100.64.0.1/32"', '"100.64.0.1/32"]']),
    st.integers(-2**63, 2**63 - 1))
ROWS = st.tuples(
    st.one_of(st.sampled_from(["C-1", "C-2", "C-3"]), st.integers(1, 3)),
    TEXTS,
    st.one_of(st.sampled_from(["walled-garden", "notice", "throttle", "free", "bogus"]), st.integers(0, 9)),
    st.one_of(st.sampled_from(["", "overdue"]), st.integers(0, 9)),
    st.one_of(st.none(), st.floats(allow_nan=True), st.integers(0, 9), st.just("soon")),
    st.one_of(st.sampled_from(["", "dispute"]), st.integers(0, 9)),
    st.one_of(st.none(), st.sampled_from(['{"mac": "02:00:00:00:00:01"}', "[]", "{", '{"username": "a@b"}'])))


def _expected(rows: list[tuple[Any, ...]]) -> tuple[dict[Any, Any], int]:
    listed, bad = {}, 0
    for row in rows:
        try:
            sid, entry = store_module._list_entry(*row)
        except store_module._UNDECODABLE:
            bad += 1
            continue
        listed[sid] = entry
    return listed, bad


@settings(max_examples=300, deadline=None)
@given(st.lists(ROWS, max_size=4, unique_by=lambda r: r[0]))
@example([("C-1", '["100.64.0.1/32"]', "walled-garden", "overdue", None, "", None),
          ("C-2", '["100.64.0.01/32"]', "notice", "", None, "", None),
          ("C-3", '["2001:db8:1::/56", "100.64.0.2/32"]', "throttle", "", 5.0, "dispute",
           '{"mac": "02:00:00:00:00:01"}')])
def test_the_inline_read_is_the_general_decoder(rows: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as work:
        store = Store(work)
        store.db.executemany("INSERT INTO list_entries VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        rows = [tuple(r) for r in store.db.execute(
            "SELECT id, addresses, mode, reason, exempt_until, exempt_category, match FROM list_entries")]
        expected, bad = _expected(rows)
        texts: dict[str, str] = {}
        loaded = store._list_entries(texts)
        assert loaded == expected
        assert all(type(k) is str for k in loaded)
        assert texts == {sid: row[1] for row in rows if (sid := row[0]) in expected}
        assert store.skipped_count == bad
        assert store.db.execute("SELECT COUNT(*) FROM list_entries").fetchone()[0] == len(expected)
        store.close()
