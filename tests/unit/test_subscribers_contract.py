"""Contract fixes from the SPEC audit (SPEC.md §3, docs/reference.md, Restricted list): nulls
for optional fields, a CSV's last line without a line ending, CSV content behind a .yaml/.json
suffix, reasons written as words, and prefixes too wide for one subscriber."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from enforcer.address_space import AddressSpace
from enforcer.events import EventError, parse_event
from enforcer.model import Mode
from enforcer.subscribers import (
    ListError,
    Subscriber,
    _fast_entry,
    _validated,
    parse_address,
    parse_list,
    validate_entry,
)

net = ipaddress.ip_network


def issues(text: str, name: str, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ListError) as info:
        parse_list(text, name, **kwargs)
    return [(i.location, i.message) for i in info.value.issues]


def one(address: str, reason: str = "", mode: Mode = Mode.WALLED_GARDEN, sid: str = "C-1") -> Subscriber:
    return Subscriber(sid, (net(address),), mode, reason)


# -- 1. null for an optional field is the field left out ------------------------------------------

def test_json_nulls_as_json_dumps_writes_none_are_absent_fields() -> None:
    entry = {"id": "C-1", "addresses": ["100.64.0.10"], "mode": None, "reason": None,
             "exempt_until": None, "exempt_category": None, "match": None}
    text = json.dumps({"subscribers": [entry, {"id": "C-2", "addresses": ["100.64.0.11"], "mode": "notice",
                                               "reason": None}]})
    assert parse_list(text, "l.json") == [one("100.64.0.10/32"), one("100.64.0.11/32", mode=Mode.NOTICE, sid="C-2")]


@pytest.mark.parametrize("spelling", ["~", "null", "Null", "NULL", ""])
def test_yaml_plain_nulls_are_absent_fields(spelling: str) -> None:
    text = textwrap.dedent(f"""\
        subscribers:
          - id: C-1
            addresses: [100.64.0.10]
            mode: {spelling}
            reason: {spelling}
            exempt_until: {spelling}
            exempt_category: {spelling}
            match: {spelling}
    """)
    assert parse_list(text, "l.yaml") == [one("100.64.0.10/32")]


def test_a_quoted_null_stays_text() -> None:
    """``"null"`` is the word: a reason category called null, a mode that does not exist."""
    assert parse_list('subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: "null"}\n',
                      "l.yaml") == [one("100.64.0.10/32", reason="null")]
    found = issues('{"subscribers": [\n {"id": "C-1", "addresses": ["100.64.0.10"], "mode": "null"}]}', "l.json")
    assert [loc for loc, _ in found] == ["l.json:2"] and found[0][1].startswith("mode 'null' is not one of")


@pytest.mark.parametrize("text, name, line", [
    ('{"subscribers": [\n  {"id": "C-0", "addresses": ["100.64.0.9"]},\n  {"id": null,\n'
     '   "addresses": ["100.64.0.10"]}\n]}\n', "l.json", 3),
    ("subscribers:\n  - id: C-0\n    addresses: [100.64.0.9]\n  - id: ~\n    addresses: [100.64.0.10]\n", "l.yaml", 4),
    ("subscribers:\n  - id: C-0\n    addresses: [100.64.0.9]\n  - id:\n    addresses: [100.64.0.10]\n", "l.yaml", 4),
])
def test_a_null_id_is_refused_naming_the_line_and_the_field(text: str, name: str, line: int) -> None:
    """Before: the subscriber was called "null" (a valid id), or the list said nothing useful."""
    assert issues(text, name) == [(f"{name}:{line}", "id is empty (null); every entry needs its subscriber id")]


@pytest.mark.parametrize("text, name, line", [
    ('{"subscribers": [\n  {"id": "C-1",\n   "addresses": null, "mode": "notice"}\n]}\n', "l.json", 2),
    ("subscribers:\n  - id: C-1\n    addresses: ~\n", "l.yaml", 2),
    ("subscribers:\n  - id: C-1\n    addresses:\n    reason: overdue\n", "l.yaml", 2),
])
def test_null_addresses_without_match_are_refused_naming_the_field(text: str, name: str, line: int) -> None:
    found = issues(text, name)
    assert [loc for loc, _ in found] == [f"{name}:{line}"]
    assert found[0][1].startswith("addresses is empty (null); ") and "at least one is required" in found[0][1]


def test_null_addresses_beside_match_keys_are_absent() -> None:
    """A subscriber known only by match keys, as ``json.dumps`` writes it."""
    text = json.dumps({"subscribers": [{"id": "C-1", "addresses": None, "match": {"username": "c1@isp", "mac": None}}]})
    (sub,) = parse_list(text, "l.json")
    assert sub.addresses == () and sub.match.to_json() == {"username": "c1@isp"}


def test_a_match_of_nothing_but_nulls_is_a_null_match() -> None:
    text = json.dumps({"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"], "match": {"mac": None}}]})
    assert parse_list(text, "l.json") == [one("100.64.0.1/32")]
    found = issues(json.dumps({"subscribers": [{"id": "C-1", "match": {"mac": None}}]}), "l.json")
    assert found[0][1].startswith("match is empty (null); ")


def test_an_empty_match_mapping_is_still_an_error() -> None:
    """``{}`` is not null: an export that lost its values."""
    found = issues('{"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"], "match": {}}]}', "l.json")
    assert "match is empty" in found[0][1]


def test_the_subscribers_key_itself_may_not_be_null() -> None:
    for text, name in (("subscribers: ~\n", "l.yaml"), ('{"subscribers": null}', "l.json")):
        assert "'subscribers' must be a list" in issues(text, name)[0][1]


def test_nulls_keep_the_line_numbers_of_every_entry() -> None:
    text = ('{"subscribers": [\n'
            '  {"id": "C-1", "addresses": ["100.64.0.1"], "mode": null, "reason": null},\n'
            '  {"id": "C-2", "addresses": ["100.64.0.2"], "mode": null, "reason": null},\n'
            '  {"id": "C-3", "addresses": ["100.64.0.3"], "mode": null, "reason": "owes 50 EUR"},\n'
            '  {"id": "C-4", "addresses": [null], "mode": null, "reason": null}\n'
            ']}\n')
    assert [loc for loc, _ in issues(text, "l.json")] == ["l.json:4", "l.json:5"]


def test_an_event_entry_with_nulls_is_the_same_as_without() -> None:
    found: list[Any] = []
    sub = validate_entry({"id": "C-1", "addresses": ["100.64.0.1"], "mode": None, "reason": None}, "data", found)
    assert sub == one("100.64.0.1/32") and not found


# -- 2. a CSV's last line without its line ending -----------------------------------------------

ROWS = ["id,addresses,mode,reason", "C-1,100.64.0.1,notice,overdue", "C-2,100.64.0.2 2001:db8:2::/56,,fair use"]
PARSED = [one("100.64.0.1/32", "overdue", Mode.NOTICE),
          Subscriber("C-2", (net("100.64.0.2/32"), net("2001:db8:2::/56")), Mode.WALLED_GARDEN, "fair-use")]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
@pytest.mark.parametrize("last", ["", "\n", "\r\n"])
def test_a_complete_last_row_needs_no_line_ending(ending: str, last: str) -> None:
    """``"\\n".join(rows)`` (RFC 4180 allows it), CRLF or LF, with or without the final ending."""
    assert parse_list(ending.join(ROWS) + last, "l.csv") == PARSED


def test_without_a_header_every_last_row_needs_its_line_ending() -> None:
    """A headerless row runs to seven columns: ``C-2,100.64.0.2,,overdue`` may be
    ``C-2,100.64.0.2,,overdue,2026-12-31,arrangement`` cut after a comma, an exemption lost."""
    assert parse_list("\n".join(ROWS[1:]) + "\n", "l.csv") == PARSED
    found = issues("C-1,100.64.0.1,,overdue\nC-2,100.64.0.2,,overdue", "l.csv")
    assert found == [("l.csv:2", "the last line has no line ending and the list has no header row, so it could "
                                 "be a longer row cut short (a truncated export?); end the file with a line ending")]


def test_a_header_ending_in_mode_takes_a_complete_last_row() -> None:
    assert parse_list("id,addresses,mode\nC-1,100.64.0.1,notice", "l.csv") == [one("100.64.0.1/32", mode=Mode.NOTICE)]


def test_a_cut_reason_is_harmless_and_a_cut_mode_is_refused() -> None:
    assert parse_list("id,addresses,mode,reason\nC-1,100.64.0.1,notice,overd", "l.csv") == [
        one("100.64.0.1/32", "overd", Mode.NOTICE)]
    found = issues("id,addresses,mode\nC-1,100.64.0.1,noti", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:2"] and "mode 'noti'" in found[0][1]


@pytest.mark.parametrize("text, line, cell", [
    ("id,addresses\nC-1,100.64.0.1\nC-2,100.64.0.12", 3, "addresses"),               # cut from 100.64.0.123?
    ("id,addresses,mode,reason\nC-1,100.64.0.1,notice", 2, "mode"),                 # no reason cell: cut there
    ("id,addresses,mode\nC-1,100.64.0.1,", 2, "mode, empty"),                         # notice cut away whole
    ("id,reason,addresses\nC-1,overdue,100.64.0.1", 2, "addresses"),                 # addresses last
    ("id,addresses,reason,match\nC-1,100.64.0.1,overdue,mac=02:00:00:00:00:0", 2, "match"),
    ("id,addresses,mode,reason,exempt_until\nC-1,100.64.0.1,notice,overdue,2030-01-0", 2, "exempt_until"),
    ("id,addresses\nC-1,100.64.0.1\nC-2", 3, "id"),
])
def test_a_last_row_that_could_be_cut_is_refused_saying_why(text: str, line: int, cell: str) -> None:
    found = issues(text, "l.csv")
    cut = [(loc, message) for loc, message in found if "line ending" in message]
    assert [loc for loc, _ in cut] == [f"l.csv:{line}"], found
    assert f"no line ending and its last cell ({cell}) could have been cut short" in cut[0][1]


def test_the_cut_row_is_named_by_its_own_line_after_comments_and_blank_lines() -> None:
    found = issues("# export\n\nC-1,100.64.0.1\n\n# more\nC-2,100.64.0.2", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:6"]


def test_a_header_without_a_line_ending_and_no_rows_is_refused() -> None:
    """Nothing but the header: an empty list (everyone lifted) unless it is written so."""
    found = issues("id,addresses,mode,reason", "l.csv")
    assert found == [("l.csv:1", "the header row has no line ending and no row follows it (a truncated export?); "
                                 "an empty list is the header row and a line ending")]
    assert parse_list("id,addresses,mode,reason\n", "l.csv") == []


def test_a_trailing_comment_or_blank_line_without_a_line_ending_is_harmless() -> None:
    assert parse_list("\n".join(ROWS) + "\n# end of export", "l.csv") == PARSED
    assert parse_list("\n".join(ROWS) + "\n   ", "l.csv") == PARSED


def test_a_cut_inside_quotes_is_refused() -> None:
    found = issues('C-1,100.64.0.1,notice,overdue\nC-2,"100.64.0.2 100.64.0.3', "l.csv")
    assert any("not valid CSV" in message for _, message in found)
    assert any("no line ending" in message for _, message in found)


def test_a_quoted_complete_last_row_needs_no_line_ending() -> None:
    text = 'id,addresses,mode,reason\r\nC-1,"100.64.0.1 100.64.0.2",notice,"overdue"'
    assert parse_list(text, "l.csv") == [Subscriber("C-1", (net("100.64.0.1/32"), net("100.64.0.2/32")),
                                                    Mode.NOTICE, "overdue")]


# -- 3. CSV content behind a .yaml/.yml/.json suffix -----------------------------------------------

CSV_TEXT = "\n".join(ROWS) + "\n"


@pytest.mark.parametrize("name", ["l.yaml", "l.yml", "l.json", "restricted.YAML", "https://billing/x.json?v=2"])
def test_a_csv_list_under_a_yaml_or_json_suffix_is_read_as_csv(name: str) -> None:
    assert parse_list(CSV_TEXT, name) == PARSED
    assert parse_list("\ufeff# billing export\n\n" + CSV_TEXT, name) == PARSED


def test_a_csv_list_under_a_yaml_suffix_is_refused_in_csv_terms() -> None:
    found = issues("id,addresses\nC-1,100.64.0.1\nC-2,100.64.0.300\n", "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:3"] and "100.64.0.300" in found[0][1]


@pytest.mark.parametrize("text", [
    "C-1,100.64.0.1,notice,overdue\n",            # no header: could be anything
    "id\nC-1\n",                                   # a header that names nobody
    "ident,addresses\nC-1,100.64.0.1\n",            # not our header
    "hello\n",
])
def test_other_text_under_a_yaml_suffix_is_not_guessed_at(text: str) -> None:
    assert issues(text, "l.yaml") == [("l.yaml:1", "expected a top-level 'subscribers:' list")]


def test_a_yaml_list_with_a_bad_entry_stays_a_yaml_error() -> None:
    found = issues("subscribers:\n  - {id: C-1, addresses: [100.64.0.300]}\n", "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]


def test_a_declared_content_type_is_not_second_guessed() -> None:
    found = issues(CSV_TEXT, "list", content_type="application/json")
    assert [loc for loc, _ in found] == ["list:1"] and "not valid JSON" in found[0][1]


def test_a_csv_list_file_named_yaml_through_the_file_reader(tmp_path: Path) -> None:
    from enforcer.sources import read_list_file

    path = tmp_path / "restricted.yaml"
    path.write_text(CSV_TEXT)
    assert read_list_file(str(path)).subscribers == PARSED


# -- 4. reasons written as words ----------------------------------------------------------------

@pytest.mark.parametrize("written, stored", [
    ("Overdue", "overdue"), ("  OVERDUE ", "overdue"), ("payment overdue", "payment-overdue"),
    ("Fair  Use", "fair-use"), ("fair_use", "fair_use"), ("Suspended\t", "suspended"), ("fup2", "fup2"),
    ("fair use policy", "fair-use-policy"), ("", ""), ("   ", ""),
    ("overdue-30", "overdue-30"), ("a_b-1", "a_b-1"),   # slugs: as before
])
def test_a_reason_is_normalised_to_a_category(written: str, stored: str) -> None:
    for text, name in ((f'subscribers:\n  - {{id: C-1, addresses: [100.64.0.1], reason: "{written}"}}\n', "l.yaml"),
                       (json.dumps({"subscribers": [{"id": "C-1", "addresses": ["100.64.0.1"], "reason": written}]}),
                        "l.json"),
                       (f'C-1,100.64.0.1,,"{written}"\n', "l.csv")):
        assert [s.reason for s in parse_list(text, name)] == [stored], (name, written)


@pytest.mark.parametrize("reason", ["owes 120 EUR", "owes 5 EUR", "unpaid since 2026-01-01", "customer has not paid",
                                    "acct 4711", "x" * 33, "overdue!", "€50", "überfällig", "-x", "Big Debt!",
                                    # normalised, they meet the limits: lower case would let an amount or
                                    # an account number through; a Kelvin sign lower-cases to a "k"
                                    "Owes-120-EUR", "IBAN-DE89370400440532013000", "Overdue-30", "\u212aey"])
def test_free_text_amounts_and_dates_are_still_refused_at_file_line(reason: str) -> None:
    text = f'id,addresses,mode,reason\nC-0,100.64.0.9,,overdue\nC-1,100.64.0.1,,"{reason}"\n'
    found = issues(text, "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3"] and found[0][1].startswith(f"reason {reason!r} must be")


def test_an_event_reason_is_normalised_too() -> None:
    body = json.dumps({"type": "subscriber.restricted", "timestamp": "2026-11-23T10:00:00Z",
                       "data": {"subscriber": "C-1", "addresses": ["100.64.0.1"], "reason": "Payment Overdue"}})
    event = parse_event("e1", body)
    assert event.subscriber is not None and event.subscriber.reason == "payment-overdue"
    with pytest.raises(EventError, match="reason 'owes 120 EUR'"):
        parse_event("e2", body.replace("Payment Overdue", "owes 120 EUR"))


def test_the_fast_path_stores_the_same_normalised_reason() -> None:
    raw = {"id": "C-1", "addresses": "100.64.0.1", "mode": "notice", "reason": " Fair Use "}
    fast = _fast_entry(raw, None)
    full = _validated(raw, "where", [], None)
    assert fast is not None and full is not None and fast[0] == full[0] and fast[0].reason == "fair-use"
    assert _fast_entry({**raw, "reason": "owes 120 EUR"}, None) is None


@pytest.mark.parametrize("written, key, category", [
    ("Overdue", "reason_overdue", "overdue"), ("fair use", "reason_fair_use", "fair_use"),
    ("Fair-Use", "reason_fair_use", "fair_use"), ("payment overdue", "reason_other", None),
])
def test_the_portal_finds_the_normalised_category(written: str, key: str, category: str | None) -> None:
    """The portal compares reasons with ``-``, ``_`` and spaces alike (``normal_reason``):
    what the list now stores reads as what billing wrote."""
    from captive_portal.messages import reason_category, reason_key

    (sub,) = parse_list(f'C-1,100.64.0.1,,"{written}"\n', "l.csv")
    assert reason_key(sub.reason) == reason_key(written) == key
    assert reason_category(sub.reason) == category


# -- 5. prefixes too wide for one subscriber ------------------------------------------------------

SPACE = AddressSpace((net("100.64.0.0/10"), net("100.65.0.0/16"), net("2001:db8::/32"), net("2001:db8:1::/48")))


@pytest.mark.parametrize("address", ["2001:db8::/32", "2001:db8::/47", "2001::/16"])
def test_no_ipv6_prefix_broader_than_a_48(address: str) -> None:
    with pytest.raises(ValueError, match=rf"{address} is broader than /48.*RFC 6177"):
        parse_address(address)
    found: list[Any] = []
    assert validate_entry({"id": "C-1", "addresses": [address]}, "data", found) is None
    assert address in found[0].message and "/48" in found[0].message


def test_a_48_and_the_ipv4_16_floor_stay() -> None:
    assert parse_address("2001:db8:5::/48") == net("2001:db8:5::/48")
    assert parse_address("100.64.0.0/16") == net("100.64.0.0/16")
    with pytest.raises(ValueError, match="broader than /16"):
        parse_address("100.64.0.0/15")


def test_a_restricted_event_cannot_wall_the_ipv6_space() -> None:
    body = json.dumps({"type": "subscriber.restricted", "timestamp": "2026-11-23T10:00:00Z",
                       "data": {"subscriber": "C-1", "addresses": ["2001:db8::/32"]}})
    with pytest.raises(EventError, match=r"2001:db8::/32 is broader than /48"):
        parse_event("e1", body)


@pytest.mark.parametrize("address, entry", [
    ("100.65.0.0/16", "100.65.0.0/16"),
])
def test_a_prefix_covering_a_whole_subscriber_prefix_is_refused(address: str, entry: str) -> None:
    assert SPACE.problem(net(address)) == (f"{address} covers the whole gateway.subscriber_prefixes entry {entry}; "
                                           "refusing a prefix that wide for one subscriber")
    found = issues(f"C-0,100.64.0.9\nC-1,{address}\n", "l.csv", space=SPACE)
    assert [loc for loc, _ in found] == ["l.csv:2"] and f"entry {entry}" in found[0][1]
    assert _fast_entry({"id": "C-1", "addresses": address}, SPACE) is None


def test_prefixes_inside_a_subscriber_prefix_but_not_covering_one_are_fine() -> None:
    subs = parse_list("C-1,100.66.0.0/16\nC-2,2001:db8:1::/49\nC-3,2001:db8:2::/48\n", "l.csv", space=SPACE)
    assert [s.addresses[0].prefixlen for s in subs] == [16, 49, 48]


async def test_events_and_operator_commands_cannot_wall_a_whole_subscriber_prefix(tmp_path: Path) -> None:
    """Both reach ``EventIntake`` through the daemon's ``AddressSpace``: 400 / exit 1 naming the entry."""
    from daemon_helpers import NoConntrack, handle_event, operator_change
    from enforcer.config import parse_config
    from enforcer.daemon import Enforcer
    from enforcer.dataplane.fake import FakeDataplane

    path = tmp_path / "config.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                    "gateway: {subscriber_prefixes: [100.64.0.0/10, 100.65.0.0/16, '2001:db8::/32', "
                    "'2001:db8:1::/48']}\n")
    e = Enforcer(parse_config(path.read_text(), str(path)), dataplane=FakeDataplane(), conntrack=NoConntrack(),
                 clock=lambda: 1_795_000_000.0)
    await e.engine.restore()
    try:
        body = {"type": "subscriber.restricted", "timestamp": 1_795_000_000,
                "data": {"subscriber": "C-1", "addresses": ["100.65.0.0/16"]}}
        status, answer = await handle_event(e, parse_event("e1", json.dumps(body)))
        assert status == 400 and "entry 100.65.0.0/16" in answer["error"], answer
        body["data"] = {"subscriber": "C-5", "addresses": ["2001:db8:1::/48"]}   # one customer's block: fine
        status, answer = await handle_event(e, parse_event("e5", json.dumps(body)))
        assert status == 200, answer
        status, answer = await operator_change(e, "noc", "C-2", True, "test", mode="walled-garden",
                                               addresses=["100.65.0.0/16"])
        assert status == 400 and "entry 100.65.0.0/16" in answer["error"], answer
        status, answer = await operator_change(e, "noc", "C-3", True, "test", addresses=["2001:db8::/32"])
        assert status == 400 and "broader than /48" in answer["error"], answer
        status, answer = await operator_change(e, "noc", "C-4", True, "test", addresses=["2001:db8:2::/48"])
        assert status == 200, answer
    finally:
        await e.close()


@pytest.mark.parametrize("name", ["l.yaml", "l.json"])
def test_a_csv_header_alone_under_a_yaml_or_json_name_is_no_empty_list(name: str) -> None:
    """As CSV, a header alone is the empty list (everyone lifted); under a YAML/JSON name that
    is written `subscribers: []`, so a lone header there is refused, not guessed."""
    found = issues("id,addresses\n", name)
    assert [loc for loc, _ in found] == [f"{name}:1"] and "subscribers: []" in found[0][1]


def test_csv_errors_under_a_yaml_name_say_the_file_was_read_as_csv() -> None:
    found = issues("id,addresses\nsubscribers: []\n", "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]
    assert found[0][1].startswith("read as CSV (its first line is a CSV header): expected 2 to 2 columns")
