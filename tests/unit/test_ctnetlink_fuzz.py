"""Fuzzing the ctnetlink reader: whatever bytes the socket returns, entries or ``CtnetlinkError``.

The dump parser reads lengths and offsets out of the kernel's answer; one it trusts too far
(an attribute running past its message, an error message cut short) must not raise
``struct.error`` or ``IndexError``: the daemon's flush does not catch those (it expects
``ConntrackError``/``OSError``), and a lifted customer's portal connection, or a restricted
one's open connections, would be left in an unknown state. Every case runs under an alarm: a parser that loops forever
fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import struct
from collections.abc import Iterator

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_ctnetlink import MARKED, PORTAL, ScriptedSocket, control, entry, netlink

from enforcer import ctnetlink as cn


class QuietSocket(ScriptedSocket):
    """Times out, as the real socket does after RECV_TIMEOUT, when it has nothing more to say
    (a fuzzed message may swallow the DONE the script appended)."""

    def recv(self, size: int) -> bytes:
        if not self.queue:
            raise TimeoutError("timed out")
        return super().recv(size)

SEQ = 4242
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALARM_SECONDS = 5


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """Fail (instead of hanging) when the code under test does not return within ALARM_SECONDS."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {ALARM_SECONDS}s: the parser loops")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(ALARM_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def parse(data: bytes, keep_mark: int, with_match: bool) -> tuple[list[bytes], bool] | None:
    """``parse_dump``'s result, or None after a CtnetlinkError; anything else propagates (a failure)."""
    match = (lambda source: source[0] in (4, 6)) if with_match else None
    with bounded():
        try:
            found, finished = cn.parse_dump(data, SEQ, match, keep_mark)
        except cn.CtnetlinkError as exc:
            assert exc.strerror.startswith("conntrack "), exc  # the message names what was being read
            return None
    assert isinstance(finished, bool)
    assert all(isinstance(identity, bytes) and len(identity) >= 1 for identity in found), found
    return found, finished


# -- strategies ------------------------------------------------------------------------------------
def attribute(kind: int, payload: bytes, lie: int | None) -> bytes:
    """One attribute; ``lie`` replaces its length field (too short, too long, zero)."""
    raw = cn._attr(kind, payload)
    return raw if lie is None else struct.pack("=H", lie & 0xFFFF) + raw[2:]


KINDS = st.sampled_from([cn._CTA_TUPLE_ORIG, cn._CTA_TUPLE_ORIG | cn._NESTED, cn._CTA_TUPLE_IP | cn._NESTED,
                         cn._CTA_IP_V4_SRC, cn._CTA_IP_V6_SRC, cn._CTA_MARK, cn._CTA_ZONE, 2, 3]) | \
    st.integers(0, 0xFFFF)
LIES = st.none() | st.none() | st.integers(0, 70000)
attributes = st.recursive(
    st.builds(attribute, KINDS, st.binary(max_size=24), LIES),
    lambda inner: st.builds(attribute, KINDS, st.lists(inner, max_size=4).map(b"".join), LIES),
    max_leaves=20)


def message(kind: int, seq: int, payload: bytes, lie: int | None) -> bytes:
    length = 16 + len(payload) if lie is None else lie & 0xFFFFFFFF
    return cn._HEADER.pack(length, kind, 2, seq, 0) + payload


MESSAGE_KINDS = st.sampled_from([cn._CT_NEW, cn._CT_NEW, cn._NLMSG_DONE, cn._NLMSG_ERROR, 0, 1, 0xFFFF])
messages = st.builds(
    message, MESSAGE_KINDS, st.sampled_from([SEQ, SEQ, SEQ - 1, 0]),
    st.builds(lambda family, body: struct.pack("=BBH", family, 0, 0) + body,
              st.sampled_from([socket.AF_INET, socket.AF_INET6, 0, 255]),
              st.lists(attributes, max_size=5).map(b"".join))
    | st.binary(max_size=8),
    LIES)
dumps = st.lists(messages, max_size=6).map(b"".join)
VALID = b"".join(entry(SEQ, f, source, zone, layout, mark) for f, source, zone, layout, mark in MARKED)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real-looking dump with bytes flipped, cut or inserted."""
    data = bytearray(VALID + control(cn._NLMSG_DONE, SEQ))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if action == "flip":
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 8))]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[position:]
        if not data:
            break
    return bytes(data)


MARKS = st.sampled_from([0, PORTAL, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)


# -- properties ------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048), MARKS, st.booleans())
@example(cn._HEADER.pack(0, cn._CT_NEW, 0, SEQ, 0), 0, False)                     # a zero-length message
@example(cn._HEADER.pack(16, cn._NLMSG_ERROR, 0, SEQ, 0), 0, False)              # an error without its code
@example(cn._HEADER.pack(17, cn._CT_NEW, 0, SEQ, 0) + b"\x02", PORTAL, True)      # an entry without nfgen header
@example(cn._HEADER.pack(24, cn._CT_NEW, 0, SEQ, 0) + b"\x02\0\0\0" + struct.pack("=HH", 0, 1), 0, True)
def test_arbitrary_bytes_give_entries_or_a_ctnetlink_error(data: bytes, keep_mark: int, with_match: bool) -> None:
    parse(data, keep_mark, with_match)


@FUZZ
@given(dumps, MARKS, st.booleans())
def test_lying_lengths_and_nested_attributes_give_entries_or_a_ctnetlink_error(
        data: bytes, keep_mark: int, with_match: bool) -> None:
    parse(data, keep_mark, with_match)


@FUZZ
@given(mutated(), MARKS)
def test_a_damaged_real_dump_gives_entries_or_a_ctnetlink_error(data: bytes, keep_mark: int) -> None:
    parse(data, keep_mark, True)


def test_the_undamaged_dump_is_read_whole() -> None:
    """The fuzzed parser still reads a well-formed dump right (the properties above hold for a
    parser that refuses everything)."""
    found, finished = parse(VALID + control(cn._NLMSG_DONE, SEQ), PORTAL, True)
    assert finished and len(found) == 4               # MARKED without its three portal-marked entries
    found, finished = parse(VALID, 0, False)
    assert not finished and len(found) == len(MARKED)


@FUZZ
@given(st.binary(max_size=1024) | dumps | mutated(), st.binary(max_size=256) | dumps, MARKS)
def test_a_whole_flush_on_a_babbling_socket_ends_with_a_count_or_a_ctnetlink_error(
        dump: bytes, acks: bytes, keep_mark: int) -> None:
    """The socket answers the dump with the fuzzed bytes then DONE, and each delete with fuzzed
    bytes then its acknowledgement: ``flush`` returns a count or raises ``CtnetlinkError``."""
    def reply(sent: bytes) -> bytes:
        _, kind, _, seq, _ = cn._HEADER.unpack_from(sent)
        if kind == cn._CT_DELETE:
            return acks + control(cn._NLMSG_ERROR, seq)
        return dump.replace(struct.pack("=I", SEQ), struct.pack("=I", seq)) + control(cn._NLMSG_DONE, seq)

    handle = netlink(reply)
    handle.sock = QuietSocket(reply)
    with bounded():
        try:
            deleted = handle.flush([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")],
                                   keep_mark=keep_mark)
        except (cn.CtnetlinkError, TimeoutError):   # both OSError: Conntrack turns them into ConntrackError
            return
    assert deleted >= 0
