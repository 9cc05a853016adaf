"""The DNS forwarder on 127.0.0.1 against scripted upstreams: pass-through, admission, limits, failover."""

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

from enforcer.dns_garden.forwarder import Forwarder, parse_query
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.dns_garden.stats import Stats

Admitted = list[tuple[IPv4Address | IPv6Address, int]]


async def udp_and_tcp(protocol: Callable[[], asyncio.DatagramProtocol], tcp_client: Any
                      ) -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
    """A scripted upstream's sockets: a free UDP port on loopback whose TCP twin is free too."""
    loop = asyncio.get_running_loop()
    for attempt in range(20):
        transport, _ = await loop.create_datagram_endpoint(protocol, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            return transport, await asyncio.start_server(tcp_client, "127.0.0.1", port), port
        except OSError:
            transport.close()
            if attempt == 19:
                raise
    raise AssertionError("unreachable")


class Upstream:
    """A scripted resolver on 127.0.0.1 (UDP and TCP, one port). Modes: answer, silent, spoof."""

    def __init__(self) -> None:
        self.silent = False
        self.spoof = False
        self.rotation = 0
        self.sent: list[bytes] = []          # every real answer, as sent
        self.queries: list[dns.message.Message] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.udp: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                task = loop.create_task(upstream.udp_query(data, addr))
                upstream.tasks.add(task)
                task.add_done_callback(upstream.tasks.discard)

        self.udp, self.server, self.port = await udp_and_tcp(Protocol, self.tcp_client)

    def close(self) -> None:
        if self.udp:
            self.udp.close()
        if self.server:
            self.server.close()

    def answer(self, wire: bytes) -> dns.message.Message | None:
        query = dns.message.from_wire(wire)
        self.queries.append(query)
        if self.silent:
            return None
        name = query.question[0].name.to_text().lower()
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if query.ednsflags & dns.flags.DO:   # as a validating resolver: DO echoed, AD set
            response.ednsflags |= dns.flags.DO
            response.flags |= dns.flags.AD

        def add(owner: str, ttl: int, rdtype: str, *data: str) -> None:
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, *data))

        if name == "pay.example.net.":
            self.rotation += 1
            add(name, 300, "A", f"192.0.2.{(self.rotation - 1) % 254 + 1}")
        elif name == "www.psp.example.":
            add(name, 60, "CNAME", "edge.cdn.example.")
            add("edge.cdn.example.", 20, "A", "203.0.113.7")
            add("edge.cdn.example.", 20, "AAAA", "2001:db8::7")
            add("evil.example.", 60, "A", "198.51.100.66")
        elif name == "mixed.psp.example.":   # a subscriber's, loopback and a real address
            add(name, 60, "A", "100.64.0.5", "127.0.0.1", "203.0.113.9")
        elif name == "big.psp.example.":
            add(name, 60, "A", *(f"203.0.113.{n}" for n in range(1, 101)))
        else:
            add(name, 60, "A", "198.51.100.9")
        return response

    async def udp_query(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.udp is not None
        response = self.answer(data)
        if response is None:
            return
        wire = response.to_wire()
        if len(wire) > 512:   # what a resolver does: truncate, set TC, the client retries over TCP
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        if self.spoof:
            wrong_id = ((int.from_bytes(wire[:2], "big") + 1) % 65536).to_bytes(2, "big")
            forged = dns.message.make_response(dns.message.from_wire(data))
            forged.answer.append(dns.rrset.from_text(forged.question[0].name, 60, "IN", "A", "198.51.100.66"))
            self.udp.sendto(wrong_id + forged.to_wire()[2:], addr)
            other = dns.message.make_response(dns.message.make_query("pay.example.net.evil", "A"))
            other.id = response.id   # right ID, another question
            other.answer.append(dns.rrset.from_text("pay.example.net.evil.", 60, "IN", "A", "198.51.100.66"))
            self.udp.sendto(other.to_wire(), addr)
            await asyncio.sleep(0.05)
        self.sent.append(wire)
        self.udp.sendto(wire, addr)

    async def tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                response = self.answer(await reader.readexactly(size))
                if response is not None:
                    wire = response.to_wire()
                    self.sent.append(wire)
                    writer.write(len(wire).to_bytes(2, "big") + wire)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


class Recorder:
    """A fake admit: records each call and when it finished; may take its time."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[Admitted] = []
        self.finished: list[float] = []

    async def __call__(self, addresses: Admitted) -> None:
        self.calls.append(addresses)
        await asyncio.sleep(self.delay)
        self.finished.append(time.perf_counter())


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    server.close()


@pytest.fixture
async def second() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    server.close()


Make = Callable[..., Any]


@pytest.fixture
async def make_forwarder() -> AsyncIterator[Make]:
    started: list[Forwarder] = []

    async def make(resolvers: list[Upstream], admit: Recorder | None = None, **changes: Any) -> Forwarder:
        options: dict[str, Any] = {key: changes.pop(key) for key in ("admit_timeout", "tcp_idle", "held", "covered")
                                   if key in changes}
        settings = ForwarderSettings(**{
            "table": "wg_test", "port": 0, "listen": ("127.0.0.1",),
            "resolvers": tuple(("127.0.0.1", server.port) for server in resolvers),
            "names": ("pay.example.net",), "suffixes": ("psp.example",), "upstream_timeout": 0.3, **changes})
        forwarder = Forwarder(settings, admit or Recorder(), Stats(), **options)
        await forwarder.start()
        started.append(forwarder)
        return forwarder

    yield make
    for forwarder in started:
        await forwarder.close()


def port(forwarder: Forwarder) -> int:
    return forwarder.bound[0][1]


def query(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()


async def udp(forwarder: Forwarder, wire: bytes, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Protocol, remote_addr=("127.0.0.1", port(forwarder)))
    try:
        transport.sendto(wire)
        return await asyncio.wait_for(received, timeout)
    finally:
        transport.close()


async def silence(forwarder: Forwarder, wire: bytes) -> None:
    with pytest.raises(TimeoutError):
        await udp(forwarder, wire, timeout=0.5)


async def tcp(forwarder: Forwarder, *wires: bytes, expect: int | None = None) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port(forwarder))
    try:
        writer.write(b"".join(len(wire).to_bytes(2, "big") + wire for wire in wires))   # pipelined
        answers = []
        for _ in range(len(wires) if expect is None else expect):
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
            answers.append(await reader.readexactly(size))
        return answers
    finally:
        writer.close()


def rcode(wire: bytes) -> int:
    return dns.message.from_wire(wire).rcode()


async def test_pass_through_is_byte_equal_except_the_id(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    wire = query("pay.example.net", want_dnssec=True, use_edns=0, payload=1232)
    answer = await udp(forwarder, wire)
    assert answer[:2] == wire[:2]
    assert answer[2:] == upstream.sent[-1][2:]
    parsed = dns.message.from_wire(answer)
    assert parsed.ednsflags & dns.flags.DO and parsed.flags & dns.flags.AD   # EDNS and DNSSEC bits untouched
    assert admit.calls == [[(ip_address("192.0.2.1"), 420)]]
    assert forwarder.stats.peek("queries", ("udp", "forwarded")) == 1
    assert forwarder.stats.peek("garden_answers") == 1


async def test_upstream_sees_a_fresh_random_id(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream])
    ids = set()
    for _ in range(8):
        message = dns.message.make_query("other.example", "A")
        message.id = 4242
        answer = await udp(forwarder, message.to_wire())
        assert dns.message.from_wire(answer).id == 4242
        ids.add(upstream.queries[-1].id)
    assert len(ids) > 1


async def test_admit_finishes_before_the_answer_is_sent(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder(delay=0.3)
    forwarder = await make_forwarder([upstream], admit)
    for ask in (lambda: udp(forwarder, query("www.psp.example")),
                lambda: tcp(forwarder, query("WWW.PSP.example", "AAAA"))):
        sent = time.perf_counter()
        await ask()
        received = time.perf_counter()
        assert admit.finished and admit.finished[-1] <= received
        assert received - sent >= 0.3
    # The CNAME chain's addresses, TTL + margin; the unrelated owner's address never.
    assert admit.calls[0] == [(ip_address("203.0.113.7"), 140), (ip_address("2001:db8::7"), 140)]
    assert all(ip_address("198.51.100.66") not in [a for a, _ in call] for call in admit.calls)


async def test_slow_admit_does_not_hold_the_answer_long(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder(delay=5)
    forwarder = await make_forwarder([upstream], admit, admit_timeout=0.2)
    sent = time.perf_counter()
    answer = await udp(forwarder, query("pay.example.net"))
    assert 0.2 <= time.perf_counter() - sent < 2
    assert rcode(answer) == dns.rcode.NOERROR
    assert forwarder.stats.peek("admit_timeouts") == 1


async def test_names_outside_allow_never_admitted(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    for name in ("other.example", "psp.example", "xpsp.example", "pay.example.net.evil", "evil.example"):
        assert rcode(await udp(forwarder, query(name))) == dns.rcode.NOERROR
    await tcp(forwarder, query("psp.example"))
    assert admit.calls == []
    assert forwarder.stats.peek("garden_answers") == 0


async def test_rotating_addresses_each_admitted(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    for _ in range(3):
        await udp(forwarder, query("Pay.Example.Net"))
    assert [call[0][0] for call in admit.calls] == [ip_address(f"192.0.2.{n}") for n in (1, 2, 3)]


async def test_over_the_rate_refused(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream], query_rate=0.01, query_burst=3)
    for _ in range(3):
        assert rcode(await udp(forwarder, query("other.example"))) == dns.rcode.NOERROR
    wire = query("other.example")
    answer = await udp(forwarder, wire)
    assert answer[:2] == wire[:2]
    message = dns.message.from_wire(answer)
    assert message.rcode() == dns.rcode.REFUSED and message.flags & dns.flags.QR
    assert message.question == dns.message.from_wire(wire).question and not message.answer
    assert len(upstream.queries) == 3
    assert forwarder.stats.peek("queries", ("udp", "rate_limited")) == 1
    assert rcode((await tcp(forwarder, query("other.example")))[0]) == dns.rcode.REFUSED


async def test_servfail_after_all_resolvers_fail(upstream: Upstream, second: Upstream, make_forwarder: Make) -> None:
    upstream.silent = second.silent = True
    forwarder = await make_forwarder([upstream, second])
    wire = query("pay.example.net")
    answer = await udp(forwarder, wire)
    assert answer[:2] == wire[:2] and rcode(answer) == dns.rcode.SERVFAIL
    assert len(upstream.queries) == len(second.queries) == 1
    assert rcode((await tcp(forwarder, query("other.example")))[0]) == dns.rcode.SERVFAIL
    stats = forwarder.stats.drain()
    counts = {(name, tuple(labels)): n for name, labels, n in stats["counts"]}
    assert counts[("queries", ("udp", "upstream_failed"))] == 1
    assert counts[("queries", ("tcp", "upstream_failed"))] == 1
    assert counts[("upstream_failures", (f"127.0.0.1:{upstream.port}", "timeout"))] == 2
    assert counts[("upstream_failures", (f"127.0.0.1:{second.port}", "timeout"))] == 2


async def test_failover_to_the_second_resolver(upstream: Upstream, second: Upstream, make_forwarder: Make) -> None:
    upstream.silent = True
    admit = Recorder()
    forwarder = await make_forwarder([upstream, second], admit)
    answer = await udp(forwarder, query("pay.example.net"))
    assert answer[2:] == second.sent[-1][2:]
    assert admit.calls == [[(ip_address("192.0.2.1"), 420)]]
    tcp_answer = (await tcp(forwarder, query("pay.example.net")))[0]
    assert tcp_answer[2:] == second.sent[-1][2:]
    assert forwarder.stats.peek("upstream_failures", (f"127.0.0.1:{upstream.port}", "timeout")) == 2


async def test_closed_resolver_port_fails_over_fast(second: Upstream, make_forwarder: Make) -> None:
    dead = Upstream()
    await dead.start()
    dead.close()   # nothing listens there any more: ICMP port unreachable / connection refused
    await asyncio.sleep(0.05)
    forwarder = await make_forwarder([dead, second], upstream_timeout=2.0)
    sent = time.perf_counter()
    assert rcode(await udp(forwarder, query("other.example"))) == dns.rcode.NOERROR
    assert rcode((await tcp(forwarder, query("other.example")))[0]) == dns.rcode.NOERROR
    assert time.perf_counter() - sent < 1.5
    assert forwarder.stats.peek("upstream_failures", (f"127.0.0.1:{dead.port}", "error")) == 2


async def test_spoofed_answers_dropped(upstream: Upstream, make_forwarder: Make) -> None:
    upstream.spoof = True
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    answer = await udp(forwarder, query("pay.example.net"))
    assert answer[2:] == upstream.sent[-1][2:]
    assert admit.calls == [[(ip_address("192.0.2.1"), 420)]]
    assert forwarder.stats.peek("upstream_answers_dropped", (f"127.0.0.1:{upstream.port}",)) == 2


async def test_tcp_pipelined(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    wires = [query("pay.example.net"), query("other.example", "AAAA"), query("www.psp.example")]
    answers = await tcp(forwarder, *wires)
    by_id = {answer[:2]: dns.message.from_wire(answer) for answer in answers}
    assert set(by_id) == {wire[:2] for wire in wires}
    for wire in wires:
        assert by_id[wire[:2]].question == dns.message.from_wire(wire).question
    assert {answer[2:] for answer in answers} == {sent[2:] for sent in upstream.sent}
    assert len(admit.calls) == 2
    assert forwarder.stats.peek("queries", ("tcp", "forwarded")) == 3


async def test_truncated_udp_answer_passes_with_tc_then_tcp(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit)
    answer = await udp(forwarder, query("big.psp.example"))
    assert answer[2:] == upstream.sent[-1][2:]
    assert dns.message.from_wire(answer).flags & dns.flags.TC
    assert admit.calls == []   # nothing in a truncated answer
    full = (await tcp(forwarder, query("big.psp.example")))[0]
    assert len(full) > 1500 and not dns.message.from_wire(full).flags & dns.flags.TC
    assert len(admit.calls[0]) == 100


async def test_malformed_queries_counted_and_serving_goes_on(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream])
    await silence(forwarder, b"\x12")                                   # no header
    response = dns.message.make_response(dns.message.make_query("other.example", "A")).to_wire()
    await silence(forwarder, response)                                  # a response: never answered
    header = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for bad in (header + b"\xc0\x0c\x00\x01\x00\x01",                    # compressed question name
                header + b"\x05ab",                                     # cut inside the question
                header[:4] + b"\x00\x02" + header[6:] + b"\x00\x00\x01\x00\x01\x00\x00\x01\x00\x01"):
        answer = await udp(forwarder, bad)
        assert answer[:2] == b"\xab\xcd" and rcode(answer) == dns.rcode.FORMERR
    assert forwarder.stats.peek("queries", ("udp", "malformed")) == 5
    assert rcode((await tcp(forwarder, b"\x00" * 3, query("other.example"), expect=1))[0]) == dns.rcode.NOERROR
    assert rcode(await udp(forwarder, query("other.example"))) == dns.rcode.NOERROR
    assert upstream.queries and len(upstream.queries) == 2


async def test_zone_transfer_and_other_opcodes_refused(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream])
    assert rcode((await tcp(forwarder, query("psp.example", "AXFR")))[0]) == dns.rcode.REFUSED
    notify = dns.message.make_query("psp.example", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert rcode(await udp(forwarder, notify.to_wire())) == dns.rcode.REFUSED
    assert upstream.queries == []
    assert forwarder.stats.peek("queries", ("udp", "refused")) == 1


async def test_tcp_client_cap_and_idle_timeout(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream], tcp_clients=1, tcp_idle=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port(forwarder))
    await asyncio.sleep(0.05)
    assert forwarder.tcp_clients == 1
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port(forwarder))
    assert await asyncio.wait_for(reader2.read(), 2) == b""   # over the cap: closed at once
    writer2.close()
    assert await asyncio.wait_for(reader.read(), 2) == b""    # idle: closed
    writer.close()
    assert forwarder.tcp_clients == 0


async def test_bind_failure_names_the_address(upstream: Upstream, make_forwarder: Make) -> None:
    forwarder = await make_forwarder([upstream])
    settings = ForwarderSettings(table="wg_test", port=port(forwarder), listen=("127.0.0.1",),
                                 resolvers=(("127.0.0.1", upstream.port),))
    with pytest.raises(OSError, match=f"127.0.0.1 port {port(forwarder)}"):
        await Forwarder(settings, Recorder(), Stats()).start()


def test_parse_query_reads_the_question() -> None:
    wire = query("Pay.Example.NET", "AAAA", use_edns=0)
    parsed = parse_query(wire)
    assert parsed is not None and parsed.qtype == 28 and parsed.opcode == 0
    assert parsed.name == b"\x03Pay\x07Example\x03NET\x00"


async def test_a_machine_without_ipv6_listens_on_ipv4_alone(upstream: Upstream, make_forwarder: Make,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from enforcer.dns_garden import forwarder as module

    real = module._bound_sockets

    def no_ipv6(host: str, port: int) -> Any:
        if host == "::":
            raise OSError(errno.EAFNOSUPPORT, "DNS forwarder: cannot bind :: (UDP): Address family not supported")
        return real(host, port)

    monkeypatch.setattr(module, "_bound_sockets", no_ipv6)
    forwarder = await make_forwarder([upstream], listen=("127.0.0.1", "::"))
    assert [host for host, _ in forwarder.bound] == ["127.0.0.1"]
    assert rcode(await udp(forwarder, query("a.example"))) == 0
    with pytest.raises(OSError, match="Address family"):   # IPv6 alone: nothing to listen on, say so
        await make_forwarder([upstream], listen=("::",))


async def test_allowed_names_have_a_bucket_of_their_own(upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit, query_rate=0.01, query_burst=2)
    for _ in range(2):
        assert rcode(await udp(forwarder, query("other.example"))) == dns.rcode.NOERROR
    assert rcode(await udp(forwarder, query("other.example"))) == dns.rcode.REFUSED
    assert rcode(await udp(forwarder, query("pay.example.net"))) == dns.rcode.NOERROR   # still pays
    assert len(admit.calls) == 1


async def test_addresses_of_subscribers_and_special_space_never_open_the_garden(
        upstream: Upstream, make_forwarder: Make) -> None:
    admit = Recorder()
    forwarder = await make_forwarder([upstream], admit, refused=("100.64.0.0/10",))
    answer = dns.message.from_wire(await udp(forwarder, query("mixed.psp.example")))
    assert len(answer.answer[0]) == 3, "the answer itself is passed through unchanged"
    assert admit.calls == [[(ip_address("203.0.113.9"), 60 + forwarder.settings.ttl_margin)]]
    assert forwarder.stats.peek("garden_addresses_refused") == 2


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    from enforcer.dns_garden.forwarder import client_key

    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("192.0.2.1") != client_key("192.0.2.2")
    assert client_key("fe80::1%eth0") == "fe80::1%eth0"


async def test_addresses_already_held_are_not_admitted_again(upstream: Upstream, make_forwarder: Make) -> None:
    admit, asked = Recorder(), []

    def held(addresses: Admitted) -> bool:
        asked.append(addresses)
        return len(asked) > 1   # the first answer's addresses are new, the second's held

    forwarder = await make_forwarder([upstream], admit, held=held)
    for _ in range(2):
        assert rcode(await udp(forwarder, query("www.psp.example"))) == dns.rcode.NOERROR
    assert len(asked) == 2 and len(admit.calls) == 1


def test_ids_and_socket_choices_come_from_the_kernels_random_bytes_without_bias() -> None:
    from collections import Counter

    from enforcer.dns_garden.upstream import _Entropy

    entropy = _Entropy()
    ids = [entropy.u16() for _ in range(5000)]
    assert all(0 <= qid < 65536 for qid in ids) and len(set(ids)) > 4500   # 16 random bits each
    picks = Counter(entropy.below(3) for _ in range(30000))
    assert set(picks) == {0, 1, 2} and all(9000 < count < 11000 for count in picks.values())


async def test_addresses_held_for_the_ttl_are_refreshed_behind_the_answer(upstream: Upstream,
                                                                           make_forwarder: Make) -> None:
    """Held for the answer's TTL but not as long as wanted: the answer goes at once, the refresh
    follows it; an address not covered still holds the answer back until the kernel has it."""
    admit = Recorder(delay=0.3)
    forwarder = await make_forwarder([upstream], admit, held=lambda addresses: False, covered=lambda addresses: True)
    started = time.perf_counter()
    assert rcode(await udp(forwarder, query("www.psp.example"))) == dns.rcode.NOERROR
    answered = time.perf_counter()
    assert answered - started < 0.25 and len(admit.calls) == 1, "the answer did not wait for the refresh"
    for _ in range(50):   # bounded: the refresh finishes 0.3 s after it started
        if admit.finished:
            break
        await asyncio.sleep(0.02)
    assert admit.finished and admit.finished[0] > answered
    uncovered = await make_forwarder([upstream], Recorder(delay=0.3), held=lambda addresses: False,
                                     covered=lambda addresses: False)
    started = time.perf_counter()
    assert rcode(await udp(uncovered, query("www.psp.example"))) == dns.rcode.NOERROR
    assert time.perf_counter() - started >= 0.3
