"""The forwarder on 127.0.0.1 against upstreams that answer in ways RFCs allow but the plain
path does not produce: the question's name in another letter case, an error without a
question; and the forwarder's own answers to a query with EDNS. UDP and TCP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from test_dns_forwarder import udp_and_tcp

from enforcer.dns_garden.forwarder import EDNS_PAYLOAD, Forwarder
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.dns_garden.stats import Stats

Admitted = list[tuple[IPv4Address | IPv6Address, int]]
#: What a scripted upstream sends for a query's wire (None: nothing).
Script = Callable[[bytes], bytes | None]
TIMEOUT = 0.5


class Upstream:
    """A resolver on 127.0.0.1 (UDP and TCP, one port) answering each query with ``script``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = 0
        self.asked = 0
        self.sent: list[bytes] = []
        self.udp: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None

    def answer(self, wire: bytes) -> bytes | None:
        self.asked += 1
        out = self.script(wire)
        if out is not None:
            self.sent.append(out)
        return out

    async def start(self) -> None:
        upstream = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                out = upstream.answer(data)
                if out is not None and upstream.udp is not None:
                    upstream.udp.sendto(out, addr)

        self.udp, self.server, self.port = await udp_and_tcp(Protocol, self.tcp_client)

    async def tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                out = self.answer(await reader.readexactly(size))
                if out is not None:
                    writer.write(len(out).to_bytes(2, "big") + out)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        if self.udp:
            self.udp.close()
        if self.server:
            self.server.close()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Admitted] = []

    async def __call__(self, addresses: Admitted) -> None:
        self.calls.append(addresses)


Serve = Callable[..., Any]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``serve(script, **settings)``: an upstream running ``script`` and a forwarder asking it."""
    upstreams: list[Upstream] = []
    forwarders: list[Forwarder] = []

    async def start(script: Script, admit: Recorder | None = None, **changes: Any) -> tuple[Forwarder, Upstream]:
        upstream = Upstream(script)
        await upstream.start()
        upstreams.append(upstream)
        settings = ForwarderSettings(**{
            "table": "wg_test", "port": 0, "listen": ("127.0.0.1",), "resolvers": (("127.0.0.1", upstream.port),),
            "names": ("pay.example.net",), "suffixes": ("psp.example",), "upstream_timeout": TIMEOUT, **changes})
        forwarder = Forwarder(settings, admit or Recorder(), Stats())
        await forwarder.start()
        forwarders.append(forwarder)
        return forwarder, upstream

    yield start
    for forwarder in forwarders:
        await forwarder.close()
    for upstream in upstreams:
        upstream.close()


async def udp(forwarder: Forwarder, wire: bytes, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Protocol, remote_addr=("127.0.0.1", forwarder.bound[0][1]))
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(received, timeout)
    finally:
        transport.close()


async def tcp(forwarder: Forwarder, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", forwarder.bound[0][1])
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()


async def ask(forwarder: Forwarder, transport: str, wire: bytes) -> tuple[bytes, float]:
    """The answer over ``transport`` and the seconds it took."""
    started = time.perf_counter()
    answer = await (udp(forwarder, wire) if transport == "udp" else tcp(forwarder, wire))
    return answer, time.perf_counter() - started


def lowered_answer(wire: bytes) -> bytes:
    """An upstream that answers with the question's name lowered (as some resolvers and
    middleboxes do to a 0x20 mixed-case name), the records under the lowered name."""
    query = dns.message.from_wire(wire)
    lowered = dns.message.make_query(query.question[0].name.to_text().lower(), query.question[0].rdtype)
    lowered.id = query.id
    response = dns.message.make_response(lowered)
    response.flags |= dns.flags.RA
    response.answer.append(dns.rrset.from_text(lowered.question[0].name, 60, "IN", "A", "203.0.113.7"))
    return response.to_wire()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_an_answer_with_the_question_in_lower_case_is_passed_through(serve: Serve, transport: str) -> None:
    admit = Recorder()
    forwarder, upstream = await serve(lowered_answer, admit)
    wire = dns.message.make_query("LowerQ.Psp.Example", "A").to_wire()
    answer, took = await ask(forwarder, transport, wire)
    assert answer[:2] == wire[:2] and answer[2:] == upstream.sent[-1][2:], "unchanged but the ID"
    assert b"\x06lowerq\x03psp\x07example\x00" in answer and took < TIMEOUT
    assert admit.calls == [[(ip_address("203.0.113.7"), 60 + forwarder.settings.ttl_margin)]]
    assert forwarder.stats.peek("queries", (transport, "forwarded")) == 1
    label = f"127.0.0.1:{upstream.port}"
    assert forwarder.stats.peek("upstream_failures", (label, "timeout")) == 0
    assert forwarder.stats.peek("upstream_answers_dropped", (label,)) == 0


def bare_error(rcode: int, opt: bool = False) -> Script:
    """An upstream answering every query with ``rcode`` and no question (QDCOUNT 0), the query's
    ID kept; with ``opt``, one OPT record (RFC 6891)."""
    def script(wire: bytes) -> bytes:
        tail = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if opt else b""
        return (wire[:2] + bytes([0x80 | (wire[2] & 0x79), 0x80 | rcode]) + b"\x00\x00\x00\x00\x00\x00"
                + (b"\x00\x01" if opt else b"\x00\x00") + tail)
    return script


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize(("rcode", "opt"), [(dns.rcode.FORMERR, False), (dns.rcode.NOTIMP, False),
                                            (dns.rcode.REFUSED, True), (dns.rcode.SERVFAIL, False)])
async def test_an_error_without_a_question_is_passed_through(serve: Serve, transport: str, rcode: int,
                                                             opt: bool) -> None:
    admit = Recorder()
    forwarder, upstream = await serve(bare_error(rcode, opt), admit)
    wire = dns.message.make_query("pay.example.net", "A", use_edns=0 if opt else None).to_wire()
    answer, took = await ask(forwarder, transport, wire)
    assert answer[:2] == wire[:2] and answer[2:] == upstream.sent[-1][2:], "the upstream's, unchanged but the ID"
    assert dns.message.from_wire(answer).rcode() == rcode and took < TIMEOUT
    assert admit.calls == [], "nothing admitted from it"
    assert forwarder.stats.peek("upstream_failures", (f"127.0.0.1:{upstream.port}", "timeout")) == 0


async def test_a_noerror_without_a_question_is_still_dropped(serve: Serve) -> None:
    forwarder, upstream = await serve(bare_error(dns.rcode.NOERROR))
    wire = dns.message.make_query("pay.example.net", "A").to_wire()
    answer, took = await ask(forwarder, "udp", wire)
    assert dns.message.from_wire(answer).rcode() == dns.rcode.SERVFAIL and took >= TIMEOUT
    assert forwarder.stats.peek("upstream_answers_dropped", (f"127.0.0.1:{upstream.port}",)) == 1


def silent(wire: bytes) -> None:
    return None


def check_opt(answer: bytes, query: bytes, rcode: int, do: bool) -> None:
    message = dns.message.from_wire(answer)
    assert answer[:2] == query[:2] and message.rcode() == rcode
    assert message.edns == 0 and message.payload == EDNS_PAYLOAD and not message.options
    assert bool(message.ednsflags & dns.flags.DO) is do


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_own_answers_to_a_query_with_edns_carry_an_opt(serve: Serve, transport: str) -> None:
    """SERVFAIL (every resolver silent), REFUSED (over the rate), FORMERR (a question the
    forwarder does not take): each with an OPT when the query had one, none when it had none."""
    forwarder, _ = await serve(silent, query_rate=0.01, query_burst=1)
    edns = dns.message.make_query("other.example", "A", use_edns=0, payload=1232, want_dnssec=True).to_wire()
    answer, _ = await ask(forwarder, transport, edns)
    check_opt(answer, edns, dns.rcode.SERVFAIL, do=True)
    other = dns.message.make_query("other.example", "A", use_edns=0).to_wire()
    answer, _ = await ask(forwarder, transport, other)
    check_opt(answer, other, dns.rcode.REFUSED, do=False)
    plain = dns.message.make_query("other.example", "A").to_wire()
    answer, _ = await ask(forwarder, transport, plain)
    assert dns.message.from_wire(answer).edns == -1 and dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED
    formerr, _ = await serve(silent)
    compressed = (b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\xc0\x0c\x00\x01\x00\x01"
                  b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00")
    answer, _ = await ask(formerr, transport, compressed)
    check_opt(answer, compressed, dns.rcode.FORMERR, do=False)
