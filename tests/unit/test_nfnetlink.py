"""The raw nftables netlink session without a kernel: answers are queued on a socketpair by the
test, as the kernel queues them within the ``send``. The real kernel's answers are checked in
tests/kernel/test_dns_garden_set.py and tests/kernel/test_restart_digest.py."""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import pytest

from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.nfnetlink import (
    ELEMENTS_PER_MESSAGE,
    HEADER,
    NEWSETELEM,
    NLMSG_ERROR,
    BatchRefused,
    ElementWriter,
    NetlinkSession,
)


def answer(seq: int, error: int) -> bytes:
    """An NLMSG_ERROR for ``seq`` (0: the acknowledgement), with the capped request header."""
    body = struct.pack("=i", -error) + HEADER.pack(16, 0, 0, seq, 0)
    return HEADER.pack(16 + len(body), NLMSG_ERROR, 0, seq, 0) + body


@pytest.fixture
def wired() -> Iterator[tuple[NetlinkSession, socket.socket]]:
    """A session whose socket is one end of a datagram socketpair; the test is the kernel."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    session = NetlinkSession()
    session._sock = ours
    yield session, kernel
    session.close()
    kernel.close()


MESSAGES = [(NEWSETELEM, 0, b"\0" * 8)] * 3   # seq 2, 3, 4 between begin (1) and end (5)


def test_acknowledged_batch_is_applied(wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, kernel = wired
    for seq in (2, 3, 4):
        kernel.send(answer(seq, 0))
    session.batch(MESSAGES, "test")
    assert session._sock is not None


def test_a_refused_message_names_its_errno_and_index_after_every_answer(
        wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, kernel = wired
    for seq, error in ((2, 0), (3, errno.ENFILE), (4, 0)):
        kernel.send(answer(seq, error))
    with pytest.raises(BatchRefused) as refused:
        session.batch(MESSAGES, "test")
    assert (refused.value.errno, refused.value.index) == (errno.ENFILE, 1)
    assert session._sock is not None, "every answer was read: the socket stays"


def test_an_error_on_the_batch_itself_refuses_all_of_it_even_if_messages_say_0(
        wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, kernel = wired
    kernel.send(answer(1, errno.ENOMEM))   # the commit failed: an error on BATCH_BEGIN's seq ...
    for seq in (2, 3, 4):
        kernel.send(answer(seq, 0))        # ... and 0 for each message
    with pytest.raises(BatchRefused) as refused:
        session.batch(MESSAGES, "test")
    assert (refused.value.errno, refused.value.index) == (errno.ENOMEM, -1)
    assert session._sock is None, "answers may be left unread: a fresh socket next time"


def test_a_missing_answer_fails_at_once_instead_of_waiting(wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, kernel = wired
    kernel.send(answer(2, 0))              # two of three answers
    kernel.send(answer(3, 0))
    started = time.monotonic()
    with pytest.raises(DataplaneError, match="no answer queued"):
        session.batch(MESSAGES, "test")
    assert time.monotonic() - started < 0.5
    assert session._sock is None


def test_sequence_numbers_wrap_before_32_bits(wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, kernel = wired
    session._seq = 0xFFFFFFFF - 2
    for seq in (2, 3, 4):
        kernel.send(answer(seq, 0))
    session.batch(MESSAGES, "test")
    assert session._seq == 5


class Captured(NetlinkSession):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[int, int, bytes]]] = []

    def batch(self, messages: Any, what: str) -> None:
        self.batches.append(list(messages))


def test_the_writer_splits_a_set_s_elements_into_messages_an_attribute_length_can_hold() -> None:
    writer = ElementWriter("t")
    captured = Captured()
    writer._session = captured
    v6 = [(ip_address(f"2001:db8::{i:x}"), 60) for i in range(2 * ELEMENTS_PER_MESSAGE + 5)]
    writer.write([("dnsgarden6", [a for a, _ in v6[:10]], v6)])
    [messages] = captured.batches
    assert len(messages) == 1 + 3          # one delete message, three add messages
    for _kind, _flags, body in messages:
        assert len(body) < 65536


def test_a_batch_over_the_size_limit_is_a_clear_error(wired: tuple[NetlinkSession, socket.socket]) -> None:
    session, _ = wired
    with pytest.raises(DataplaneError, match="split it"):
        session.batch([(NEWSETELEM, 0, b"\0" * 60000)] * 3, "test")
