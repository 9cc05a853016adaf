"""The source-address matching of the in-process conntrack flush (the dump itself is
exercised on the real kernel by tests/kernel/test_enforcement.py)."""

from __future__ import annotations

import ipaddress

from enforcer.conntrack import Conntrack
from enforcer.ctnetlink import NetworkIndex, target_parts
from enforcer.subscribers import network_key

net = ipaddress.ip_network


def test_index_finds_the_longest_matching_network() -> None:
    wide, narrow, host6 = net("100.64.0.0/24"), net("100.64.0.128/25"), net("2001:db8::1/128")
    index = NetworkIndex([wide, narrow, host6, net("2001:db8:1::/56")])
    assert index.find(4, int(ipaddress.ip_address("100.64.0.200"))) == 25
    assert index.find(4, int(ipaddress.ip_address("100.64.0.5"))) == 24
    assert index.find(4, int(ipaddress.ip_address("100.64.1.5"))) is None
    assert index.find(6, int(ipaddress.ip_address("2001:db8::1"))) == 128
    assert index.find(6, int(ipaddress.ip_address("2001:db8:1:0:ff::9"))) == 56
    assert index.find(6, int(ipaddress.ip_address("2001:db8::2"))) is None
    assert index.match((4, int(ipaddress.ip_address("100.64.0.5")))) and not index.match((6, 5))


def test_keys_index_as_their_networks_do() -> None:
    """The reconciler's keys (version, prefix length, inet_ntop text) are read as integers,
    with no ``ipaddress`` object: the same index as the networks they name."""
    texts = ["100.64.0.7/32", "100.64.8.0/22", "2001:db8:10:100::/56", "2001:db8::1/128", "::ffff:100.64.0.1/128"]
    networks = [net(t) for t in texts]
    keys = [network_key(n) for n in networks]
    assert [target_parts(k) for k in keys] == [target_parts(n) for n in networks] == \
        [(n.version, int(n.network_address), n.prefixlen) for n in networks]
    assert NetworkIndex(keys).tables == NetworkIndex(networks).tables
    assert NetworkIndex(keys + networks).count(4) == 2, "a key and its network are one target"
    assert NetworkIndex(keys).exact(6) is False and NetworkIndex(keys[:1]).exact(4) is True


def test_the_tool_is_the_fallback_when_netlink_is_off() -> None:
    ct = Conntrack(netlink=False)
    assert ct._open_netlink() is None


# -- the netlink side, against a scripted socket -------------------------------------------------
import socket  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402

from enforcer import ctnetlink as cn  # noqa: E402


def entry(seq: int, family: int, source: str, zone: int | None = None, layout: str = "kernel",
          mark: int | None = None) -> bytes:
    """One conntrack entry as ctnetlink dumps it (``layout="other"`` puts an attribute first)."""
    address = ipaddress.ip_address(source)
    src = cn._attr(cn._CTA_IP_V4_SRC if address.version == 4 else cn._CTA_IP_V6_SRC, address.packed)
    tuple_ip = cn._attr(cn._CTA_TUPLE_IP | cn._NESTED, src + cn._attr(2, address.packed))
    body = cn._attr(cn._CTA_TUPLE_ORIG | cn._NESTED, tuple_ip + cn._attr(2 | cn._NESTED, cn._attr(1, b"\x06")))
    body += cn._attr(2 | cn._NESTED, tuple_ip)                                  # the reply tuple
    if mark is not None:
        body += cn._attr(cn._CTA_MARK, struct.pack(">I", mark))
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

    def __init__(self, reply: callable) -> None:
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


def netlink(reply: callable) -> cn.Ctnetlink:
    handle = cn.Ctnetlink.__new__(cn.Ctnetlink)
    handle.sock, handle._seq, handle.last_pass = ScriptedSocket(reply), 100, ""
    handle.costs = {"all": cn.GUESS, "ipv4": cn.GUESS, "ipv6": cn.GUESS, "filtered": cn.GUESS}
    return handle


TABLE = [(socket.AF_INET, "100.64.0.1", None, "kernel"), (socket.AF_INET, "100.64.0.2", 7, "other"),
         (socket.AF_INET, "100.64.0.1", None, "kernel"), (socket.AF_INET6, "2001:db8:0:1::9", None, "kernel"),
         (socket.AF_INET6, "2001:db8:1::9", None, "kernel")]
PORTAL = 0x00400000
#: The same subscribers with ct marks: the portal's bit on some (alone or with other bits), others bits only.
MARKED = [(socket.AF_INET, "100.64.0.1", None, "kernel", PORTAL), (socket.AF_INET, "100.64.0.1", None, "kernel", 0),
          (socket.AF_INET, "100.64.0.1", 7, "other", PORTAL | 0x5), (socket.AF_INET, "100.64.0.1", None, "kernel", 0x5),
          (socket.AF_INET, "100.64.0.2", None, "kernel", None),
          (socket.AF_INET6, "2001:db8::9", None, "kernel", PORTAL), (socket.AF_INET6, "2001:db8::9", None, "kernel", 1)]


def request_attrs(message: bytes) -> dict[int, bytes]:
    """The top-level attributes of a request (after the netlink and nfgen headers)."""
    return {kind: message[offset:stop] for kind, offset, stop in cn._attrs(message, 20, len(message))}


def kernel_with(table: list[tuple], honour_mark: bool = True):
    """A fake kernel dumping ``table`` (family, source, zone, layout[, mark]), honouring the family,
    an IPv4 source filter and (unless ``honour_mark`` is false) a CTA_MARK/CTA_MARK_MASK filter;
    acks deletes."""
    def answer(message: bytes) -> bytes:
        _, kind, _, seq, _ = cn._HEADER.unpack_from(message)
        family = message[16]
        if kind == cn._CT_DELETE:
            return control(cn._NLMSG_ERROR, seq)
        attrs = request_attrs(message)
        wanted = None
        if cn._CTA_FILTER in attrs:                         # the source is inside CTA_TUPLE_ORIG/CTA_TUPLE_IP
            wanted = str(ipaddress.ip_address(attrs[cn._CTA_TUPLE_ORIG][8:12]))
        value, mask = 0, 0
        if honour_mark and cn._CTA_MARK in attrs:
            value = int.from_bytes(attrs[cn._CTA_MARK], "big")
            mask = int.from_bytes(attrs.get(cn._CTA_MARK_MASK, b"\xff" * 4), "big")
        rows = [entry(seq, f, source, zone, layout, *rest) for f, source, zone, layout, *rest in table
                if family in (socket.AF_UNSPEC, f) and wanted in (None, source)
                and ((rest[0] if rest and rest[0] is not None else 0) & mask) == value]
        return control(cn._NLMSG_DONE, seq - 1) + b"".join(rows) + control(cn._NLMSG_DONE, seq)
    return answer


kernel = kernel_with(TABLE)


def test_full_dump_deletes_matching_entries_with_their_family_tuple_and_zone() -> None:
    handle = netlink(kernel)
    assert handle.flush([net("100.64.0.2/32"), net("2001:db8::/56")]) == 2
    assert handle.last_pass == "full"
    deletes = [m for m in handle.sock.sent if cn._HEADER.unpack_from(m)[1] == cn._CT_DELETE]
    assert [m[16] for m in deletes] == [socket.AF_INET, socket.AF_INET6]
    zone = cn._attr(cn._CTA_ZONE, struct.pack(">H", 7))
    assert deletes[0].endswith(zone), "the zone goes back with the tuple"
    assert ipaddress.ip_address("100.64.0.2").packed in deletes[0]


@pytest.mark.parametrize("targets", [["100.64.0.2/32", "2001:db8::/56"], ["100.64.0.1/32"],
                                     ["100.64.0.0/30", "2001:db8::1/128"]])
def test_keys_flush_what_their_networks_flush(targets: list[str]) -> None:
    """The reconciler hands the flush keys (``SyncResult.changed``): the same requests and
    deletes as the networks they name."""
    by_networks, by_keys = netlink(kernel), netlink(kernel)
    networks = [net(t) for t in targets]
    assert by_keys.flush([network_key(n) for n in networks], keep_mark=PORTAL) == \
        by_networks.flush(networks, keep_mark=PORTAL)
    assert by_keys.last_pass == by_networks.last_pass
    strip = [m[:8] + m[12:] for m in by_networks.sock.sent]   # less the sequence numbers
    assert [m[:8] + m[12:] for m in by_keys.sock.sent] == strip


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


# -- keep_mark: the portal's connections survive the flush ---------------------------------------
def deleted_marks(handle: cn.Ctnetlink) -> list[tuple[int, str]]:
    """(family, source) of each delete sent."""
    out = []
    for message in handle.sock.sent:
        if cn._HEADER.unpack_from(message)[1] == cn._CT_DELETE:
            source = cn._source(message, 20, len(message))
            assert source is not None
            out.append((message[16], str(ipaddress.ip_address(source[1]))))
    return out


@pytest.mark.parametrize("honour_mark", [True, False], ids=["kernel-filter", "kernel-ignores-filter"])
@pytest.mark.parametrize("targets, filtered", [
    (["100.64.0.1/32", "100.64.0.2/32", "2001:db8::/64"], False),        # one full dump of both families
    (["100.64.0.1/32", "100.64.0.2/32"], True),                           # kernel-filtered IPv4 dumps
    (["100.64.0.0/24"], False),                                           # a prefix: full IPv4 dump
])
def test_entries_with_a_kept_mark_bit_are_not_deleted(targets: list[str], filtered: bool, honour_mark: bool) -> None:
    handle = netlink(kernel_with(MARKED, honour_mark))
    deleted = handle.flush([net(t) for t in targets], filtered=filtered or None, keep_mark=PORTAL)
    v4 = [(socket.AF_INET, "100.64.0.1")] * 2 + [(socket.AF_INET, "100.64.0.2")]
    expected = v4 + ([(socket.AF_INET6, "2001:db8::9")] if any(":" in t for t in targets) else [])
    assert deleted == len(expected)
    assert sorted(deleted_marks(handle)) == sorted(expected), "unmarked and other-bit entries go, portal ones stay"
    dumps = [m for m in handle.sock.sent if cn._HEADER.unpack_from(m)[1] == cn._CT_GET]
    for dump in dumps:
        attrs = request_attrs(dump)
        assert attrs[cn._CTA_MARK] == b"\0\0\0\0" and attrs[cn._CTA_MARK_MASK] == struct.pack(">I", PORTAL), \
            "the kernel is asked for mark & keep == 0"


def test_without_keep_mark_every_entry_goes_and_no_mark_filter_is_sent() -> None:
    handle = netlink(kernel_with(MARKED))
    assert handle.flush([net("100.64.0.1/32"), net("2001:db8::/64")]) == 6
    assert all(cn._CTA_MARK not in request_attrs(m) for m in handle.sock.sent
               if cn._HEADER.unpack_from(m)[1] == cn._CT_GET)


def test_a_keep_mark_outside_32_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="keep_mark"):
        netlink(kernel).flush([net("100.64.0.1/32")], keep_mark=1 << 32)
    with pytest.raises(ValueError, match="keep_mark"):
        asyncio.run(Conntrack(netlink=False).flush([net("100.64.0.1/32")], keep_mark=-1))


def test_a_malformed_mark_is_an_error_not_a_guess() -> None:
    def bad(message: bytes) -> bytes:
        _, kind, _, seq, _ = cn._HEADER.unpack_from(message)
        if kind == cn._CT_DELETE:
            return control(cn._NLMSG_ERROR, seq)
        row = entry(seq, socket.AF_INET, "100.64.0.1")
        row = row + cn._attr(cn._CTA_MARK, b"\x00\x40")                 # a two-byte mark
        row = struct.pack("=I", len(row)) + row[4:]
        return row + control(cn._NLMSG_DONE, seq)
    with pytest.raises(cn.CtnetlinkError, match="CTA_MARK"):
        netlink(bad).flush([net("100.64.0.1/32")], keep_mark=PORTAL)


# -- the tool fallback honours keep_mark too --------------------------------------------------------
import asyncio  # noqa: E402
import stat  # noqa: E402
from pathlib import Path  # noqa: E402


def fake_tool(tmp_path: Path, listing: str = "") -> tuple[str, Path]:
    """A ``conntrack`` stand-in recording its argv, one line per call."""
    log = tmp_path / "argv.log"
    tool = tmp_path / "conntrack"
    tool.write_text("#!/bin/sh\n"
                    f"echo \"$*\" >> {log}\n"
                    'case "$1" in -L) cat <<\'EOF\'\n' + listing + "EOF\n;; "
                    "*) echo 'conntrack v1.4.7 (conntrack-tools): 1 flow entries have been deleted.' >&2;; esac\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return str(tool), log


def test_the_tool_deletes_only_entries_without_a_kept_bit(tmp_path) -> None:
    binary, log = fake_tool(tmp_path)
    ct = Conntrack(binary=binary, netlink=False)
    assert asyncio.run(ct.flush_now([net("100.64.0.1/32"), net("2001:db8::/64")], keep_mark=PORTAL)) == 2
    calls = sorted(log.read_text().splitlines())
    assert calls == ["-D -f ipv4 -s 100.64.0.1 --mark 0/0x400000",
                     "-D -f ipv6 -s 2001:db8:: --mask-src ffff:ffff:ffff:ffff:: --mark 0/0x400000"], calls


def test_the_tool_takes_keys_as_text(tmp_path) -> None:
    binary, log = fake_tool(tmp_path)
    ct = Conntrack(binary=binary, netlink=False)
    keys = [network_key(net(t)) for t in ("100.64.0.1/32", "100.64.8.0/22", "2001:db8:10:100::/56")]
    assert asyncio.run(ct.flush_now(keys + [net("100.64.0.1/32")], keep_mark=PORTAL)) == 3
    calls = sorted(log.read_text().splitlines())
    assert calls == ["-D -f ipv4 -s 100.64.0.1 --mark 0/0x400000",
                     "-D -f ipv4 -s 100.64.8.0 --mask-src 255.255.252.0 --mark 0/0x400000",
                     "-D -f ipv6 -s 2001:db8:10:100:: --mask-src ffff:ffff:ffff:ff00:: --mark 0/0x400000"], calls


def test_the_tool_listing_for_many_networks_skips_kept_entries_too(tmp_path) -> None:
    listing = "tcp      6 431999 ESTABLISHED src=100.64.0.3 dst=198.51.100.10 sport=1 dport=80 mark=0\n"
    binary, log = fake_tool(tmp_path, listing)
    ct = Conntrack(binary=binary, netlink=False)
    targets = [net(f"100.64.0.{i}/32") for i in range(1, 8)]
    assert asyncio.run(ct.flush_now(targets, keep_mark=PORTAL)) == 1
    calls = log.read_text().splitlines()
    assert calls == ["-L -f ipv4 --mark 0/0x400000", "-D -f ipv4 -s 100.64.0.3 --mark 0/0x400000"], calls
    log.unlink()
    assert asyncio.run(ct.flush_now([net("100.64.0.1/32")])) == 1
    assert log.read_text().splitlines() == ["-D -f ipv4 -s 100.64.0.1"], "no mark: everything of theirs"


def test_requests_with_different_keep_marks_share_no_pass(tmp_path) -> None:
    binary, log = fake_tool(tmp_path)
    ct = Conntrack(binary=binary, netlink=False)

    async def both() -> list[int]:
        return list(await asyncio.gather(ct.flush([net("100.64.0.1/32")], keep_mark=PORTAL),
                                         ct.flush([net("100.64.0.2/32")])))
    assert asyncio.run(both()) == [1, 1]
    assert sorted(log.read_text().splitlines()) == ["-D -f ipv4 -s 100.64.0.1 --mark 0/0x400000",
                                                    "-D -f ipv4 -s 100.64.0.2"]


def test_a_cancelled_waiter_does_not_cost_the_others_their_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flushes waiting for the same pass: one caller gives up (its request is cancelled) while
    the pass runs; the others still get the count, and the next pass still runs."""
    import asyncio

    async def scenario() -> tuple[list[int], int]:
        ct = Conntrack(netlink=False)
        started = asyncio.Event()

        async def slow_flush(networks: object, keep_mark: int = 0) -> int:
            started.set()
            await asyncio.sleep(0.05)
            return 3

        monkeypatch.setattr(ct, "flush_now", slow_flush)
        gone = asyncio.ensure_future(ct.flush([net("100.64.0.1/32")]))
        kept = [asyncio.ensure_future(ct.flush([net(f"100.64.0.{i}/32")])) for i in (2, 3)]
        await asyncio.wait_for(started.wait(), 5)
        gone.cancel()
        answers = await asyncio.wait_for(asyncio.gather(*kept), 5)
        later = await asyncio.wait_for(ct.flush([net("100.64.0.9/32")]), 5)
        return answers, later

    assert asyncio.run(scenario()) == ([3, 3], 3)
