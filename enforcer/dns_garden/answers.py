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
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

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
    message = parse(response) if isinstance(response, bytes | bytearray | memoryview) else response
    if not isinstance(message, dns.message.Message):
        raise AnswerError(f"not a DNS message: {type(response).__name__}")
    start = _qname(qname)
    cnames: dict[dns.name.Name, dns.name.Name | None] = {}   # None: several targets (invalid), not followed
    addresses: dict[dns.name.Name, list[tuple[str, int]]] = {}
    for rrset in message.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        if rrset.rdtype == dns.rdatatype.CNAME:
            for rdata in rrset:
                known = cnames.get(rrset.name, rdata.target)
                cnames[rrset.name] = rdata.target if known == rdata.target else None
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            held = min(max(rrset.ttl, 0), max_ttl) + ttl_margin
            addresses.setdefault(rrset.name, []).extend((rdata.address, held) for rdata in rrset)
    chain = [start]
    while len(chain) < MAX_CHAIN:
        target = cnames.get(chain[-1])
        if target is None or target in chain:
            break
        chain.append(target)
    result: dict[Address, int] = {}
    for name in chain:
        for text, held in addresses.get(name, ()):
            try:
                address = ip_address(text)
            except ValueError:   # dnspython validated it; a defensive skip, never a crash
                continue
            if held > result.get(address, -1):
                result[address] = held
    return list(result.items())
