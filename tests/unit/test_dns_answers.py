"""garden_addresses: the qname's and its CNAME chain's A/AAAA only; any input parses or raises AnswerError."""

from __future__ import annotations

from ipaddress import ip_address

import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.dns_garden.answers import MAX_CHAIN, AnswerError, garden_addresses, parse


def answer(qname: str, *records: tuple[str, int, str, str], qtype: str = "A") -> dns.message.Message:
    """A response to ``qname``/``qtype`` with answer records (owner, ttl, type, data)."""
    response = dns.message.make_response(dns.message.make_query(qname, qtype))
    for owner, ttl, rdtype, data in records:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, data))
    return response


def test_direct_addresses_both_families_with_ttl_capped_plus_margin() -> None:
    response = answer("pay.example.net", ("pay.example.net.", 300, "A", "192.0.2.10"),
                      ("pay.example.net.", 999999, "AAAA", "2001:db8::10"))
    assert garden_addresses(response, "pay.example.net", max_ttl=86400, ttl_margin=120) == [
        (ip_address("192.0.2.10"), 420), (ip_address("2001:db8::10"), 86520)]


def test_cname_chain_followed_other_owners_ignored() -> None:
    response = answer("www.pay.example.net",
                      ("www.pay.example.net.", 60, "CNAME", "pay.cdn.example."),
                      ("pay.cdn.example.", 60, "CNAME", "Edge.CDN.example."),
                      ("edge.cdn.example.", 20, "A", "203.0.113.7"),
                      ("evil.example.", 60, "A", "198.51.100.66"),             # not on the chain
                      ("other.cdn.example.", 60, "CNAME", "evil.example."))    # a chain not from the qname
    response.additional.append(dns.rrset.from_text("pay.cdn.example.", 60, "IN", "A", "198.51.100.67"))
    assert garden_addresses(response.to_wire(), "WWW.pay.example.net.", 86400, 0) == [
        (ip_address("203.0.113.7"), 20)]


def test_dname_ignored() -> None:
    response = answer("a.psp.example", ("psp.example.", 60, "DNAME", "cdn.example."),
                      ("a.cdn.example.", 60, "A", "198.51.100.1"))
    assert garden_addresses(response, "a.psp.example", 86400, 0) == []


def test_cname_loop_ends() -> None:
    response = answer("a.example", ("a.example.", 60, "CNAME", "b.example."),
                      ("b.example.", 60, "CNAME", "a.example."), ("b.example.", 60, "A", "192.0.2.1"))
    assert garden_addresses(response, "a.example", 86400, 0) == [(ip_address("192.0.2.1"), 60)]


def test_owner_with_two_cname_targets_ends_the_chain() -> None:
    response = answer("a.example", ("a.example.", 60, "CNAME", "b.example."), ("b.example.", 60, "A", "192.0.2.1"))
    response.answer.append(dns.rrset.from_text("a.example.", 60, "IN", "CNAME", "c.example."))
    response.answer.append(dns.rrset.from_text("a.example.", 60, "IN", "A", "192.0.2.9"))
    assert garden_addresses(response.to_wire(), "a.example", 86400, 0) == [(ip_address("192.0.2.9"), 60)]


def test_chain_length_is_bounded() -> None:
    records = [(f"n{i}.example.", 60, "CNAME", f"n{i + 1}.example.") for i in range(40)]
    records += [(f"n{i}.example.", 60, "A", f"192.0.2.{i}") for i in range(41)]
    addresses = garden_addresses(answer("n0.example", *records), "n0.example", 86400, 0)
    assert [str(address) for address, _ in addresses] == [f"192.0.2.{i}" for i in range(MAX_CHAIN)]


def test_duplicate_address_keeps_longest_hold() -> None:
    response = answer("a.example", ("a.example.", 60, "CNAME", "b.example."),
                      ("a.example.", 10, "A", "192.0.2.1"), ("b.example.", 500, "A", "192.0.2.1"))
    assert garden_addresses(response, "a.example", 86400, 5) == [(ip_address("192.0.2.1"), 505)]


def test_other_class_ignored_and_nxdomain_gives_nothing() -> None:
    response = answer("a.example")
    response.answer.append(dns.rrset.from_text("a.example.", 60, "CLASS5", "A", r"\# 4 c0000201"))
    response.set_rcode(3)
    assert garden_addresses(response.to_wire(), "a.example", 86400, 0) == []


@pytest.mark.parametrize("wire", [b"", b"\x00" * 11, b"\xff" * 40, answer("a.example").to_wire()[:-3]])
def test_garbage_raises_answer_error(wire: bytes) -> None:
    with pytest.raises(AnswerError, match="unparsable"):
        garden_addresses(wire, "a.example", 86400, 0)


def test_bad_qname_raises_answer_error() -> None:
    with pytest.raises(AnswerError, match="question name"):
        garden_addresses(answer("a.example"), "x" * 64 + ".example", 86400, 0)


REAL = [answer("www.pay.example.net", ("www.pay.example.net.", 60, "CNAME", "pay.cdn.example."),
               ("pay.cdn.example.", 60, "A", "203.0.113.7"), ("pay.cdn.example.", 60, "AAAA", "2001:db8::7")
               ).to_wire(),
        answer("a.example", ("a.example.", 60, "A", "192.0.2.1"), ("a.example.", 60, "A", "192.0.2.2")).to_wire()]


def check(wire: bytes, qname: str = "www.pay.example.net") -> None:
    """Never a crash; and whenever dnspython's full parse accepts the answer, the record reader
    finds exactly the addresses, with the same holds, that the parsed message gives."""
    try:
        full = garden_addresses(parse(wire), qname, 86400, 120)
    except AnswerError:
        full = None
    try:
        result = garden_addresses(wire, qname, 86400, 120)
    except AnswerError:
        assert full is None, "dnspython parsed an answer the record reader refused"
        return
    if full is not None:
        assert result == full
    for address, seconds in result:
        assert address.version in (4, 6)
        assert 120 <= seconds <= 86400 + 120


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    check(data)


@settings(max_examples=600)
@given(st.sampled_from(REAL), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                                 st.sampled_from(["set", "insert", "delete"])), max_size=6))
def test_mutated_real_answers_never_crash(wire: bytes, edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(wire)
    for where, value, how in edits:
        at = where % (len(data) + 1)
        if how == "insert":
            data[at:at] = bytes([value])
        elif data and at < len(data):
            if how == "set":
                data[at] = value
            else:
                del data[at]
    check(bytes(data))
    check(bytes(data), "a.example")


names = st.sampled_from(["a.example.", "b.example.", "c.example.", "d.example."])


@settings(max_examples=300)
@given(st.lists(st.tuples(names, st.sampled_from(["CNAME", "A", "AAAA"]), names,
                          st.integers(0, 2**31 - 1)), max_size=12))
def test_random_chains_only_reach_addresses_on_the_chain(records: list[tuple[str, str, str, int]]) -> None:
    response = answer("a.example")
    cnames: dict[str, str | None] = {}   # owner -> its CNAME target; None: several (invalid, not followed)
    owners: dict[str, set[str]] = {}
    for n, (owner, rdtype, target, ttl) in enumerate(records):
        if rdtype == "CNAME":
            data = target
            cnames[owner] = target if cnames.get(owner, target) == target else None
        else:
            data = f"192.0.2.{n}" if rdtype == "A" else f"2001:db8::{n:x}"
            owners.setdefault(owner, set()).add(data)
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, data))
    chain, name = ["a.example."], "a.example."
    while (target := cnames.get(name)) is not None and target not in chain and len(chain) < MAX_CHAIN:
        name = target
        chain.append(name)
    expected = {ip_address(data) for owner in chain for data in owners.get(owner, ())}
    got = garden_addresses(response.to_wire(), "a.example", 86400, 0)
    assert {address for address, _ in got} == expected
    assert got == garden_addresses(parse(response.to_wire()), "a.example", 86400, 0)


def test_names_compare_without_case_and_compressed_targets_are_followed() -> None:
    wire = answer("www.pay.example.net", ("WWW.Pay.Example.NET.", 300, "CNAME", "Edge.CDN.example."),
                  ("edge.cdn.EXAMPLE.", 60, "A", "203.0.113.7")).to_wire()
    assert garden_addresses(wire, "www.pay.example.net", 3600, 120) == [(ip_address("203.0.113.7"), 180)]


def test_an_address_record_of_the_wrong_length_or_trailing_bytes_is_refused() -> None:
    wire = answer("a.example", ("a.example.", 60, "A", "192.0.2.1")).to_wire()
    with pytest.raises(AnswerError, match="after the last record"):
        garden_addresses(wire + b"\0", "a.example", 3600, 0)
    short = bytearray(wire)
    short[-6:-4] = (3).to_bytes(2, "big")     # the A record's rdlength: 3, its data one byte longer
    with pytest.raises(AnswerError):
        garden_addresses(bytes(short), "a.example", 3600, 0)
