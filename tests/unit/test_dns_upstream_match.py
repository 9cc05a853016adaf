"""Which upstream answers the forwarder takes (``upstream._is_answer_to``), and the forwarder's own
answers' OPT (``forwarder.reply``): pure checks on wire bytes.

An answer is taken for the question it echoes whatever the letter case of the name (RFC 4343; a
resolver or middlebox that lowers the name answers the same question), but never for another
type, class or label structure; an error without a question (RFC 1035 allows it) is taken when it
holds nothing else. The forwarder answers a query with EDNS with an OPT of its own (RFC 6891 6.1.1).
"""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from enforcer.dns_garden.forwarder import EDNS_PAYLOAD, parse_query, reply
from enforcer.dns_garden.upstream import BARE_ERRORS, _is_answer_to


def question_of(name: str, rdtype: str = "A") -> bytes:
    parsed = parse_query(dns.message.make_query(name, rdtype).to_wire())
    assert parsed is not None
    return parsed.question


def response(question: bytes) -> bytes:
    """A NOERROR response echoing ``question`` as given, without records."""
    return b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question


def answer_for(name: str, echoed: str, rdtype: str = "A") -> bytes:
    """The upstream's answer to ``name`` echoing ``echoed`` as its question (dnspython keeps case)."""
    message = dns.message.make_response(dns.message.make_query(echoed, rdtype))
    message.answer.append(dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "203.0.113.7"))
    return message.to_wire()


@pytest.mark.parametrize(("asked", "echoed"), [
    ("LowerQ.Psp.Example", "lowerq.psp.example"),    # a resolver or middlebox lowered it
    ("lowerq.psp.example", "LOWERQ.PSP.EXAMPLE"),
    ("wWw.pAy.ExAmPlE.nEt", "www.pay.example.net"),   # a 0x20 mix
    ("pay.example.net", "pay.example.net"),           # byte-equal: the common case
])
def test_the_same_question_in_another_letter_case_is_an_answer(asked: str, echoed: str) -> None:
    assert _is_answer_to(answer_for(asked, echoed), question_of(asked))


@pytest.mark.parametrize(("asked", "echoed", "why"), [
    ("lowerq.psp.example", "lowerr.psp.example", "another name"),
    ("ab.example", "a.b.example", "other labels, same length"),
    ("a@b.example", "a`b.example", "@ and ` are not letters"),
    ("a[b.example", "a{b.example", "[ and { are not letters"),
])
def test_another_name_is_not_an_answer(asked: str, echoed: str, why: str) -> None:
    assert not _is_answer_to(answer_for(asked, echoed), question_of(asked)), why


def test_type_and_class_compare_exactly_not_as_letters() -> None:
    """Type 0x0041 (HTTPS... 65) and 0x0061 (97): lowering the whole section would take one for the
    other; class likewise."""
    asked = question_of("Pay.Example.Net", "TYPE65")
    assert asked[-4:] == b"\x00\x41\x00\x01"
    lowered = asked[:-4].lower() + b"\x00\x61\x00\x01"
    assert not _is_answer_to(response(lowered), asked)
    assert _is_answer_to(response(asked[:-4].lower() + asked[-4:]), asked)
    other_class = asked[:-2] + b"\x00\x03"
    assert not _is_answer_to(response(other_class), asked)


def test_a_label_byte_outside_ascii_is_compared_exactly() -> None:
    asked = b"\x03\xc1bc\x07example\x00\x00\x01\x00\x01"
    assert not _is_answer_to(response(b"\x03\xe1bc\x07example\x00\x00\x01\x00\x01"), asked)
    assert _is_answer_to(response(b"\x03\xc1BC\x07EXAMPLE\x00\x00\x01\x00\x01"), asked)


def test_no_response_flag_or_a_short_answer_is_not_an_answer() -> None:
    asked = question_of("pay.example.net")
    wire = answer_for("pay.example.net", "pay.example.net")
    assert not _is_answer_to(wire[:2] + bytes([wire[2] & 0x7F]) + wire[3:], asked)
    assert not _is_answer_to(wire[:12 + len(asked) - 1], asked)


def bare(rcode: int, qr: bool = True, counts: bytes = b"\x00\x00\x00\x00\x00\x00\x00\x00", body: bytes = b"") -> bytes:
    return b"\x12\x34" + bytes([0x80 if qr else 0, rcode]) + counts + body


OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"   # root, OPT, 1232, ext rcode 0, v0, no flags, no rdata


@pytest.mark.parametrize("rcode", sorted(BARE_ERRORS))
def test_an_error_without_a_question_is_an_answer(rcode: int) -> None:
    asked = question_of("pay.example.net")
    assert _is_answer_to(bare(rcode), asked)
    assert _is_answer_to(bare(rcode, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01", body=OPT), asked)
    with_option = OPT[:-2] + b"\x00\x06" + b"\x00\x0f\x00\x02\x00\x01"   # an extended DNS error option
    assert _is_answer_to(bare(rcode, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01", body=with_option), asked)
    assert rcode in {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}


@pytest.mark.parametrize(("wire", "why"), [
    (bare(0), "NOERROR without a question"),
    (bare(3), "NXDOMAIN without a question"),
    (bare(2, qr=False), "not a response"),
    (bare(2) + b"\x00", "a byte after the header"),
    (bare(2, counts=b"\x00\x00\x00\x01\x00\x00\x00\x00",
          body=b"\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x07"), "an answer record"),
    (bare(2, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01", body=OPT[:4]), "an OPT cut short"),
    (bare(2, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01", body=OPT + b"\x00"), "a byte after the OPT"),
    (bare(2, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01", body=OPT[:5] + b"\x01" + OPT[6:]), "extended RCODE"),
    (bare(2, counts=b"\x00\x00\x00\x00\x00\x00\x00\x01",
          body=b"\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xcb\x00\x71\x07"), "an A record, not an OPT"),
    (bare(2, counts=b"\x00\x00\x00\x00\x00\x00\x00\x02", body=OPT + OPT), "two records"),
])
def test_anything_more_without_a_question_is_not_an_answer(wire: bytes, why: str) -> None:
    assert not _is_answer_to(wire, question_of("pay.example.net")), why


# -- the forwarder's own answers: an OPT for a query with one (RFC 6891 6.1.1) ---------------------

def opt_of(wire: bytes) -> dns.message.Message:
    return dns.message.from_wire(wire)


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.SERVFAIL])
def test_own_answers_to_a_query_with_edns_carry_an_opt(rcode: int) -> None:
    query = dns.message.make_query("Pay.Example.Net", "A", use_edns=0, payload=4096, want_dnssec=True)
    wire = query.to_wire()
    parsed = parse_query(wire)
    assert parsed is not None
    answer = dns.message.from_wire(reply(wire, rcode, parsed.question))
    assert answer.id == query.id and answer.rcode() == rcode and answer.flags & dns.flags.QR
    assert answer.question == query.question and not answer.answer and not answer.authority
    assert answer.edns == 0 and answer.payload == EDNS_PAYLOAD and not answer.options
    assert answer.ednsflags & dns.flags.DO, "the DO bit copied (RFC 3225 3)"
    plain = dns.message.make_query("pay.example.net", "A", use_edns=0).to_wire()
    assert not dns.message.from_wire(reply(plain, rcode)).ednsflags & dns.flags.DO


def test_own_answers_to_a_query_without_edns_carry_none() -> None:
    wire = dns.message.make_query("pay.example.net", "A").to_wire()
    answer = reply(wire, dns.rcode.REFUSED, question_of("pay.example.net"))
    assert answer[10:12] == b"\x00\x00" and dns.message.from_wire(answer).edns == -1


def test_a_formerr_to_a_query_with_an_opt_but_no_question_carries_one() -> None:
    """A query with only an OPT (a DNS cookie's first exchange, RFC 7873 5.4) or with a question the
    forwarder does not take (compressed): FORMERR without a question, with an OPT."""
    cookie = dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8)
    query = dns.message.make_query("pay.example.net", "A", use_edns=0, options=[cookie])
    query.question = []
    for wire in (query.to_wire(),
                 b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\xc0\x0c\x00\x01\x00\x01" + OPT):
        assert parse_query(wire) is None
        answer = dns.message.from_wire(reply(wire, dns.rcode.FORMERR))
        assert answer.rcode() == dns.rcode.FORMERR and answer.edns == 0 and not answer.question


@pytest.mark.parametrize("wire", [
    b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x05ab",                          # cut in the question
    b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x01a\x00\x00\x01\x00\x01\x00\x00",  # cut in the record
    b"\xab\xcd\x01\x00\x00\x00\x00\x00\x00\x00\xff\xff",                                # counts and nothing
    b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x40",                            # a bad label type
])
def test_an_unreadable_query_gets_an_answer_without_opt(wire: bytes) -> None:
    answer = reply(wire, dns.rcode.FORMERR)
    assert answer[:2] == b"\xab\xcd" and answer[3] & 0x0F == dns.rcode.FORMERR and answer[10:12] == b"\x00\x00"
