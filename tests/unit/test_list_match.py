"""List entries with ``match`` keys (docs/reference.md, Restricted list; SPEC §9): the
identifiers a session carries, in YAML, JSON and CSV, as strictly checked as addresses.

Every bad entry rejects the whole list with an issue naming file:line and the problem; two
subscribers may not share a match value (one session would belong to both).
"""

from __future__ import annotations

import ipaddress
import json
import textwrap

import pytest

from enforcer.match import Match
from enforcer.policy import PolicyInputs, preview_list, weight
from enforcer.subscribers import ListError, Mode, Subscriber, parse_list, validate_entry

net = ipaddress.ip_network

C1001 = Match(username="c1001@isp", mac="02:00:00:00:10:01", circuit_id="olt1/1/3", remote_id="ont-77")

YAML_LIST = textwrap.dedent("""\
    subscribers:
      - id: C-1001
        match: {username: "c1001@isp", mac: "02:00:00:00:10:01", circuit_id: "olt1/1/3", remote_id: "ont-77"}
        reason: overdue
      - id: C-1002
        addresses: ["100.64.0.11"]
        match:
          mac: 02-00-00-00-10-02
        mode: notice
      - id: C-1003
        addresses: ["100.64.0.12"]
""")

JSON_LIST = json.dumps({"subscribers": [
    {"id": "C-1001", "match": {"username": "c1001@isp", "mac": "02:00:00:00:10:01", "circuit_id": "olt1/1/3",
                               "remote_id": "ont-77"}, "reason": "overdue"},
    {"id": "C-1002", "addresses": ["100.64.0.11"], "match": {"mac": "02-00-00-00-10-02"}, "mode": "notice"},
    {"id": "C-1003", "addresses": ["100.64.0.12"]},
]}, indent=2)

CSV_POSITIONAL = textwrap.dedent("""\
    id,addresses,mode,reason,exempt_until,exempt_category,match
    C-1001,,,overdue,,,username=c1001@isp;mac=02:00:00:00:10:01;circuit_id=olt1/1/3;remote_id=ont-77
    C-1002,100.64.0.11,notice,,,,mac=02-00-00-00-10-02
    C-1003,100.64.0.12
""")

CSV_HEADER_ORDER = textwrap.dedent("""\
    id,match,reason,addresses,mode
    C-1001,username=c1001@isp;mac=02:00:00:00:10:01;circuit_id=olt1/1/3;remote_id=ont-77,overdue,,
    C-1002,MAC=020000001002,,100.64.0.11,notice
    C-1003,,,100.64.0.12,
""").replace("MAC=", "mac=")

EXPECTED = [
    Subscriber("C-1001", (), Mode.WALLED_GARDEN, "overdue", None, "", C1001),
    Subscriber("C-1002", (net("100.64.0.11/32"),), Mode.NOTICE, "", None, "", Match(mac="02:00:00:00:10:02")),
    Subscriber("C-1003", (net("100.64.0.12/32"),)),
]


def issues(text: str, name: str) -> list[tuple[str, str]]:
    """The issues of a list that must be rejected whole (parse_list returns nothing of it)."""
    with pytest.raises(ListError) as info:
        parse_list(text, name)
    return [(i.location, i.message) for i in info.value.issues]


# -- accepted -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name", [(YAML_LIST, "l.yaml"), (JSON_LIST, "l.json"),
                                        (CSV_POSITIONAL, "l.csv"), (CSV_HEADER_ORDER, "l.csv")],
                         ids=["yaml", "json", "csv-positional", "csv-header-order"])
def test_match_keys_in_every_format(text: str, name: str) -> None:
    assert parse_list(text, name) == EXPECTED


def test_csv_without_header_takes_match_as_the_seventh_column() -> None:
    (sub,) = parse_list("C-1,,,,,,username=u1\n", "l.csv")
    assert sub.addresses == () and sub.match == Match(username="u1")


def test_csv_exports_written_before_match_read_the_same() -> None:
    text = "id,addresses,mode,reason\nC-1,100.64.0.1,notice,overdue\nC-2,100.64.0.2\n"
    assert [s.match for s in parse_list(text, "l.csv")] == [Match(), Match()]


@pytest.mark.parametrize("spelling", ["02:00:00:00:10:01", "02-00-00-00-10-01", "0200.0000.1001",
                                      "020000001001", "02:00:00:00:10:01".upper()])
def test_mac_in_any_usual_spelling_is_normalised(spelling: str) -> None:
    (sub,) = parse_list(f"subscribers:\n  - {{id: C-1, match: {{mac: '{spelling}'}}}}\n", "l.yaml")
    assert sub.match.mac == "02:00:00:00:10:01"


def test_unquoted_mac_in_yaml_stays_text() -> None:
    """YAML 1.1 would read 02:00:... as a base-60 number; the list reads plain strings."""
    (sub,) = parse_list("subscribers:\n  - id: C-1\n    match: {mac: 02:00:00:00:10:01}\n", "l.yaml")
    assert sub.match.mac == "02:00:00:00:10:01"


def test_same_value_under_different_keys_is_no_conflict() -> None:
    text = "id,match\nC-1,username=ont-77\nC-2,remote_id=ont-77\n"
    assert [s.id for s in parse_list(text, "l.csv")] == ["C-1", "C-2"]


# -- rejected, whole list, file:line ----------------------------------------------------------

def _yaml(entry: str) -> str:
    """A list whose good first entry is at line 2 and the given entry at line 4."""
    return "subscribers:\n  - {id: C-0, addresses: [100.64.0.1]}\n  # the entry under test\n" + entry


@pytest.mark.parametrize("entry, expected", [
    ("  - {id: C-1, match: {imsi: '001010123456789'}}\n", "unknown match key 'imsi'"),
    ("  - {id: C-1, match: {mac: zz}}\n", "match mac 'zz' is not a MAC address"),
    ("  - {id: C-1, match: {mac: '02:00:00:00:10'}}\n", "match mac '02:00:00:00:10' is not a MAC address"),
    ("  - {id: C-1, match: {}}\n", "match is empty"),
    ("  - id: C-1\n    match:\n", "match is empty"),
    ("  - {id: C-1, match: {username: \"c1\\u0007@isp\"}}\n", "match username"),
    ("  - {id: C-1, match: {username: ' c1@isp'}}\n", "match username"),
    (f"  - {{id: C-1, match: {{circuit_id: '{'x' * 254}'}}}}\n", "match circuit_id"),
    ("  - {id: C-1, match: {username: [a, b]}}\n", "match username must be a string"),
    ("  - {id: C-1, match: [username, c1]}\n", "match must be a mapping"),
    ("  - {id: C-1, reason: overdue}\n", "addresses (an IPv4/IPv6 address or prefix) or match"),
    ("  - {id: C-1, addresses: [], reason: overdue}\n", "at least one is required"),
    ("  - {id: C-1, match: {username: c1, username: c2}}\n", "duplicate key 'username'"),
])
def test_bad_match_in_yaml_rejects_the_list(entry: str, expected: str) -> None:
    found = issues(_yaml(entry), "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:4"], found
    assert expected in found[0][1], found


@pytest.mark.parametrize("cell, expected", [
    ("imsi=1", "unknown match key 'imsi'"),
    ("mac=zz", "match mac 'zz' is not a MAC address"),
    ("username=a;username=b", "match key 'username' is given twice"),
    ("username", "is not key=value"),
    (";", "match is empty"),
    ("username=", "match username"),
    ("remote_id=" + "r" * 254, "match remote_id"),
    ("username=a\tb", "match username"),
])
def test_bad_match_in_csv_rejects_the_list(cell: str, expected: str) -> None:
    text = f"id,addresses,match\nC-0,100.64.0.1,\nC-1,,\"{cell}\"\n"
    found = issues(text, "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3"], found
    assert expected in found[0][1], found


def test_bad_match_in_json_names_the_line() -> None:
    text = ('{"subscribers": [\n  {"id": "C-0", "addresses": ["100.64.0.1"]},\n'
            '  {"id": "C-1",\n   "match": {"mac": "zz"}}\n]}\n')
    found = issues(text, "l.json")
    assert found == [("l.json:3", "match mac 'zz' is not a MAC address such as 02:00:00:00:10:01")]


def test_neither_addresses_nor_match_in_csv() -> None:
    found = issues("id,addresses,match\nC-0,100.64.0.1,\nC-1,,\n", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3"]
    assert "addresses" in found[0][1] and "match" in found[0][1]


def test_same_mac_on_two_lines_names_both() -> None:
    text = "id,addresses,match\nC-1,,mac=02:00:00:00:10:01\nC-2,100.64.0.2,\nC-3,,mac=0200.0000.1001\n"
    found = issues(text, "l.csv")
    assert found == [("l.csv:4", "match mac=02:00:00:00:10:01 of C-3 is also held by C-1 (line 2, l.csv:2)")]


def test_same_username_in_yaml_names_both() -> None:
    text = ("subscribers:\n  - {id: C-1, match: {username: u@isp}}\n  - {id: C-2, addresses: [100.64.0.2]}\n"
            "  - {id: C-3, match: {username: u@isp, mac: '02:00:00:00:00:03'}}\n")
    found = issues(text, "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:4"]
    assert found[0][1] == "match username=u@isp of C-3 is also held by C-1 (line 2, l.yaml:2)"


@pytest.mark.parametrize("header, expected", [
    ("id,mach,reason", "header column 2 'mach' is not a field"),
    ("id,match,match", "header names match twice"),
    ("match,reason", "header has no id column"),
    ("id,,match", "header column 2 '' is not a field"),
])
def test_bad_csv_header_is_an_error_on_its_line(header: str, expected: str) -> None:
    found = issues(f"# export\n{header}\nC-1,username=u1,overdue\n", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:2"], found
    assert expected in found[0][1]


def test_csv_row_longer_than_the_header() -> None:
    found = issues("id,match\nC-1,username=u1,overdue\n", "l.csv")
    assert found == [("l.csv:2", "expected 2 to 2 columns (id,match), got 3")]


# -- the entry and the stored row ------------------------------------------------------------

def test_validate_entry_names_key_and_value() -> None:
    found: list = []
    assert validate_entry({"id": "C-1", "match": {"mac": "zz"}}, "data", found) is None
    assert [(i.location, i.message) for i in found] == [
        ("data", "match mac 'zz' is not a MAC address such as 02:00:00:00:10:01")]


def test_validate_entry_keeps_its_other_checks_beside_match() -> None:
    found: list = []
    raw = {"id": "C 1", "match": {"username": "u"}, "addresses": ["127.0.0.1"], "mode": "free", "reason": "owes 50 EUR"}
    assert validate_entry(raw, "data", found) is None
    assert len(found) == 4, found


@pytest.mark.parametrize("sub", EXPECTED, ids=lambda s: s.id)
def test_json_round_trip(sub: Subscriber) -> None:
    data = json.loads(json.dumps(sub.to_json()))
    assert ("match" in data) == bool(sub.match)
    assert Subscriber.from_json(data) == sub


def test_rows_stored_before_match_still_read() -> None:
    row = {"id": "C-1", "addresses": ["100.64.0.1"], "mode": "notice", "reason": "overdue"}
    sub = Subscriber.from_json(row)
    assert sub.match == Match() and sub.addresses == (net("100.64.0.1/32"),)


def test_positional_construction_without_match_still_works() -> None:
    sub = Subscriber("C-1", (net("100.64.0.1/32"),), Mode.NOTICE, "overdue", None, "")
    assert sub.match == Match() and not sub.match


def test_match_only_subscriber_weighs_one_and_previews() -> None:
    """The mass-change guard counts a subscriber without addresses as one (policy.weight)."""
    sub = EXPECTED[0]
    assert weight(sub) == 1
    assert preview_list(PolicyInputs({}, {}, {}), {sub.id: sub}, 0.0) == (1, 0)
