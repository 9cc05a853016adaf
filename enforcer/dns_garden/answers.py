"""The addresses an answer for an allowed name puts in the walled garden.

Only the question name's own A/AAAA records and those of its CNAME chain count: the chain is
followed from the question name (``www.pay.example CNAME pay.cdn.example CNAME edge.cdn.example
A 203.0.113.7``), so a record the upstream added for some other owner (additional data, an
unrelated owner in the answer section, a poisoned glue record) never opens the garden. DNAME is
ignored: it would rewrite a whole subtree, and upstreams send the synthesized CNAME anyway
(RFC 6672), which the chain follows. The chain is at most ``MAX_CHAIN`` names long and loops end
it, so a hostile answer costs bounded work; an owner with two CNAME targets (invalid, RFC 2181
10.1) ends it too, as no single chain can be told from it.

Each address is held ``min(ttl, max_ttl) + ttl_margin`` seconds: the client may use it for its TTL,
the margin covers clocks, a slow client and connections opened just before the TTL ran out.

The parser faces whatever an upstream (or a spoofer that got past the question check) sends, so
any input either gives a list or raises ``AnswerError``; nothing else escapes (fuzzed in
tests/unit/test_dns_answers.py).

Wire answers are read with dnspython's ``dns.wire.Parser`` (names with compression pointers, bounds
checks) record by record, decoding only the rdata that matters here (A, AAAA, CNAME of class IN;
every other record is skipped by its length), instead of building a whole ``dns.message.Message``:
that took ~110 µs per answer, here ~20 µs, and it runs on the forwarder's loop before every
answer for an allowed name. Whenever dnspython's full parse accepts an answer, both give the same
addresses (a property test); the reader accepts a little more (an answer whose other records
have malformed rdata still opens the garden for its addresses, which the client may use too).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.wire

__all__ = ["MAX_CHAIN", "Address", "AnswerError", "garden_addresses"]

#: Names followed from the question name through CNAMEs, the question name included.
MAX_CHAIN = 16

Address = IPv4Address | IPv6Address


class AnswerError(ValueError):
    """The answer could not be parsed (it still goes to the client unchanged; nothing is admitted)."""


def parse(wire: bytes) -> dns.message.Message:
    """``wire`` as a dnspython message, or ``AnswerError`` saying why not."""
    try:
        # One rrset per record: merged, a second CNAME of one owner would silently replace the first.
        return dns.message.from_wire(wire, one_rr_per_rrset=True)
    # dnspython reports malformed input as DNSException subclasses, but some paths (a bad label's
    # text, an out-of-range field) surface as ValueError/UnicodeError/struct errors: all mean the
    # same thing here, "not a parsable answer".
    except (dns.exception.DNSException, ValueError, ArithmeticError, IndexError, KeyError, TypeError) as exc:
        raise AnswerError(f"unparsable DNS answer ({len(wire)} bytes): {type(exc).__name__}: {exc}") from exc


def _qname(qname: str | dns.name.Name) -> dns.name.Name:
    if isinstance(qname, dns.name.Name):
        return qname
    try:
        return dns.name.from_text(qname)
    except (dns.exception.DNSException, ValueError) as exc:
        raise AnswerError(f"bad question name {qname!r}: {exc}") from exc


def garden_addresses(response: dns.message.Message | bytes, qname: str | dns.name.Name,
                     max_ttl: int, ttl_margin: int) -> list[tuple[Address, int]]:
    """The A/AAAA addresses of ``qname`` and its CNAME chain, each with the seconds to hold it.

    An address met twice is listed once with its longest hold. Order: first seen first.
    """
    if isinstance(response, bytes | bytearray | memoryview):
        records = _wire_records(bytes(response))
    elif isinstance(response, dns.message.Message):
        records = _message_records(response)
    else:
        raise AnswerError(f"not a DNS message: {type(response).__name__}")
    start = _qname(qname)
    cnames: dict[dns.name.Name, dns.name.Name | None] = {}   # None: several targets (invalid), not followed
    addresses: dict[dns.name.Name, list[tuple[bytes, int]]] = {}
    for owner, rdtype, ttl, value in records:
        if rdtype == dns.rdatatype.CNAME:
            assert isinstance(value, dns.name.Name)
            known = cnames.get(owner, value)
            cnames[owner] = value if known == value else None
        else:
            assert isinstance(value, bytes)
            addresses.setdefault(owner, []).append((value, min(max(ttl, 0), max_ttl) + ttl_margin))
    chain = [start]
    while len(chain) < MAX_CHAIN:
        target = cnames.get(chain[-1])
        if target is None or target in chain:
            break
        chain.append(target)
    result: dict[Address, int] = {}
    for name in chain:
        for packed, held in addresses.get(name, ()):
            address = ip_address(packed)
            if held > result.get(address, -1):
                result[address] = held
    return list(result.items())


class _Malformed(ValueError):
    """What the record reader found wrong itself (dnspython's parser raises its own errors)."""


Record = tuple[dns.name.Name, int, int, "dns.name.Name | bytes"]   # owner, type, TTL, target or packed address


def _wire_records(wire: bytes) -> list[Record]:
    """The answer section's IN A/AAAA/CNAME records; the whole message is walked (header, every
    record's name and length, no trailing bytes), so a truncated or malformed one raises."""
    parser = dns.wire.Parser(wire)
    try:
        if parser.remaining() < 12:
            raise _Malformed("short header")
        _id, _flags, questions, answers, authority, additional = parser.get_struct("!HHHHHH")
        for _ in range(questions):
            parser.get_name(None, True)
            parser.get_struct("!HH")
        out: list[Record] = []
        for index in range(answers + authority + additional):
            owner = parser.get_name(None, True)
            rdtype, rdclass, ttl, rdlen = parser.get_struct("!HHIH")
            if ttl > 0x7FFFFFFF:   # RFC 2181 8: as dnspython reads it
                ttl = 0
            if rdlen > parser.remaining():
                raise _Malformed("record data beyond the message")
            end = parser.current + rdlen
            if index < answers and rdclass == dns.rdataclass.IN:
                if rdtype == dns.rdatatype.CNAME:
                    with parser.restrict_to(rdlen):
                        out.append((owner, rdtype, ttl, parser.get_name(None, True)))
                    continue
                if (rdtype, rdlen) in ((dns.rdatatype.A, 4), (dns.rdatatype.AAAA, 16)):
                    out.append((owner, rdtype, ttl, parser.get_bytes(rdlen)))
                    continue
                if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    raise _Malformed(f"{dns.rdatatype.to_text(rdtype)} record of {rdlen} bytes")
            parser.seek(end)
        if parser.remaining():
            raise _Malformed(f"{parser.remaining()} bytes after the last record")
        return out
    except (dns.exception.DNSException, ValueError, ArithmeticError, IndexError, KeyError, TypeError,
            AssertionError) as exc:
        raise AnswerError(f"unparsable DNS answer ({len(wire)} bytes): {type(exc).__name__}: {exc}") from exc


def _message_records(message: dns.message.Message) -> list[Record]:
    out: list[Record] = []
    for rrset in message.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        for rdata in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                out.append((rrset.name, rrset.rdtype, rrset.ttl, rdata.target))
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                try:
                    out.append((rrset.name, rrset.rdtype, rrset.ttl, ip_address(rdata.address).packed))
                except ValueError:   # dnspython validated it; a defensive skip, never a crash
                    continue
    return out
