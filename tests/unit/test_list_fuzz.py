"""Fuzzing the parsers that take billing's and the operator's bytes (hypothesis, bounded).

Whatever the text: the list parser returns subscribers or raises ``ListError`` (nothing else),
``read_list_file`` the same or ``OSError``, and the config parser returns a ``Config`` or raises
``ConfigError``. Any other exception is a bug: it would kill the source task or crash start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.address_space import AddressSpace
from enforcer.config import Config, ConfigError, parse_config
from enforcer.sources import read_list_file
from enforcer.subscribers import ListError, Subscriber, parse_list

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces that reach deep into the parsers: list syntax, dates at the calendar's ends, odd addresses.
_WORDS = st.sampled_from([
    "subscribers:", "subscribers: []", "- id: C-1", "  addresses: [100.64.0.1]", "addresses", "mode", "reason",
    "exempt_until", "exempt_category", "9999-12-31", "0001-01-01T00:00:00+05:00", "1e400", "nan", "-inf",
    "127.0.0.1", "::ffff:100.64.0.5", "0.0.0.0/16", "100.64.0.0/10", "2001:db8::/32", "&a", "*a", "!!binary",
    "!!python/object", "{", "}", "[", "]", ",", ":", "-", "\"", "'", "#", "\n", "  ", "\t", "\ufeff", "\x00",
    "walled-garden", "notice", "overdue", "dispute", "C-1\n", "id,addresses,mode,reason",
    "match", "  match: {mac: 02:00:00:00:00:01}", "username=u1;mac=0200.0000.0001", "circuit_id=", "remote_id",
    "id,match,addresses", "=", ";",
])
_TEXT = st.one_of(st.text(max_size=300), st.lists(_WORDS, max_size=40).map("".join),
                  st.lists(st.one_of(_WORDS, st.text(max_size=5)), max_size=30).map(" ".join))


def _match() -> st.SearchStrategy[object]:
    """Match keys as billing may write them (good, misspelt, odd values) or any value at all."""
    scalar = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none())
    keys = st.sampled_from(["username", "mac", "circuit_id", "remote_id", "imsi", "", "MAC"])
    values = st.one_of(st.sampled_from(["02:00:00:00:00:01", "02-00-00-00-00-01", "0200.0000.0001", "zz",
                                        "u1@isp", " u1", "x" * 254, "a\x00b"]), scalar)
    mapping = st.dictionaries(keys, values, max_size=4)
    spelled = mapping.map(lambda m: ";".join(f"{k}={v}" for k, v in m.items()))
    return st.one_of(mapping, spelled, scalar, st.lists(scalar, max_size=2))


def _entry() -> st.SearchStrategy[dict]:
    scalar = st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none())
    value = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=5), scalar, max_size=2))
    return st.fixed_dictionaries({}, optional={
        "id": st.one_of(st.sampled_from(["C-1", "C-2", "1004", "C-1\n"]), value),
        "addresses": st.one_of(st.lists(st.sampled_from(["100.64.0.1", "100.64.0.0/24", "127.0.0.1", "::", "::1",
                                                         "2001:db8::/56", "224.0.0.1", "300.1.1.1"]), max_size=3),
                               value),
        "mode": st.one_of(st.sampled_from(["walled-garden", "notice", "throttle", "free"]), value),
        "reason": value, "exempt_until": st.one_of(st.sampled_from(["9999-12-31", "0001-01-01T00:00+05:00",
                                                                     "2026-12-31", "1e400"]), value),
        "exempt_category": value, "match": _match(), "extra": value})


def _check_list(text: str, name: str, content_type: str = "", space: AddressSpace | None = None) -> None:
    try:
        result = parse_list(text, name, content_type, space=space)
    except ListError as exc:
        assert exc.issues and all(i.location.startswith(f"{name}:") for i in exc.issues), exc.issues
        return
    assert isinstance(result, list) and all(isinstance(s, Subscriber) for s in result)


@pytest.mark.parametrize("name", ["l.yaml", "l.json", "l.csv", "export"])
@given(text=_TEXT)
@FUZZ
def test_any_text_is_a_list_or_a_list_error(name: str, text: str) -> None:
    _check_list(text, name)


@given(entries=st.lists(_entry(), max_size=4), fmt=st.sampled_from(["json", "yaml"]))
@FUZZ
def test_any_structured_list_is_a_list_or_a_list_error(entries: list, fmt: str) -> None:
    document = {"subscribers": entries}
    text = json.dumps(document) if fmt == "json" else "subscribers:\n" + "".join(
        f"  - {json.dumps(e)}\n" for e in entries)
    _check_list(text, f"l.{fmt}", space=AddressSpace())


@given(rows=st.lists(st.lists(st.one_of(_WORDS, st.text(max_size=10)), max_size=8), max_size=6))
@FUZZ
def test_any_csv_is_a_list_or_a_list_error(rows: list) -> None:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows(rows)
    _check_list(out.getvalue(), "l.csv")


@given(data=st.binary(max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_in_a_list_file_are_a_list_or_a_list_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "restricted.yaml"
    path.write_bytes(data)
    try:
        update = read_list_file(str(path))
    except ListError as exc:
        assert all(i.location.startswith(f"{path}:") for i in exc.issues)
        return
    assert update.origin == str(path)


_CONFIG_WORDS = st.sampled_from([
    "subscribers:", "  source: /srv/l.csv", "  source: https://b.example/x", "gateway:", "  subscriber_prefixes:",
    "    - 100.64.0.0/10", "    - ::/0", "portal:", "  url:", "policy:", "  promise_to_pay:", "    webhook_url: x",
    "  windows:", "    hours: ['08:00-18:00']", "    timezone: Europe/Prague", "api:", "  listen: '[::]:8787'",
    "metrics:", "walled_garden:", "  allow: [pay.example]", "  dns: any", "2026-02-30", "!!binary x", "&a", "*a",
    "{", "[", "]", "}", ":", "-", "~", "null", "1e999", ".nan", "true", "\n", "  ", "'", '"', "\x00",
])


@given(text=st.one_of(st.text(max_size=200), st.lists(_CONFIG_WORDS, max_size=40).map("\n".join),
                      st.lists(_CONFIG_WORDS, max_size=40).map(" ".join)))
@FUZZ
def test_any_config_is_a_config_or_a_config_error(text: str) -> None:
    try:
        config = parse_config(text, "c.yaml")
    except ConfigError as exc:
        assert exc.issues
        return
    assert isinstance(config, Config)


def _good_entry(index: int, keys: list[str], with_address: bool, mac_style: int) -> dict:
    """Entry ``index`` of a valid list: unique id, address and match values, MAC in one of the
    usual spellings."""
    digits = f"0200{index:08x}"
    macs = [":".join(digits[i:i + 2] for i in range(0, 12, 2)), "-".join(digits[i:i + 2] for i in range(0, 12, 2)),
            ".".join(digits[i:i + 4] for i in range(0, 12, 4)), digits.upper()]
    values = {"username": f"u{index}@isp", "circuit_id": f"olt1/1/{index}", "remote_id": f"ont-{index}",
              "mac": macs[mac_style]}
    entry: dict = {"id": f"C-{index}", "match": {k: values[k] for k in keys}}
    if with_address or not keys:
        entry["addresses"] = [f"100.64.{index // 256}.{index % 256}"]
    if not keys:
        del entry["match"]
    return entry


_GOOD_ENTRIES = st.lists(st.tuples(st.lists(st.sampled_from(["username", "circuit_id", "remote_id", "mac"]),
                                            unique=True, max_size=4),
                                   st.booleans(), st.integers(0, 3)), max_size=6).map(
    lambda specs: [_good_entry(i, *spec) for i, spec in enumerate(specs)])


@given(entries=_GOOD_ENTRIES)
@FUZZ
def test_valid_entries_with_match_read_alike_in_every_format_and_round_trip(entries: list) -> None:
    """YAML, JSON and CSV (match as the last column) of one list give the same subscribers, and
    each survives the store's JSON row."""
    yaml_text = ("subscribers:\n" + "".join(f"  - {json.dumps(e)}\n" for e in entries)) if entries \
        else "subscribers: []\n"
    csv_rows = "".join(f"{e['id']},{' '.join(e.get('addresses', []))},,,,,"
                       f"{';'.join(f'{k}={v}' for k, v in e.get('match', {}).items())}\n" for e in entries)
    parsed = [parse_list(yaml_text, "l.yaml"), parse_list(json.dumps({"subscribers": entries}), "l.json")]
    if entries:
        parsed.append(parse_list(csv_rows, "l.csv"))
    assert all(p == parsed[0] for p in parsed)
    assert [bool(s.match) for s in parsed[0]] == ["match" in e for e in entries]
    assert [Subscriber.from_json(json.loads(json.dumps(s.to_json()))) for s in parsed[0]] == parsed[0]
