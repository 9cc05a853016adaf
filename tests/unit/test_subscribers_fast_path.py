"""The list parser's fast path (``subscribers._fast_entry``) against the full check
(``_validated``): it may decline any line, but a line it accepts must be exactly what the full
check accepts, with no issue. Otherwise a list could lift or restrict someone the full check
would have refused."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from enforcer.address_space import AddressSpace, span
from enforcer.subscribers import ListError, _fast_entry, _validated, parse_list

SPACE = AddressSpace((ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("2001:db8::/32")))
#: With entries a subscriber's prefix could cover whole (refused: ``AddressSpace.problem``).
NARROW = AddressSpace((ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("100.64.1.0/24"),
                       ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("2001:db8:ab00::/48")))

# Near-valid pieces: most fields are valid (so whole lines often are), and the rest subtly
# wrong (host bits, leading zeros, widths, special-use, outside the space, embedded IPv4,
# spaces, signs, repeated addresses, wrong types).


def _mostly(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 6).flatmap(lambda k: odd if k == 0 else valid)


_V4 = _mostly(st.sampled_from(["100.64.0.1", "100.64.1.0", "100.127.255.255", "100.64.0.0", "100.100.7.9"]),
              st.sampled_from(["10.0.0.1", "127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "100.064.0.1",
                               "100.64.0", "1.2.3.4", "100.64.0.256", "198.51.100.7", " 100.64.0.9", "1e2.0.0.1",
                               "100.64.0.1\x00", "fe80::1%eth0"]))
_V6 = _mostly(st.sampled_from(["2001:db8::", "2001:db8:1::1", "2001:db8:0:0:0:0:0:1", "2001:DB8:ab00::"]),
              st.sampled_from(["2001:db8::ffff:1.2.3.4", "::1", "::", "ff02::1", "::ffff:100.64.0.1",
                               "2001:db9::", "fe80::1", "2001:db8::g", "2001:db8:::1"]))
_ODD_LEN = st.sampled_from(["/10", "/8", "/129", "/33", "/+24", "/ 24", "/024", "/", "/0", "/1000", "/٣٢", "/32",
                           "/47"])
_ADDRESS = st.one_of(
    st.builds(lambda a, n: a + n, _V4, _mostly(st.sampled_from(["", "", "/32", "/24", "/16"]), _ODD_LEN)),
    st.builds(lambda a, n: a + n, _V6, _mostly(st.sampled_from(["", "/128", "/64", "/56", "/48"]), _ODD_LEN)))
_ADDRESSES = _mostly(st.one_of(st.lists(_ADDRESS, min_size=1, max_size=2).map(" ".join),
                               st.lists(_ADDRESS, min_size=1, max_size=2)),
                     st.one_of(st.lists(st.one_of(_ADDRESS, st.integers(), st.none()), max_size=2),
                               st.just(""), st.just("  "), st.none(), st.integers()))
_ID = _mostly(st.sampled_from(["C-1", "c.2:x/y", "x" * 64, "0"]),
              st.one_of(st.sampled_from(["C 1", "", "-C", "C-1\n", "x" * 65, "é"]), st.integers(), st.none(),
                        st.booleans()))
_MODE = _mostly(st.sampled_from(["", "walled-garden", "notice", "throttle", None]),
                st.one_of(st.sampled_from(["free", "Notice", " notice", "walled"]), st.integers()))
_REASON = _mostly(st.sampled_from(["", "overdue", "a_b-1", None, "Overdue", "over due", " Fair  Use "]),
                  st.one_of(st.sampled_from(["x" * 33, "-x", "owes 120 EUR", "a b c d", "été", "  ", "12"]),
                            st.integers()))


@st.composite
def entries(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key, values in (("id", _ID), ("addresses", _ADDRESSES), ("mode", _MODE), ("reason", _REASON)):
        if draw(st.integers(0, 9)):      # each field present most of the time
            raw[key] = draw(values)
    extra = draw(st.sampled_from([None, None, None, None, None, ("match", {"mac": "02:00:00:00:00:01"}),
                                  ("exempt_until", "2030-01-01"), ("exempt_category", "other"), ("bogus", 1)]))
    if extra:
        raw[extra[0]] = extra[1]
    return raw


def _agrees(raw: dict[str, Any], space: AddressSpace | None) -> bool:
    fast = _fast_entry(raw, space)
    if fast is None:
        return False
    issues: list[Any] = []
    full = _validated(raw, "where", issues, space)
    assert issues == [] and full is not None, (raw, issues)
    subscriber, networks = full
    assert fast[0] == subscriber, raw
    assert fast[1] == [span(network) for network in networks], raw
    return True


@settings(max_examples=3000, deadline=None)
@given(entries(), st.sampled_from([None, SPACE, NARROW]))
@example({"id": "C-1", "addresses": "100.64.0.1 2001:db8::/56", "mode": "notice", "reason": "overdue"}, SPACE)
@example({"id": "C-1", "addresses": ["100.64.0.0/16"]}, None)
@example({"id": "C-1", "addresses": ["100.64.1.0/24"]}, NARROW)
@example({"id": "C-1", "addresses": ["2001:db8:ab00::/48"]}, NARROW)
@example({"id": "C-1", "addresses": ["2001:db8::/32"]}, None)
@example({"id": "C-1", "addresses": ["100.64.0.1"], "mode": None, "reason": " Over Due "}, SPACE)
def test_the_fast_path_accepts_only_what_the_full_check_accepts(raw: dict[str, Any], space: AddressSpace | None
                                                                ) -> None:
    ACCEPTED.append(_agrees(raw, space))


ACCEPTED: list[bool] = []


def test_the_property_reached_both_answers() -> None:
    """The generator must produce lines the fast path takes (a few percent is hundreds) (else the property above
    proves nothing) and often ones it declines."""
    if not ACCEPTED:
        test_the_fast_path_accepts_only_what_the_full_check_accepts()
    taken = sum(ACCEPTED)
    assert len(ACCEPTED) // 50 < taken < len(ACCEPTED) * 9 // 10, (taken, len(ACCEPTED))


def test_the_fast_path_takes_the_common_lines() -> None:
    """It must actually be used for the lines a billing export is made of (else the cold start
    is the full check's again)."""
    assert _agrees({"id": "C-0000001", "addresses": "100.64.0.2 2001:db8:0:100::/56", "mode": "walled-garden",
                    "reason": "overdue"}, SPACE)
    assert _agrees({"id": "C-2", "addresses": ["100.64.0.3"]}, None)
    assert _agrees({"id": "C-3", "addresses": "100.64.0.4", "mode": "", "reason": ""}, SPACE)


def test_a_list_with_conflicts_is_worded_the_same_through_the_fast_path() -> None:
    """Overlaps found among fast-path lines name both lines and the addresses as written."""
    text = ("id,addresses\nC-1,100.64.0.0/24\nC-2,100.64.0.7\nC-3,2001:db8::/48\nC-4,2001:db8::/56\n"
            "C-5,100.64.1.1\nC-6,100.64.1.1\n")
    try:
        parse_list(text, "l.csv", space=SPACE)
    except ListError as exc:
        found = [(i.location, i.message) for i in exc.issues]
    else:
        raise AssertionError("overlaps accepted")
    assert found == [
        ("l.csv:3", "address 100.64.0.7/32 of C-2 (line 3, l.csv:3) lies inside "
                    "100.64.0.0/24 of C-1 (line 2, l.csv:2)"),
        ("l.csv:5", "address 2001:db8::/56 of C-4 (line 5, l.csv:5) lies inside "
                    "2001:db8::/48 of C-3 (line 4, l.csv:4)"),
        ("l.csv:7", "address 100.64.1.1/32 of C-6 is also held by C-5 (line 6, l.csv:6)"),
    ], found


def test_a_zoned_address_is_refused_with_its_reason() -> None:
    """``fe80::1%eth0``: ``ipaddress`` accepts it and drops the zone, so ``fe80::1%eth0 fe80::1``
    was one address listed twice without a word; now the zone is named (found in review)."""
    try:
        parse_list("C-1,fe80::1%eth0 2001:db8::1\n", "l.csv")
    except ListError as exc:
        assert [(i.location, i.message) for i in exc.issues] == [
            ("l.csv:1", "address 'fe80::1%eth0': fe80::1%eth0 carries a zone (%...); a subscriber's address "
                        "is written without one")]
    else:
        raise AssertionError("a zoned address was accepted")
