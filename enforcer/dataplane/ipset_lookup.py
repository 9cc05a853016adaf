"""``ipset test`` over netlink directly: one exact kernel answer per element, no process.

The ipset backend's routine checks (``holds_layout``: the layout tag, every set's sentinel and
every umbrella's members, every few seconds) and the portal's caller check (``recent_caller``)
ask the kernel whether one set holds one address (or one ``list:set`` one member set).
Spawning ``ipset test`` per question costs ~2 ms each and a process per sentinel; this is the
same request (``IPSET_CMD_TEST``, what the tool sends) on a socket of our own, ~20 us. The
socket is opened on first use, so in the network namespace of the thread that uses it; calls
are serialised.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading

from .backend import DataplaneError

_IPSET_PROTOCOL = 7
_CMD_TEST = 11
_SUBSYS = 6                         # NFNL_SUBSYS_IPSET
_NESTED, _NET_ORDER = 0x8000, 0x4000
_ATTR_PROTOCOL, _ATTR_SETNAME, _ATTR_DATA = 1, 2, 7
_ATTR_IP, _ATTR_CIDR = 1, 3
_ATTR_NAME = 18                     # IPSET_ATTR_NAME: a list:set's member
_ATTR_IPV4, _ATTR_IPV6 = 1, 2
_ERR_EXIST = 4103                   # IPSET_ERR_EXIST: "not in the set" for a test
_ERR_TYPE_MISMATCH = 4102
_ERR_NAME = 4352                    # IPSET_ERR_NAME (list:set): no set of the member's name
_SEQ_MAX = 0xFFFFFFFF               # nlmsg_seq is 32 bits
_HEADER = struct.Struct("=IHHII")


def next_seq(seq: int) -> int:
    """The sequence number after ``seq``: 1 to 2**32 - 1, then 1 again (``struct`` refuses a
    33-bit one; 0 is left out, as the kernel's own requests use it)."""
    return seq % _SEQ_MAX + 1


def _describe(error: int) -> str:
    """An errno's text; ipset's own codes (4096 and up) have none in libc."""
    return os.strerror(error) if error < 4096 else "ipset error"


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


class SetLookup:
    """``holds(set, address[, prefix length])``: is that exact element (or, without a length, an
    element covering the address, as the packet path matches) in the set?"""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def holds(self, name: str, address: str, prefixlen: int | None = None) -> bool:
        """False when the element or the set is missing (or the set is of the other family);
        ``DataplaneError`` for any other answer."""
        ip = ipaddress.ip_address(address)
        kind = _ATTR_IPV4 if ip.version == 4 else _ATTR_IPV6
        data = _attr(_ATTR_IP | _NESTED, _attr(kind | _NET_ORDER, ip.packed))
        if prefixlen is not None:
            data += _attr(_ATTR_CIDR, struct.pack("=B", prefixlen))
        return self._test(name, data, address)

    def holds_member(self, name: str, member: str) -> bool:
        """Does the ``list:set`` ``name`` list the set ``member``? False when it does not, or when
        either set is missing; ``DataplaneError`` for any other answer (``name`` not a list:set)."""
        return self._test(name, _attr(_ATTR_NAME, member.encode() + b"\0"), member, (_ERR_NAME,))

    def _test(self, name: str, data: bytes, what: str, also_missing: tuple[int, ...] = ()) -> bool:
        body = (struct.pack("=BBH", socket.AF_INET, 0, 0)
                + _attr(_ATTR_PROTOCOL, struct.pack("=B", _IPSET_PROTOCOL))
                + _attr(_ATTR_SETNAME, name.encode() + b"\0")
                + _attr(_ATTR_DATA | _NESTED, data))
        with self._lock:
            try:
                error = self._request(body)
            except OSError as exc:
                self.close()   # a fresh socket next time: no answer of this one is read late
                raise DataplaneError(f"ipset test {name} {what}: {exc}") from None
        if error == 0:
            return True
        if error in (_ERR_EXIST, errno.ENOENT, _ERR_TYPE_MISMATCH, *also_missing):
            return False
        raise DataplaneError(f"ipset test {name} {what}: error {error} ({_describe(error)})")

    def _request(self, body: bytes) -> int:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)   # NETLINK_NETFILTER
            self._sock.settimeout(5.0)
            self._sock.bind((0, 0))
        self._seq = next_seq(self._seq)
        kind = (_SUBSYS << 8) | _CMD_TEST
        self._sock.send(_HEADER.pack(16 + len(body), kind, 0x1 | 0x4, self._seq, 0) + body)   # REQUEST|ACK
        for _ in range(1000):   # answers of this request only; a bound, never a busy loop
            data = self._sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, answer, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < 16:
                    raise OSError(errno.EPROTO, "netlink: malformed answer")
                if seq == self._seq and answer == 2:   # NLMSG_ERROR: the acknowledgement or the error
                    return int(-struct.unpack_from("=i", data, offset + 16)[0])
                offset += (length + 3) & ~3
        raise OSError(errno.EPROTO, "netlink: no acknowledgement")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
