"""The RADIUS accounting receiver on loopback: packets built with pyrad's client-side classes
(and the real ``radclient`` when installed), a recording sink in place of the daemon."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pyrad import packet as rad  # type: ignore[import-untyped]

from enforcer.match import Match
from enforcer.model import Network
from enforcer.sessions.radius import DICTIONARY, RadiusSource
from enforcer.sessions.session import Session
from required import tool
from session_helpers import RecordingSink

SECRET = b"testing123"
WAIT = 2.0          # an answer that comes, comes within this
SILENCE = 0.3       # how long "no answer" is waited for


class Sink(RecordingSink):
    """The shared ``RecordingSink`` whose updates can be held: ``gate``, when set, holds every
    ``update`` until it is set. ``updates`` lists the calls as they began (started, stopped);
    ``returned`` counts those that committed."""

    def __init__(self) -> None:
        super().__init__(prefixes=("100.64.0.0/10", "2001:db8::/32"))
        self.updates: list[tuple[list[Session], list[str]]] = []
        self.returned = 0
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def update(self, source: str, started: Sequence[Session] = (), stopped: Sequence[str] = (), *,
                     observed: float | None = None) -> None:
        assert source == "radius" and observed is not None
        self.updates.append((list(started), list(stopped)))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        await super().update(source, started, stopped, observed=observed)
        self.returned += 1

    def detail(self, index: int = 0) -> str:
        return self.problems[index][2]


class Client(asyncio.DatagramProtocol):
    """A NAS: sends datagrams to the receiver, queues what comes back."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.replies.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def reply(self, timeout: float = WAIT) -> bytes:
        return await asyncio.wait_for(self.replies.get(), timeout)

    async def silent(self, seconds: float = SILENCE) -> bool:
        try:
            await asyncio.wait_for(self.replies.get(), seconds)
        except TimeoutError:
            return True
        return False


@asynccontextmanager
async def receiver(sink: Sink, **options: Any) -> AsyncIterator[tuple[RadiusSource, Client]]:
    source = RadiusSource("radius", "127.0.0.1", 0, SECRET, **options)
    task = asyncio.create_task(source.run(sink))
    transport = None
    try:
        await asyncio.wait_for(source.listening.wait(), WAIT)
        assert source.bound is not None
        transport, client = await asyncio.get_running_loop().create_datagram_endpoint(
            Client, remote_addr=source.bound)
        yield source, client
    finally:
        if transport is not None:
            transport.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def request(secret: bytes = SECRET, code: int = rad.AccountingRequest, **attributes: Any) -> Any:
    """An Accounting-Request; attributes by name with ``_`` for ``-`` (as pyrad takes them)."""
    packet = rad.AcctPacket(code=code, secret=secret, dict=DICTIONARY)
    for name, value in attributes.items():
        packet.AddAttribute(name.replace("_", "-"), value)
    return packet


def start(session_id: str = "s1", status: str = "Start", nas: str | None = "192.0.2.1", **more: Any) -> Any:
    attributes: dict[str, Any] = {"Acct_Status_Type": status, "Acct_Session_Id": session_id}
    if nas is not None:
        attributes["NAS_IP_Address"] = nas
    attributes.setdefault("User_Name", "c1@isp")
    attributes.setdefault("Framed_IP_Address", "100.64.0.9")
    return request(**{**attributes, **more})


def stop(session_id: str = "s1", nas: str = "192.0.2.1") -> Any:
    return request(Acct_Status_Type="Stop", Acct_Session_Id=session_id, NAS_IP_Address=nas)


async def exchange(client: Client, packet: Any) -> Any:
    """Send ``packet``, wait for its answer and check it is a valid Accounting-Response to it."""
    raw = packet.RequestPacket()
    client.send(raw)
    data = await client.reply()
    reply = packet.CreateReply(packet=data)
    assert reply.code == rad.AccountingResponse
    assert packet.VerifyReply(reply, data)
    return reply


def nets(*texts: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


# -- Start / Interim-Update / Stop ----------------------------------------------------------------

async def test_start_interim_stop_report_sessions_and_are_answered() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start(Calling_Station_Id="02-00-00-00-10-01"))
        await exchange(client, start(status="Interim-Update", Framed_IP_Address="100.64.0.10"))
        await exchange(client, stop())
    (first, none), (interim, _), (nothing, stopped) = sink.updates
    assert none == [] and nothing == []
    [session] = first
    assert session.source == "radius" and session.key == "192.0.2.1/s1"
    assert session.match == Match(username="c1@isp", mac="02:00:00:00:10:01")
    assert session.addresses == nets("100.64.0.9/32")
    assert session.expires is None
    assert session.detail == "radius session s1 from 192.0.2.1"
    assert interim[0].addresses == nets("100.64.0.10/32")
    assert stopped == ["192.0.2.1/s1"]
    assert sink.problems == []


async def test_ipv6_prefix_delegated_prefix_and_address_are_addresses() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start(Framed_IPv6_Prefix="2001:db8:1::/64", Delegated_IPv6_Prefix="2001:db8:100::/56",
                                     Framed_IPv6_Address="2001:db8:2::5"))
    [session] = sink.updates[0][0]
    assert session.addresses == nets("100.64.0.9/32", "2001:db8:2::5/128", "2001:db8:1::/64", "2001:db8:100::/56")


async def test_the_nas_in_the_key_falls_back_to_nas_identifier_then_the_source_address() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start("a", nas=None, NAS_Identifier="bng1"))
        await exchange(client, start("b", nas=None))
    assert [u[0][0].key for u in sink.updates] == ["bng1/a", "127.0.0.1/b"]


async def test_calling_station_id_not_a_mac_is_ignored_and_circuit_ids_are_read() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start(Calling_Station_Id="+420 123 456", ADSL_Agent_Circuit_Id=b"olt1/1/3",
                                     ADSL_Agent_Remote_Id=b"\x01\x02\xff"))
    [session] = sink.updates[0][0]
    assert session.match == Match(username="c1@isp", circuit_id="olt1/1/3", remote_id="01:02:ff")
    assert sink.problems == []


async def test_expiry_from_session_timeout_or_three_interim_intervals() -> None:
    for options, extra, expected in (({"session_timeout": 60.0}, {"Acct_Interim_Interval": 300}, 60),
                                     ({}, {"Acct_Interim_Interval": 300}, 900), ({}, {}, None)):
        sink = Sink()
        async with receiver(sink, **options) as (_, client):
            before = time.time()
            await exchange(client, start(**extra))
            after = time.time()
        expires = sink.updates[0][0][0].expires
        if expected is None:
            assert expires is None
        else:
            assert expires is not None and before + expected <= expires <= after + expected


async def test_accounting_on_stops_every_session_of_that_nas_only() -> None:
    sink = Sink()
    async with receiver(sink) as (source, client):
        await exchange(client, start("a"))
        await exchange(client, start("b", Framed_IP_Address="100.64.0.10"))
        await exchange(client, start("c", nas="192.0.2.2", Framed_IP_Address="100.64.0.11"))
        await exchange(client, request(Acct_Status_Type="Accounting-On", NAS_IP_Address="192.0.2.1"))
        assert source.status()["sessions"] == 1
        await exchange(client, request(Acct_Status_Type="Accounting-Off", NAS_IP_Address="192.0.2.1"))
    assert sink.updates[3] == ([], ["192.0.2.1/a", "192.0.2.1/b"])
    assert len(sink.updates) == 4      # the Accounting-Off found nothing left to stop


async def test_accounting_on_after_a_restart_stops_the_sessions_held_before_it() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start("a"))
        await exchange(client, start("c", nas="192.0.2.2", Framed_IP_Address="100.64.0.11"))
    async with receiver(sink) as (source, client):    # a new receiver: the daemon restarted
        assert source.status()["sessions"] == 2, "it knows the sessions the daemon holds"
        await exchange(client, request(Acct_Status_Type="Accounting-On", NAS_IP_Address="192.0.2.1"))
    assert sink.updates[-1] == ([], ["192.0.2.1/a"])
    assert list(sink.keys("radius")) == ["192.0.2.2/c"]


async def test_a_start_without_any_address_changes_nothing_and_is_answered() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        packet = request(Acct_Status_Type="Start", Acct_Session_Id="s1", User_Name="c1@isp")
        await exchange(client, packet)
    assert sink.updates == [] and sink.problems == []


async def test_a_late_start_after_its_stop_does_not_revive_the_session() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start())
        await exchange(client, stop())
        await exchange(client, start(status="Interim-Update"))   # queued on the NAS, arrives late
    assert [u[1] for u in sink.updates] == [[], ["192.0.2.1/s1"]]


async def test_status_server_is_answered() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        packet = rad.AcctPacket(code=rad.StatusServer, secret=SECRET, dict=DICTIONARY)
        client.send(packet.RequestPacket())
        data = await client.reply()
    assert packet.VerifyReply(packet.CreateReply(packet=data), data)


# -- answered only after the commit ---------------------------------------------------------------

async def test_the_answer_waits_for_the_commit() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    async with receiver(sink) as (_, client):
        packet = start()
        client.send(packet.RequestPacket())
        await asyncio.wait_for(sink.called.wait(), WAIT)
        assert await client.silent(), "answered before the sink committed"
        assert sink.returned == 0
        sink.gate.set()
        data = await client.reply()
        assert sink.returned == 1
    assert packet.VerifyReply(packet.CreateReply(packet=data), data)


async def test_a_failed_commit_is_not_answered_and_the_retransmission_is_processed_again() -> None:
    sink = Sink()
    sink.fail = 1
    async with receiver(sink) as (source, client):
        packet = start()
        raw = packet.RequestPacket()
        client.send(raw)
        await asyncio.wait_for(sink.called.wait(), WAIT)
        assert await client.silent()
        client.send(raw)                      # the NAS resends the same packet
        data = await client.reply()
        assert source.status()["uncommitted"] == 1
    assert packet.VerifyReply(packet.CreateReply(packet=data), data)
    assert len(sink.updates) == 2 and sink.returned == 1


async def test_a_duplicate_while_the_first_commits_is_dropped() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    async with receiver(sink) as (source, client):
        raw = start().RequestPacket()
        client.send(raw)
        await asyncio.wait_for(sink.called.wait(), WAIT)
        client.send(raw)
        await asyncio.sleep(SILENCE)
        sink.gate.set()
        await client.reply()
        assert await client.silent()
        assert source.status()["duplicates"] == 1
    assert len(sink.updates) == 1


async def test_packets_of_one_session_commit_in_arrival_order() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()
    async with receiver(sink) as (_, client):
        client.send(start().RequestPacket())
        await asyncio.wait_for(sink.called.wait(), WAIT)
        client.send(stop().RequestPacket())
        client.send(start("other", Framed_IP_Address="100.64.0.10").RequestPacket())
        await asyncio.sleep(SILENCE)
        # the other session's Start commits meanwhile; the Stop waits for its Start
        assert [u[0][0].key for u in sink.updates if u[0]] == ["192.0.2.1/s1", "192.0.2.1/other"]
        assert len(sink.updates) == 2
        sink.gate.set()
        for _ in range(3):
            await client.reply()
    assert sink.updates[2] == ([], ["192.0.2.1/s1"])


# -- bad input: reported, counted, nothing else changes -------------------------------------------

async def test_a_wrong_secret_is_dropped_unanswered_and_reported() -> None:
    sink = Sink()
    async with receiver(sink) as (source, client):
        client.send(start().RequestPacket())
        await client.reply()
        client.send(request(secret=b"wrong", Acct_Status_Type="Stop", Acct_Session_Id="s1",
                            NAS_IP_Address="192.0.2.1").RequestPacket())
        assert await client.silent()
        assert source.status()["dropped"] == 1
    assert sink.kinds() == ["bad_authenticator"]
    assert len(sink.updates) == 1     # the Start; the forged Stop changed nothing


async def test_a_wrong_message_authenticator_is_dropped() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        packet = start()
        packet.add_message_authenticator()
        good = packet.RequestPacket()
        at = good.index(bytes([80, 18])) + 2       # the Message-Authenticator's value
        forged = sign(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])   # Request Authenticator right
        client.send(forged)
        assert await client.silent()
        client.send(good)
        await client.reply()
    assert sink.kinds() == ["bad_authenticator"]
    assert len(sink.updates) == 1


async def test_a_source_outside_clients_is_dropped_and_reported() -> None:
    sink = Sink()
    async with receiver(sink, clients=nets("192.0.2.0/24")) as (_, client):
        client.send(start().RequestPacket())
        assert await client.silent()
    assert sink.kinds() == ["unknown_client"] and sink.updates == []
    assert "127.0.0.1" in sink.detail()


async def test_unknown_attributes_are_reported_and_the_packet_is_still_processed() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        packet = start()
        packet[200] = [b"x"]                 # an attribute no dictionary names
        packet[(9, 1)] = [b"cisco-avpair"]   # a vendor attribute (Cisco)
        await exchange(client, packet)
    assert sink.kinds() == ["unknown_attribute"]
    assert "200" in sink.detail() and "26.9.1" in sink.detail()
    assert sink.updates[0][0][0].addresses == nets("100.64.0.9/32")


@pytest.mark.parametrize("damage", ["truncated", "attribute_overrun", "tiny", "access_request", "no_session_id",
                                    "bad_address_length"])
async def test_malformed_packets_are_dropped_and_reported(damage: str) -> None:
    sink = Sink()
    raw = start().RequestPacket()
    if damage == "truncated":
        raw = raw[:-3]
    elif damage == "attribute_overrun":     # the last attribute claims more octets than the packet has
        assert raw[-6:-4] == bytes([8, 6])      # Framed-IP-Address comes last
        raw = sign(raw[:-5] + bytes([46]) + raw[-4:])
    elif damage == "tiny":
        raw = raw[:12]
    elif damage == "access_request":
        raw = bytes([rad.AccessRequest]) + raw[1:]
    elif damage == "no_session_id":
        raw = request(Acct_Status_Type="Start", Framed_IP_Address="100.64.0.9").RequestPacket()
    elif damage == "bad_address_length":   # Framed-IP-Address of 3 octets
        raw = sign(raw[:2] + (len(raw) + 5).to_bytes(2, "big") + raw[4:] + bytes([8, 5, 100, 64, 0]))
    async with receiver(sink) as (_, client):
        client.send(raw)
        assert await client.silent()
    assert sink.kinds() == ["malformed"], sink.problems
    assert sink.updates == []


def sign(raw: bytes) -> bytes:
    """``raw`` with a correct Request Authenticator (a well-signed but malformed packet)."""
    return raw[:4] + hashlib.md5(raw[:4] + bytes(16) + raw[20:] + SECRET).digest() + raw[20:]


async def test_an_address_outside_the_prefixes_is_left_out_and_reported() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start(Framed_IP_Address="198.51.100.7", Framed_IPv6_Prefix="2001:db8:1::/64"))
        await exchange(client, start("only-outside", Framed_IP_Address="198.51.100.8"))
    assert sink.kinds() == ["outside_prefixes", "outside_prefixes"]
    assert "198.51.100.7/32" in sink.detail()
    [(started, _)] = sink.updates
    assert started[0].addresses == nets("2001:db8:1::/64")


async def test_a_user_name_that_cannot_be_a_match_value_is_left_out_and_reported() -> None:
    sink = Sink()
    async with receiver(sink) as (_, client):
        await exchange(client, start(User_Name=" c1@isp", Calling_Station_Id="02:00:00:00:10:01"))
    assert sink.kinds() == ["malformed"] and "User-Name" in sink.detail()
    assert sink.updates[0][0][0].match == Match(mac="02:00:00:00:10:01")


async def test_an_error_inside_the_handler_is_counted_and_the_receiver_goes_on(monkeypatch: Any) -> None:
    sink = Sink()
    async with receiver(sink) as (source, client):
        real = source._receive
        monkeypatch.setattr(source, "_receive", lambda *a: 1 / 0)
        client.send(start().RequestPacket())
        assert await client.silent()
        monkeypatch.setattr(source, "_receive", real)
        await exchange(client, start())
        assert source.status()["failures"] == 1


# -- the real radclient (FreeRADIUS) ----------------------------------------------------------------

async def test_radclient_start_and_stop() -> None:
    radclient = tool("radclient", "freeradius-utils")
    sink = Sink()
    async with receiver(sink) as (source, _):
        host, port = source.bound or ("", 0)
        for text in ('User-Name = "c1@isp"\nAcct-Status-Type = Start\nAcct-Session-Id = "s1"\n'
                     'Framed-IP-Address = 100.64.0.9\nDelegated-IPv6-Prefix = 2001:db8:100::/56\n'
                     'NAS-IP-Address = 192.0.2.1\n',
                     'Acct-Status-Type = Stop\nAcct-Session-Id = "s1"\nNAS-IP-Address = 192.0.2.1\n'):
            process = await asyncio.create_subprocess_exec(
                radclient, "-r", "1", "-t", "2", f"{host}:{port}", "acct", SECRET.decode(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await asyncio.wait_for(process.communicate(text.encode()), 10)
            assert process.returncode == 0, output.decode()
            assert b"Accounting-Response" in output, output.decode()
    (started, _), (_, stopped) = sink.updates
    assert started[0].key == "192.0.2.1/s1" and started[0].match == Match(username="c1@isp")
    assert started[0].addresses == nets("100.64.0.9/32", "2001:db8:100::/56")
    assert stopped == ["192.0.2.1/s1"]
    assert sink.problems == []
