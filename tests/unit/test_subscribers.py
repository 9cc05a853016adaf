"""The restricted-subscriber list (docs/reference.md, Restricted list): YAML / JSON / CSV,
all-or-nothing, every problem at file:line."""

from __future__ import annotations

import ipaddress
import itertools
import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.subscribers import (
    ListError,
    Mode,
    Subscriber,
    _network,
    detect_format,
    id_problem,
    parse_address,
    parse_list,
    validate_entry,
)

net = ipaddress.ip_network

YAML_LIST = textwrap.dedent("""\
    subscribers:
      - id: C-1001
        addresses: ["100.64.0.10", "2001:db8:10:100::/56"]
        mode: walled-garden
        reason: overdue
      - id: C-1002
        addresses: ["100.64.0.11"]
        mode: notice
      - id: C-1003
        addresses: ["100.64.1.0/24", "2001:db8:20::/64"]
        mode: throttle
        reason: fair_use
      - id: "1004"
        addresses: ["2001:db8:30::1"]
""")

JSON_LIST = json.dumps({"subscribers": [
    {"id": "C-1001", "addresses": ["100.64.0.10", "2001:db8:10:100::/56"], "mode": "walled-garden",
     "reason": "overdue"},
    {"id": "C-1002", "addresses": ["100.64.0.11"], "mode": "notice"},
    {"id": "C-1003", "addresses": ["100.64.1.0/24", "2001:db8:20::/64"], "mode": "throttle", "reason": "fair_use"},
    {"id": "1004", "addresses": ["2001:db8:30::1"]},
]}, indent=2)

CSV_LIST = textwrap.dedent("""\
    id,addresses,mode,reason
    C-1001,100.64.0.10 2001:db8:10:100::/56,walled-garden,overdue
    C-1002,100.64.0.11,notice
    C-1003,"100.64.1.0/24 2001:db8:20::/64",throttle,fair_use
    1004,2001:db8:30::1
""")

EXPECTED = [
    Subscriber("C-1001", (net("100.64.0.10/32"), net("2001:db8:10:100::/56")), Mode.WALLED_GARDEN, "overdue"),
    Subscriber("C-1002", (net("100.64.0.11/32"),), Mode.NOTICE, ""),
    Subscriber("C-1003", (net("100.64.1.0/24"), net("2001:db8:20::/64")), Mode.THROTTLE, "fair_use"),
    Subscriber("1004", (net("2001:db8:30::1/128"),), Mode.WALLED_GARDEN, ""),
]


def issues(text: str, name: str) -> list[tuple[str, str]]:
    with pytest.raises(ListError) as info:
        parse_list(text, name)
    return [(i.location, i.message) for i in info.value.issues]


def locations(text: str, name: str) -> list[str]:
    return [loc for loc, _ in issues(text, name)]


def yaml_entry(body: str) -> str:
    """A one-entry YAML list; the entry starts on line 2."""
    return "subscribers:\n" + textwrap.indent(textwrap.dedent(body), "  ")


# -- the three formats ----------------------------------------------------------------------

def test_yaml_json_csv_of_the_same_list_are_equal():
    from_yaml = parse_list(YAML_LIST, "restricted.yaml")
    from_json = parse_list(JSON_LIST, "restricted.json")
    from_csv = parse_list(CSV_LIST, "restricted.csv")
    assert from_yaml == EXPECTED
    assert from_json == EXPECTED
    assert from_csv == EXPECTED


def test_formats_are_sniffed_without_a_suffix():
    assert parse_list(YAML_LIST, "restricted") == EXPECTED
    assert parse_list(JSON_LIST, "restricted") == EXPECTED
    assert parse_list(CSV_LIST, "restricted") == EXPECTED


def test_json_indented_with_tabs():
    text = json.dumps(json.loads(JSON_LIST), indent="\t")
    assert parse_list(text, "restricted.json") == EXPECTED


def test_ipv6_prefix_kept_as_a_56():
    (sub,) = parse_list(yaml_entry("""\
        - id: C-1
          addresses: ["2001:db8:10:100::/56"]
    """), "l.yaml")
    assert sub.addresses == (net("2001:db8:10:100::/56"),)
    assert sub.addresses[0].prefixlen == 56
    assert sub.mode is Mode.WALLED_GARDEN  # the default
    assert sub.reason == ""


def test_csv_header_is_optional_and_comments_blank_lines_skipped():
    text = textwrap.dedent("""\
        # exported by billing 2026-11-23

        C-1001,100.64.0.10 2001:db8:10:100::/56,walled-garden,overdue
          # an indented comment
        C-1002,100.64.0.11,notice

        C-1003,"100.64.1.0/24 2001:db8:20::/64",throttle,fair_use
        1004,2001:db8:30::1
    """)
    assert parse_list(text, "restricted.csv") == EXPECTED


def test_csv_header_after_comment_and_case_insensitive():
    text = "# billing\nID, Addresses, Mode, Reason\nC-1,100.64.0.10,,\n"
    assert parse_list(text, "l.csv") == [Subscriber("C-1", (net("100.64.0.10/32"),))]


def test_csv_crlf_line_endings():
    text = CSV_LIST.replace("\n", "\r\n")
    assert parse_list(text, "restricted.csv") == EXPECTED


def test_explicit_empty_list_is_valid():
    assert parse_list("subscribers: []\n", "l.yaml") == []
    assert parse_list('{"subscribers": []}', "l.json") == []
    assert parse_list("id,addresses,mode,reason\n", "l.csv") == []


def test_subscriber_json_round_trip():
    for sub in EXPECTED:
        assert Subscriber.from_json(json.loads(json.dumps(sub.to_json()))) == sub


# -- one bad line each ----------------------------------------------------------------------

@pytest.mark.parametrize("address, fragment", [
    ("100.64.0.300", "100.64.0.300"),
    ("not-an-ip", "not-an-ip"),
    ("100.64.0.10/24", "host bits"),
    ("2001:db8:10:101::/56", "host bits"),
    ("10.0.0.0/8", "broader than /16"),
    ("2001:db8::/29", "broader than /48"),
    ("2001:db8::/47", "broader than /48"),
    ("::/0", "broader"),
])
def test_bad_address_in_yaml_reported_at_the_entry_line(address, fragment):
    text = yaml_entry(f"""\
        - id: C-1
          addresses: ["100.64.0.1"]
        - id: C-2
          addresses: ["100.64.0.2", "{address}"]
    """)
    found = issues(text, "restricted.yaml")
    assert [loc for loc, _ in found] == ["restricted.yaml:4"]
    assert fragment in found[0][1]
    assert repr(address) in found[0][1]


def test_broadest_allowed_prefixes():
    assert parse_address("100.64.0.0/16") == net("100.64.0.0/16")
    assert parse_address("2001:db8::/48") == net("2001:db8::/48")
    assert parse_address(" 100.64.0.1 ") == net("100.64.0.1/32")


@pytest.mark.parametrize("address", ["100.64.0.10/24", "100.64.0.300", "10.0.0.0/15"])
def test_bad_address_in_csv(address):
    text = f"C-1,100.64.0.1\nC-2,{address},notice\n"
    assert locations(text, "restricted.csv") == ["restricted.csv:2"]


@pytest.mark.parametrize("mode", ["blocked", "free", "Walled-Garden", "walled_garden"])
def test_unknown_mode(mode):
    found = issues(f"C-1,100.64.0.1\nC-2,100.64.0.2,{mode}\n", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:2"]
    assert "mode" in found[0][1] and "walled-garden" in found[0][1]


@pytest.mark.parametrize("reason", ["owes 120 EUR", "overdue!", "x" * 33, "unpaid since 2026-01-01",
                                    "customer has not paid", "acct 4711", "überfällig"])
def test_bad_reason(reason):
    text = yaml_entry(f"""\
        - id: C-1
          addresses: ["100.64.0.1"]
          reason: "{reason}"
    """)
    found = issues(text, "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]
    assert "reason" in found[0][1]


def test_reason_must_be_a_string():
    text = yaml_entry("""\
        - id: C-1
          addresses: ["100.64.0.1"]
          reason: [overdue]
    """)
    assert locations(text, "l.yaml") == ["l.yaml:2"]


@pytest.mark.parametrize("entry", [
    "- addresses: [100.64.0.1]\n",
    "- id: ''\n  addresses: [100.64.0.1]\n",
    "- id: 'has space'\n  addresses: [100.64.0.1]\n",
    "- id: [C-1]\n  addresses: [100.64.0.1]\n",
    "- id: -leading-dash\n  addresses: [100.64.0.1]\n",
])
def test_missing_or_bad_id(entry):
    found = issues(yaml_entry(entry), "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]
    assert "id" in found[0][1]


def test_missing_id_in_csv():
    assert locations("C-1,100.64.0.1\n,100.64.0.2\n", "l.csv") == ["l.csv:2"]


@pytest.mark.parametrize("addresses", ["[]", "null", "''", "{a: 1}"])
def test_missing_addresses(addresses):
    found = issues(yaml_entry(f"- id: C-1\n  addresses: {addresses}\n"), "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]
    assert "address" in found[0][1]


def test_same_address_twice_in_one_entry():
    found = issues(yaml_entry("- id: C-1\n  addresses: [100.64.0.1, 100.64.0.1]\n"), "l.yaml")
    assert found == [("l.yaml:2", "address 100.64.0.1/32 is listed twice")]


def test_duplicate_id():
    text = "C-1,100.64.0.1\nC-2,100.64.0.2\nC-1,100.64.0.3\n"
    found = issues(text, "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3"]
    assert "C-1" in found[0][1] and "line 1" in found[0][1]


def test_same_address_in_two_subscribers():
    text = yaml_entry("""\
        - id: C-1
          addresses: [100.64.0.1]
        - id: C-2
          addresses: [100.64.0.2]
        - id: C-3
          addresses: ["100.64.0.2"]
    """)
    found = issues(text, "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:6"]
    assert "C-3" in found[0][1] and "C-2" in found[0][1] and "l.yaml:4" in found[0][1]


def test_host_inside_another_subscribers_prefix():
    text = "C-1,100.64.0.0/24\nC-2,100.64.1.1\nC-3,100.64.0.77\n"
    found = issues(text, "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3"]
    assert "100.64.0.77/32" in found[0][1] and "100.64.0.0/24" in found[0][1] and "C-1" in found[0][1]
    assert "l.csv:1" in found[0][1] and "l.csv:3" in found[0][1]


def test_ipv6_prefix_inside_another_subscribers_prefix():
    text = "C-1,2001:db8:10:100::/56\nC-2,2001:db8:10:1ff::/64\n"
    assert locations(text, "l.csv") == ["l.csv:2"]


def test_one_subscriber_may_hold_nested_prefixes_of_its_own():
    (sub,) = parse_list("C-1,100.64.0.0/24 100.64.0.7\n", "l.csv")
    assert sub.addresses == (net("100.64.0.0/24"), net("100.64.0.7/32"))


def test_unknown_field():
    text = yaml_entry("- id: C-1\n  addresses: [100.64.0.1]\n  amount: 120\n")
    found = issues(text, "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:2"]
    assert "'amount'" in found[0][1]


def test_unknown_top_level_key_in_yaml():
    text = "generated: 2026-11-23\nsubscribers: []\n"
    found = issues(text, "l.yaml")
    assert [loc for loc, _ in found] == ["l.yaml:1"]
    assert "generated" in found[0][1]


def test_subscribers_must_be_a_list():
    assert locations("subscribers: {id: C-1}\n", "l.yaml") == ["l.yaml:1"]
    assert locations("- id: C-1\n", "l.yaml") == ["l.yaml:1"]


def test_entry_not_a_mapping():
    assert locations("subscribers:\n  - C-1\n", "l.yaml") == ["l.yaml:2"]


@pytest.mark.parametrize("row, columns", [
    ("C-1", 1), ("C-1,100.64.0.2,notice,overdue,2030-01-01,other,mac=02:00:00:00:00:01,extra", 8)])
def test_csv_wrong_column_count(row, columns):
    found = issues(f"C-0,100.64.0.1\n{row}\n", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:2"]
    assert f"got {columns}" in found[0][1]


def test_csv_without_trailing_newline_is_truncated():
    text = "C-1,100.64.0.1\nC-2,100.64.0.2\nC-3,100.64.0."
    found = issues(text, "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:3", "l.csv:3"]     # the bad address, and the cut
    assert "no line ending" in found[1][1] and "no header row" in found[1][1]


def test_csv_truncated_even_if_the_last_line_looks_fine():
    """``100.64.0.2`` may be ``100.64.0.23`` cut short: a valid address, someone else's."""
    found = issues("id,addresses\nC-1,100.64.0.1\nC-2,100.64.0.2", "l.csv")
    assert found == [("l.csv:3", "the last line has no line ending and its last cell (addresses) could have "
                                 "been cut short (a truncated export?); end the file with a line ending (a last "
                                 "line without one must hold every column of the header, id,addresses, and end "
                                 "in mode or reason)")]


def test_csv_unterminated_quote():
    found = issues('C-1,100.64.0.1\nC-2,"100.64.0.2\n', "l.csv")
    assert any("not valid CSV" in message for _, message in found)


@pytest.mark.parametrize("text", ["", "   \n\n", "\n"])
@pytest.mark.parametrize("name", ["l.csv", "l.yaml", "l.json"])
def test_empty_file(text, name):
    found = issues(text, name)
    assert [loc for loc, _ in found] == [f"{name}:1"]
    assert "empty" in found[0][1]


@pytest.mark.parametrize("text, name", [("subscribers:\n", "l.yaml"), ('{"subscribers": null}', "l.json")])
def test_null_subscribers_is_not_an_empty_list(text, name):
    with pytest.raises(ListError):
        parse_list(text, name)


@pytest.mark.parametrize("ident", ["0123", "10:20", "1_000"])
def test_unquoted_numeric_looking_ids_keep_their_text(ident):
    from_yaml = parse_list(yaml_entry(f"- id: {ident}\n  addresses: [100.64.0.1]\n"), "l.yaml")
    from_csv = parse_list(f"{ident},100.64.0.1\n", "l.csv")
    assert from_csv[0].id == ident
    assert from_yaml == from_csv


@pytest.mark.parametrize("text, name", [
    ("\ufeff" + CSV_LIST, "restricted.csv"),
    ("\ufeff" + JSON_LIST, "restricted.json"),
])
def test_byte_order_mark_is_ignored(text, name):
    assert parse_list(text, name) == EXPECTED


def test_byte_order_mark_in_yaml_is_ignored():
    assert parse_list("\ufeff" + YAML_LIST, "restricted.yaml") == EXPECTED


def test_plain_integer_ids_match_csv():
    from_yaml = parse_list(yaml_entry("- id: 1001\n  addresses: [100.64.0.1]\n"), "l.yaml")
    assert from_yaml == parse_list("1001,100.64.0.1\n", "l.csv")


# -- everything at once ---------------------------------------------------------------------

def test_list_error_carries_every_issue_yaml():
    text = textwrap.dedent("""\
        subscribers:
          - id: C-1
            addresses: ["100.64.0.300"]
          - id: C-2
            addresses: ["100.64.0.2"]
            mode: blocked
          - id: C-3
            addresses: ["100.64.0.3"]
            reason: "owes 50 EUR"
          - addresses: ["100.64.0.4"]
          - id: C-5
            addresses: ["100.64.0.5"]
            colour: red
    """)
    found = issues(text, "restricted.yaml")
    assert [loc for loc, _ in found] == ["restricted.yaml:2", "restricted.yaml:4", "restricted.yaml:7",
                                         "restricted.yaml:10", "restricted.yaml:11"]
    with pytest.raises(ListError) as info:
        parse_list(text, "restricted.yaml")
    assert len(str(info.value).splitlines()) == 5


def test_list_error_carries_every_issue_csv():
    text = textwrap.dedent("""\
        id,addresses,mode,reason
        C-1,100.64.0.300
        C-2,100.64.0.2,blocked
        C-3
        C-4,100.64.0.4,,owes 50 EUR
        C-5,100.64.0.5
    """)
    assert locations(text, "restricted.csv") == [f"restricted.csv:{n}" for n in (2, 3, 4, 5)]


def test_entry_with_several_problems_reports_each():
    text = yaml_entry("- id: 'a b'\n  addresses: ['x']\n  mode: off-ish\n  reason: 'Big Debt 2026'\n  foo: 1\n")
    found = issues(text, "l.yaml")
    assert len(found) == 5
    assert {loc for loc, _ in found} == {"l.yaml:2"}


def test_list_error_message_is_capped_but_issues_are_not():
    text = "".join(f"C-{i},100.64.0.{i}/24\n" for i in range(1, 31))  # host bits everywhere
    with pytest.raises(ListError) as info:
        parse_list(text, "l.csv")
    assert len(info.value.issues) == 30
    assert str(info.value).endswith("... and 10 more")


def test_duplicate_id_reported_at_the_later_line():
    text = "C-1,100.64.0.1\nC-1,100.64.0.2\n"
    assert locations(text, "l.csv") == ["l.csv:2"]


# -- syntax errors --------------------------------------------------------------------------

def test_json_syntax_error_has_line_number():
    text = '{\n  "subscribers": [\n    {"id": "C-1", "addresses": ["100.64.0.1"]},\n    {"id": "C-2",,}\n  ]\n}\n'
    found = issues(text, "restricted.json")
    assert len(found) == 1
    assert found[0][0] == "restricted.json:4"
    assert found[0][1].startswith("not valid JSON")


def test_json_trailing_comma_is_rejected():
    found = issues('{"subscribers": [\n{"id": "C-1", "addresses": ["100.64.0.1"]},\n]}', "l.json")
    assert found[0][0] == "l.json:3"


def test_json_entry_error_has_line_number():
    text = '{\n  "subscribers": [\n    {"id": "C-1", "addresses": ["100.64.0.1"]},\n' \
           '    {"id": "C-2", "addresses": ["bad"]}\n  ]\n}\n'
    assert locations(text, "l.json") == ["l.json:4"]


def test_yaml_syntax_error_has_line_number():
    text = "subscribers:\n  - id: C-1\n    addresses: [100.64.0.1\n  - id: C-2\n"
    found = issues(text, "l.yaml")
    assert len(found) == 1
    loc = found[0][0]
    assert loc.startswith("l.yaml:") and int(loc.split(":")[1]) in (3, 4)
    assert "not valid YAML" in found[0][1]


def test_yaml_duplicate_key_in_entry():
    text = yaml_entry("- id: C-1\n  addresses: [100.64.0.1]\n  id: C-2\n")
    found = issues(text, "l.yaml")
    assert found[0][0] == "l.yaml:4"
    assert "duplicate key" in found[0][1]


# -- validate_entry (shared with billing events) --------------------------------------------

def test_validate_entry_accepts_address_string_and_reports_into_list():
    found: list = []
    sub = validate_entry({"id": "C-1", "addresses": "100.64.0.1 2001:db8::/64", "mode": "notice"}, "ev", found)
    assert found == []
    assert sub == Subscriber("C-1", (net("100.64.0.1/32"), net("2001:db8::/64")), Mode.NOTICE)
    assert validate_entry(["C-1"], "ev", found) is None
    assert [i.location for i in found] == ["ev"]


# -- format detection -----------------------------------------------------------------------

@pytest.mark.parametrize("name, text, content_type, expected", [
    ("x", "", "application/json", "json"),
    ("x", "", "application/json; charset=utf-8", "json"),
    ("x", "", "application/vnd.billing+json", "json"),
    ("x", "", "application/yaml", "yaml"),
    ("x", "", "application/x-yaml", "yaml"),
    ("x", "", "text/yaml", "yaml"),
    ("x", "", "text/csv", "csv"),
    ("x", "", "application/csv", "csv"),
    ("list.csv", "subscribers: []", "application/json", "json"),  # content type wins over suffix
    ("list.yaml", "", "", "yaml"),
    ("list.YML", "", "", "yaml"),
    ("list.json", "", "", "json"),
    ("list.csv", "{}", "", "csv"),  # suffix wins over content
    ("https://billing.example/export.json?token=abc", "", "", "json"),
    ("https://billing.example/export.csv?x=1.yaml", "", "text/plain", "csv"),
    ("restricted", '  {"subscribers": []}', "", "json"),
    ("restricted", "[]", "", "json"),
    ("restricted", "subscribers:\n  - id: C-1\n", "", "yaml"),
    ("restricted", "---\nsubscribers: []\n", "", "yaml"),
    ("restricted", "# billing export\nsubscribers: []\n", "", "yaml"),
    ("restricted", "# billing export\nC-1,100.64.0.1\n", "", "csv"),
    ("restricted", "id,addresses\nC-1,100.64.0.1\n", "", "csv"),
    ("https://billing.example/restricted", "C-1,100.64.0.1\n", "application/octet-stream", "csv"),
])
def test_detect_format(name, text, content_type, expected):
    assert detect_format(name, text, content_type) == expected


def test_content_type_decides_parsing():
    assert parse_list(JSON_LIST, "https://billing.example/export", "application/json") == EXPECTED
    assert parse_list(CSV_LIST, "https://billing.example/export", "text/csv; charset=utf-8") == EXPECTED


_ADDRESS_TEXT = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
    st.tuples(st.ip_addresses(), st.integers(0, 130)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
        lambda t: f"{ipaddress.ip_network(f'{t[0]}/{t[1]}', strict=False).network_address}/{t[1]}"),
    st.sampled_from(["", "/", "1.2.3", "1.2.3.4/", "::/x", "1.2.3.4/33", "01.2.3.4", "::ffff:1.2.3.4",
                     "fe80::1%eth0", "1.2.3.4 ", "2001:db8::/64/1", "1.2.3.0/+24", "1.2.3.0/ 24", "1.2.3.0/2_4",
                     "1.2.3.0/\uff12\uff14", "1.2.3.0/024", "1.2.3.0/255.255.255.0", "::/0x10"]),
    st.text(max_size=12))


@given(_ADDRESS_TEXT)
@settings(max_examples=400, deadline=None)
def test_fast_address_parser_agrees_with_ipaddress(text: str) -> None:
    """The C-parser fast path must accept, reject and normalise exactly as ``ip_network(strict=True)``."""
    try:
        expected = ipaddress.ip_network(text, strict=True)
    except ValueError:
        with pytest.raises(ValueError):
            _network(text)
        return
    assert _network(text) == expected


def test_subscriber_id_problems_are_named() -> None:
    assert id_problem("C-1001") is None and id_problem(42) is None
    for bad in ("", "-x", "a" * 65, "a b", None, True, 1.5, "C-1\n", "C-1\r\n"):
        assert "not a subscriber id" in (id_problem(bad) or "")


# -- nothing but ListError, whatever the bytes -----------------------------------------------

def _exempt_entry(value: str) -> str:
    return yaml_entry(f"""\
        - id: C-1
          addresses: ["100.64.0.1"]
          exempt_until: {value}
    """)


@pytest.mark.parametrize("value", ["9999-12-31", "'0001-01-01T00:00:00+05:00'", "'9999-12-31T23:59:59-05:00'"])
def test_dates_beyond_the_calendar_are_list_errors_at_the_line(value: str) -> None:
    found = issues(_exempt_entry(value), "l.yaml")
    assert found[0][0] == "l.yaml:2" and "exempt_until" in found[0][1] and "out of the range" in found[0][1]


def test_deep_json_is_a_list_error() -> None:
    for text in ("[" * 100_000 + "]" * 100_000, '{"subscribers": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        found = issues(text, "l.json")
        assert found[0][0] == "l.json:1" and "nested too deeply" in found[0][1]


def test_deep_yaml_is_a_list_error() -> None:
    for depth in (900, 5000):
        found = issues("subscribers: " + "[" * depth + "]" * depth + "\n", "l.yaml")
        assert found[0][0].startswith("l.yaml:")


@pytest.mark.parametrize("checker", ["_fast_entry", "_validated"])
def test_an_unexpected_error_checking_a_line_names_that_line(monkeypatch: pytest.MonkeyPatch, checker: str) -> None:
    """A bug of ours on odd input refuses the list at the line, never escapes as another type,
    in the fast path and in the full one."""
    import enforcer.subscribers as subscribers

    original = getattr(subscribers, checker)

    def broken(raw, *args):
        if raw.get("id") == "C-2":
            raise KeyError("surprise")
        return original(raw, *args)

    if checker == "_validated":
        monkeypatch.setattr(subscribers, "_fast_entry", lambda raw, space: None)
    monkeypatch.setattr(subscribers, checker, broken)
    found = issues("C-1,100.64.0.1\nC-2,100.64.0.2\n", "l.csv")
    assert found == [("l.csv:2", "this entry could not be checked (KeyError: 'surprise')")]


def test_an_unexpected_error_anywhere_is_a_list_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.subscribers as subscribers

    monkeypatch.setattr(subscribers, "_check_unique", lambda *a: 1 / 0)
    found = issues("C-1,100.64.0.1\n", "l.csv")
    assert found[0][0] == "l.csv:1" and "ZeroDivisionError" in found[0][1]


# -- YAML alias bombs ------------------------------------------------------------------------

def _bomb(levels: int) -> str:
    names = "abcdefghij"[:levels]
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(["C-1"] * 9) + "]"]
    for previous, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + f"\nsubscribers: *{names[-1]}\n"


def test_alias_bomb_refused_at_once_with_little_memory() -> None:
    import time
    import tracemalloc

    text = _bomb(9)
    assert len(text) < 450
    tracemalloc.start()
    started = time.perf_counter()
    try:
        found = issues(text, "l.yaml")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5 and peak < 5_000_000
    assert found == [("l.yaml:1", "not valid YAML: anchors and aliases (&name, *name) are not allowed here")]


def test_a_single_alias_is_refused_at_its_line() -> None:
    text = yaml_entry("""\
        - id: C-1
          addresses: &shared ["100.64.0.1"]
        - id: C-2
          addresses: *shared
    """)
    assert locations(text, "l.yaml") == ["l.yaml:3"]


def test_star_and_ampersand_in_quoted_text_are_not_aliases() -> None:
    (sub,) = parse_list('subscribers:\n  - {id: "C-1", addresses: ["100.64.0.1"]}  # a & b *c\n', "l.yaml")
    assert sub.id == "C-1"


def test_node_cap_names_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.subscribers as subscribers

    monkeypatch.setattr(subscribers, "LIST_MAX_NODES", 50)
    text = "subscribers:\n" + "".join(f"  - {{id: C-{i}, addresses: [100.64.0.{i}]}}\n" for i in range(1, 20))
    found = issues(text, "l.yaml")
    assert len(found) == 1 and "more than 50 nodes" in found[0][1] and "cap" in found[0][1]


# -- addresses that are never a subscriber's -------------------------------------------------

@pytest.mark.parametrize("address, words", [
    ("0.0.0.0/16", "unspecified"), ("0.1.2.3", "unspecified"), ("127.0.0.1", "loopback"),
    ("127.5.0.0/16", "loopback"), ("224.0.0.0/16", "multicast"), ("239.1.2.3", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"), ("::", "unspecified"), ("::1", "loopback"),
    ("ff02::1", "multicast"), ("::ffff:100.64.0.5", "IPv4-mapped"), ("::ffff:0:0/96", "IPv4-mapped"),
    ("::/48", "unspecified"),
])
def test_special_use_addresses_are_refused_by_name(address: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_address(address)
    found = issues(f"C-1,100.64.0.1\nC-2,{address}\n", "l.csv")
    assert [loc for loc, _ in found] == ["l.csv:2"] and words in found[0][1]
    errors: list = []
    assert validate_entry({"id": "C-9", "addresses": [address]}, "data", errors) is None
    assert words in errors[0].message


@pytest.mark.parametrize("address", ["1.0.0.0/16", "126.255.255.255", "128.0.0.1", "223.255.255.255",
                                     "100.64.0.5", "2001:db8::1", "::2", "fe80::1", "64:ff9b::1"])
def test_unicast_neighbours_of_special_ranges_are_accepted(address: str) -> None:
    assert parse_address(address) == net(address)


# -- gateway.subscriber_prefixes -------------------------------------------------------------

def test_an_entry_outside_the_subscriber_prefixes_refuses_the_whole_list() -> None:
    from enforcer.address_space import AddressSpace

    space = AddressSpace((net("100.64.0.0/10"), net("2001:db8::/32")))
    text = "C-1,100.64.0.1\nC-2,198.51.100.7\nC-3,2001:db8::5 2001:db9::/48\n"
    found = issues_in_space(text, space)
    assert [loc for loc, _ in found] == ["l.csv:2", "l.csv:3"]
    assert all("outside gateway.subscriber_prefixes" in message for _, message in found)
    assert parse_list(text, "l.csv")[1].addresses == (net("198.51.100.7/32"),)   # no space: any unicast


def issues_in_space(text: str, space: object) -> list[tuple[str, str]]:
    with pytest.raises(ListError) as info:
        parse_list(text, "l.csv", space=space)  # type: ignore[arg-type]
    return [(i.location, i.message) for i in info.value.issues]


def test_a_prefix_over_another_subscriber_names_both_lines() -> None:
    found = issues("C-1,100.64.0.0/24\nC-2,100.64.7.7\nC-3,100.64.0.5\n", "l.csv")
    assert len(found) == 1 and found[0][0] == "l.csv:3"
    assert "l.csv:1" in found[0][1] and "l.csv:3" in found[0][1] and "C-1" in found[0][1]
    # The broad one listed later: reported at the later line, still naming both.
    found = issues("C-3,100.64.0.5\nC-2,100.64.7.7\nC-1,100.64.0.0/24\n", "l.csv")
    assert found[0][0] == "l.csv:3" and "l.csv:1" in found[0][1]


# -- the compact entry (issue 16) ------------------------------------------------------------

def test_an_entry_keeps_kernel_keys_and_gives_back_the_same_networks():
    import dataclasses
    import pickle

    from enforcer.match import NO_MATCH
    from enforcer.subscribers import key_network, key_text, network_key
    spelt = ["100.64.0.1/32", "100.64.8.0/22", "2001:db8::/32", "2001:db8:1:0:0:0:0:1/128", "2001:db8:0:1::/64",
             "2001:db8:0:0:1::/80", "2001:0:0:1::/64", "::ffff:100.64.0.1/128", "::100.64.0.1/128", "64:ff9b::/96",
             "fe80::/64", "2001:db8:a:b:c:d:e:f/128"]
    for text in spelt:
        network = ipaddress.ip_network(text)
        key = network_key(network)
        assert key_network(key) == network and key_text(key) == str(network), text
    sub = Subscriber("C-1", (ipaddress.ip_network("100.64.0.1/32"), ipaddress.ip_network("2001:db8:1::/56")),
                     reason="overdue")
    assert sub.keys == ((4, 32, "100.64.0.1"), (6, 56, "2001:db8:1::"))
    assert sub.addresses == (ipaddress.ip_network("100.64.0.1/32"), ipaddress.ip_network("2001:db8:1::/56"))
    assert sub.address_texts() == ["100.64.0.1/32", "2001:db8:1::/56"]
    assert not hasattr(sub, "__dict__") and sub.match is NO_MATCH
    # still a frozen dataclass to its callers: fields, replace, equality, hashing, copies
    assert [f.name for f in dataclasses.fields(Subscriber)] == [
        "id", "addresses", "mode", "reason", "exempt_until", "exempt_category", "match"]
    moved = dataclasses.replace(sub, addresses=(ipaddress.ip_network("100.64.0.2/32"),))
    assert moved.keys == ((4, 32, "100.64.0.2"),) and moved.reason == "overdue"
    assert dataclasses.replace(moved, addresses=sub.addresses) == sub
    assert hash(dataclasses.replace(sub, mode=Mode.WALLED_GARDEN)) == hash(sub)
    assert dataclasses.replace(sub, mode=Mode.NOTICE) != sub
    assert pickle.loads(pickle.dumps(sub)) == sub
    with pytest.raises(dataclasses.FrozenInstanceError):
        sub.id = "C-2"   # type: ignore[misc]
    assert Subscriber.from_json(sub.to_json()) == sub
    assert "IPv4Network('100.64.0.1/32')" in repr(sub)


def test_list_entries_share_their_reason_and_empty_match():
    subs = parse_list("id,addresses,mode,reason\nC-1,100.64.0.1,walled-garden,overdue\n"
                      "C-2,100.64.0.2,notice,overdue\n", "l.csv")
    assert subs[0].reason is subs[1].reason and subs[0].match is subs[1].match


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_kernel_keys_spell_any_network_as_ipaddress_does(v6: int, plen6: int, v4: int, plen4: int):
    from enforcer.subscribers import key_network, key_text, network_key
    for network in (ipaddress.IPv6Network((v6 >> (128 - plen6) << (128 - plen6), plen6)),
                    ipaddress.IPv4Network((v4 >> (32 - plen4) << (32 - plen4), plen4)),
                    ipaddress.IPv6Network(v6 & 0xFFFF_FFFF),                          # ::a.b.c.d
                    ipaddress.IPv6Network(0xFFFF_0000_0000 | (v6 & 0xFFFF_FFFF))):    # ::ffff:a.b.c.d
        key = network_key(network)
        assert key_network(key) == network and key_text(key) == str(network)
