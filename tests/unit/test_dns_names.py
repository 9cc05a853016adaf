"""AllowedNames: exact names and strict wildcard suffixes, case-insensitive, trailing dot ignored."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.dns_garden.names import AllowedNames, wire_name

ALLOWED = AllowedNames(["pay.example.net"], ["psp.example"])


@pytest.mark.parametrize(("qname", "allowed"), [
    ("pay.example.net", True),
    ("PAY.Example.NET.", True),
    ("pay.example.net.", True),
    ("www.pay.example.net", False),     # exact names allow nothing below them
    ("example.net", False),
    ("a.psp.example", True),
    ("x.y.psp.example", True),
    ("A.PSP.EXAMPLE.", True),
    ("psp.example", False),             # the wildcard's own name is not listed
    ("psp.example.", False),
    ("xpsp.example", False),            # a label boundary is required
    ("a.xpsp.example", False),
    ("psp.example.evil", False),
    ("", False),
    (".", False),
])
def test_allows(qname: str, allowed: bool) -> None:
    assert ALLOWED.allows(qname) is allowed
    if qname.strip("."):
        assert ALLOWED.allows_wire(wire_name(qname)) is allowed


def test_non_ascii_letters_are_not_folded() -> None:
    # DNS folds ASCII only: "İ".lower() is "i̇", which must not make a name match.
    names = AllowedNames(["i.example"])
    assert not names.allows("\u0130.example")
    assert names.allows("I.example")


def test_configured_names_are_normalized() -> None:
    names = AllowedNames(["Pay.Example.NET."], ["PSP.example."])
    assert names.allows("pay.example.net") and names.allows("a.psp.example")
    assert not AllowedNames()


def test_a_label_holding_a_dot_is_not_two_labels() -> None:
    # On the wire "a.psp" can be ONE label; below example it is not below psp.example.
    assert not ALLOWED.allows_wire(b"\x05a.psp\x07example\x00")
    assert ALLOWED.allows_wire(b"\x01a\x03psp\x07example\x00")


def test_invalid_allowed_name_is_named() -> None:
    with pytest.raises(ValueError, match=r"x{64}"):
        AllowedNames(["x" * 64 + ".example"])


label = st.text(alphabet="abcXYZ09-", min_size=1, max_size=8)


@given(st.lists(label, min_size=1, max_size=5))
def test_text_and_wire_agree(labels: list[str]) -> None:
    qname = ".".join(labels)
    assert ALLOWED.allows(qname) == ALLOWED.allows_wire(wire_name(qname))
    below = qname + ".psp.example"
    assert ALLOWED.allows(below) and ALLOWED.allows_wire(wire_name(below).upper())


@given(st.binary(max_size=300))
def test_wire_never_crashes(data: bytes) -> None:
    ALLOWED.allows_wire(data)
