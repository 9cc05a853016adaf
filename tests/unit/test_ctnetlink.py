"""The source-address matching of the in-process conntrack flush (the dump itself is
exercised on the real kernel by tests/kernel/test_enforcement.py)."""

from __future__ import annotations

import ipaddress

from enforcer.conntrack import Conntrack
from enforcer.ctnetlink import NetworkIndex

net = ipaddress.ip_network


def test_index_finds_the_longest_matching_network() -> None:
    wide, narrow, host6 = net("100.64.0.0/24"), net("100.64.0.128/25"), net("2001:db8::1/128")
    index = NetworkIndex([wide, narrow, host6, net("2001:db8:1::/56")])
    assert index.find(4, int(ipaddress.ip_address("100.64.0.200"))) == narrow
    assert index.find(4, int(ipaddress.ip_address("100.64.0.5"))) == wide
    assert index.find(4, int(ipaddress.ip_address("100.64.1.5"))) is None
    assert index.find(6, int(ipaddress.ip_address("2001:db8::1"))) == host6
    assert index.find(6, int(ipaddress.ip_address("2001:db8:1:0:ff::9"))) == net("2001:db8:1::/56")
    assert index.find(6, int(ipaddress.ip_address("2001:db8::2"))) is None


def test_the_tool_is_the_fallback_when_netlink_is_off() -> None:
    ct = Conntrack(netlink=False)
    assert ct._open_netlink() is None


# -- the netlink side, against a scripted socket -------------------------------------------------
import socket  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402

from enforcer import ctnetlink as cn  # noqa: E402


def entry(seq: int, family: int, source: str, zone: int | None = None, layout: str = "kernel") -> bytes:
    """One conntrack entry as ctnetlink dumps it (``layout="other"`` puts an attribute first)."""
    address = ipaddress.ip_address(source)
    src = cn._attr(cn._CTA_IP_V4_SRC if address.version == 4 else cn._CTA_IP_V6_SRC, address.packed)
    tuple_ip = cn._attr(cn._CTA_TUPLE_IP | cn._NESTED, src + cn._attr(2, address.packed))
    body = cn._attr(cn._CTA_TUPLE_ORIG | cn._NESTED, tuple_ip + cn._attr(2 | cn._NESTED, cn._attr(1, b"\x06")))
    body += cn._attr(2 | cn._NESTED, tuple_ip)                                  # the reply tuple
    if zone is not None:
        body += cn._attr(cn._CTA_ZONE, struct.pack(">H", zone))
    if layout == "other":
        body = cn._attr(3, struct.pack(">I", 8)) + body                          # status before the tuple
    payload = struct.pack("=BBH", family, 0, 0) + body
    return cn._HEADER.pack(16 + len(payload), cn._CT_NEW, 2, seq, 0) + payload


def control(kind: int, seq: int, error: int = 0) -> bytes:
    payload = struct.pack("=i", error) + b"\0" * 16 if kind == cn._NLMSG_ERROR else struct.pack("=i", 0)
    return cn._HEADER.pack(16 + len(payload), kind, 0, seq, 0) + payload


class ScriptedSocket:
    """Answers each request with what ``reply(message)`` returns; remembers what was sent."""

    def __init__(self, reply: "callable") -> None:
        self.reply, self.sent, self.queue = reply, [], []

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            length = struct.unpack_from("=I", data, offset)[0]
            message = data[offset:offset + length]
            self.sent.append(message)
            self.queue.append(self.reply(message))
            offset += length

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)


def netlink(reply: "callable") -> cn.Ctnetlink:
    handle = cn.Ctnetlink.__new__(cn.Ctnetlink)
    handle.sock, handle._seq, handle.last_pass = ScriptedSocket(reply), 100, ""
    handle.costs = {"all": cn.GUESS, "ipv4": cn.GUESS, "ipv6": cn.GUESS, "filtered": cn.GUESS}
    return handle


TABLE = [(socket.AF_INET, "100.64.0.1", None, "kernel"), (socket.AF_INET, "100.64.0.2", 7, "other"),
         (socket.AF_INET, "100.64.0.1", None, "kernel"), (socket.AF_INET6, "2001:db8:0:1::9", None, "kernel"),
         (socket.AF_INET6, "2001:db8:1::9", None, "kernel")]


def kernel(message: bytes) -> bytes:
    """A fake kernel: dumps ``TABLE`` (honouring the family and an IPv4 source filter), acks deletes."""
    _, kind, _, seq, _ = cn._HEADER.unpack_from(message)
    family = message[16]
    if kind == cn._CT_DELETE:
        return control(cn._NLMSG_ERROR, seq)
    wanted = None
    if len(message) > 20:                                   # CTA_FILTER: the source is at a fixed place
        wanted = str(ipaddress.ip_address(message[32:36]))
    rows = [entry(seq, f, source, zone, layout) for f, source, zone, layout in TABLE
            if family in (socket.AF_UNSPEC, f) and wanted in (None, source)]
    return control(cn._NLMSG_DONE, seq - 1) + b"".join(rows) + control(cn._NLMSG_DONE, seq)


def test_full_dump_deletes_matching_entries_with_their_family_tuple_and_zone() -> None:
    handle = netlink(kernel)
    assert handle.flush([net("100.64.0.2/32"), net("2001:db8::/56")]) == 2
    assert handle.last_pass == "full"
    deletes = [m for m in handle.sock.sent if cn._HEADER.unpack_from(m)[1] == cn._CT_DELETE]
    assert [m[16] for m in deletes] == [socket.AF_INET, socket.AF_INET6]
    zone = cn._attr(cn._CTA_ZONE, struct.pack(">H", 7))
    assert deletes[0].endswith(zone), "the zone goes back with the tuple"
    assert ipaddress.ip_address("100.64.0.2").packed in deletes[0]


def test_filtered_dumps_for_a_few_ipv4_addresses() -> None:
    handle = netlink(kernel)
    assert handle.flush([net("100.64.0.1/32")]) == 2
    assert handle.last_pass == "filtered"
    request = handle.sock.sent[0]
    assert request[16] == socket.AF_INET and len(request) > 20, "one kernel-filtered dump"


@pytest.mark.parametrize("costs, targets, expected", [
    ({}, ["100.64.0.1/32"], "filtered"),                                     # empty table: a walk is a walk
    ({}, ["100.64.0.1/32", "100.64.0.2/32"], "full"),
    ({}, ["100.64.0.1/32", "2001:db8::/56"], "full"),                        # one walk for both families
    ({"all": 1.5, "ipv4": 1.5, "ipv6": 0.05, "filtered": 0.08}, ["100.64.0.1/32", "2001:db8::/56"], "filtered"),
    ({"all": 1.5, "ipv4": 1.5, "ipv6": 0.05, "filtered": 0.08}, [f"100.64.1.{i}/32" for i in range(30)], "full"),
    ({"all": 1.5, "ipv4": 1.5, "ipv6": 0.05, "filtered": 0.08}, ["100.64.0.0/30"], "full"),  # no masks in the filter
])
def test_each_pass_takes_the_cheaper_dump(costs: dict, targets: list[str], expected: str) -> None:
    handle = netlink(kernel)
    handle.costs.update(costs)
    handle.flush([net(t) for t in targets])
    assert handle.last_pass == expected
    assert all(value > 0 for value in handle.costs.values())


def test_forcing_a_filtered_pass_refuses_what_the_filter_cannot_match() -> None:
    with pytest.raises(ValueError):
        netlink(kernel).flush([net("2001:db8::/56")], filtered=True)
    with pytest.raises(ValueError):
        netlink(kernel).flush([net("100.64.0.0/30")], filtered=True)


def test_a_dump_error_is_raised_and_a_vanished_entry_is_not_counted() -> None:
    def refusing(message: bytes) -> bytes:
        return control(cn._NLMSG_ERROR, cn._HEADER.unpack_from(message)[3], -1)   # EPERM

    with pytest.raises(cn.CtnetlinkError, match="EPERM"):
        netlink(refusing).flush([net("100.64.0.1/32"), net("100.64.0.2/32")])

    def vanished(message: bytes) -> bytes:
        _, kind, _, seq, _ = cn._HEADER.unpack_from(message)
        return control(cn._NLMSG_ERROR, seq, -2) if kind == cn._CT_DELETE else kernel(message)  # ENOENT

    assert netlink(vanished).flush([net("100.64.0.1/32")]) == 0
