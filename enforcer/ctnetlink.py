"""Conntrack through libnetfilter_conntrack (ctypes): one dump, deletes of what matches.

The ``conntrack`` tool costs two process starts per flush pass (one listing per family)
and its text output is parsed again here; with a webhook flood that was a fifth of the
daemon's throughput (docs/benchmarks.md). The library the tool is built on does the same
in-process: one ctnetlink dump of both families (the kernel walks its hash table once),
a callback per entry that keeps entries whose original source lies in a network we were
asked about, then one delete per kept entry. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
from typing import Iterable

from .subscribers import Network

_CONNTRACK = 1                      # NFNL_SUBSYS_CTNETLINK
_NFCT_T_ALL = 7                     # NEW | UPDATE | DESTROY
_NFCT_CB_CONTINUE = 1
_NFCT_Q_DESTROY, _NFCT_Q_DUMP = 2, 5
_ATTR_ORIG_IPV4_SRC, _ATTR_ORIG_IPV6_SRC, _ATTR_ORIG_L3PROTO = 0, 4, 15
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class CtnetlinkError(OSError):
    pass


def load() -> ctypes.CDLL:
    """The library, or ``OSError`` when it is not installed (then the tool is used)."""
    name = ctypes.util.find_library("netfilter_conntrack") or "libnetfilter_conntrack.so.3"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.nfct_open.restype = ctypes.c_void_p
    lib.nfct_open.argtypes = [ctypes.c_uint8, ctypes.c_uint]
    lib.nfct_close.argtypes = [ctypes.c_void_p]
    lib.nfct_callback_register.argtypes = [ctypes.c_void_p, ctypes.c_int, _CALLBACK, ctypes.c_void_p]
    lib.nfct_callback_unregister.argtypes = [ctypes.c_void_p]
    lib.nfct_query.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.nfct_get_attr.restype = ctypes.c_void_p
    lib.nfct_get_attr.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.nfct_get_attr_u8.restype = ctypes.c_uint8
    lib.nfct_get_attr_u8.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.nfct_get_attr_u32.restype = ctypes.c_uint32
    lib.nfct_get_attr_u32.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.nfct_clone.restype = ctypes.c_void_p
    lib.nfct_clone.argtypes = [ctypes.c_void_p]
    lib.nfct_destroy.argtypes = [ctypes.c_void_p]
    return lib


class NetworkIndex:
    """``source address → the asked network that contains it``, by masked lookups."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.by_length: dict[int, list[tuple[int, dict[int, Network]]]] = {4: [], 6: []}
        tables: dict[tuple[int, int], dict[int, Network]] = {}
        for network in networks:
            tables.setdefault((network.version, network.prefixlen), {})[int(network.network_address)] = network
        for (version, plen), table in sorted(tables.items(), key=lambda item: -item[0][1]):
            width = 32 if version == 4 else 128
            self.by_length[version].append((width - plen, table))

    def find(self, version: int, address: int) -> Network | None:
        for shift, table in self.by_length[version]:
            network = table.get(address >> shift << shift)
            if network is not None:
                return network
        return None


class Ctnetlink:
    """A conntrack netlink handle in this process's network namespace."""

    def __init__(self) -> None:
        self.lib = load()
        self.handle = self.lib.nfct_open(_CONNTRACK, 0)
        if not self.handle:
            raise CtnetlinkError(ctypes.get_errno(), "nfct_open failed (needs CAP_NET_ADMIN)")

    def close(self) -> None:
        if self.handle:
            self.lib.nfct_close(self.handle)
            self.handle = None

    def flush(self, networks: Iterable[Network]) -> int:
        """Delete every entry whose original source lies in ``networks``; returns how many."""
        index = NetworkIndex(networks)
        lib, kept = self.lib, []

        def on_entry(_kind: int, ct: int, _data: int) -> int:
            family = lib.nfct_get_attr_u8(ct, _ATTR_ORIG_L3PROTO)
            if family == socket.AF_INET:
                raw = lib.nfct_get_attr_u32(ct, _ATTR_ORIG_IPV4_SRC)  # network byte order
                address, version = int.from_bytes(struct.pack("=I", raw), "big"), 4
            elif family == socket.AF_INET6:
                pointer = lib.nfct_get_attr(ct, _ATTR_ORIG_IPV6_SRC)
                if not pointer:
                    return _NFCT_CB_CONTINUE
                address, version = int.from_bytes(ctypes.string_at(pointer, 16), "big"), 6
            else:
                return _NFCT_CB_CONTINUE
            if index.find(version, address) is not None:
                kept.append(lib.nfct_clone(ct))
            return _NFCT_CB_CONTINUE

        callback = _CALLBACK(on_entry)   # referenced until the dump returns
        lib.nfct_callback_register(self.handle, _NFCT_T_ALL, callback, None)
        try:
            family = ctypes.c_uint32(socket.AF_UNSPEC)   # both families, one walk
            if lib.nfct_query(self.handle, _NFCT_Q_DUMP, ctypes.byref(family)) < 0:
                raise CtnetlinkError(ctypes.get_errno(), "conntrack dump failed")
        finally:
            lib.nfct_callback_unregister(self.handle)
        deleted = 0
        try:
            for ct in kept:
                if lib.nfct_query(self.handle, _NFCT_Q_DESTROY, ct) == 0:
                    deleted += 1            # an entry that vanished meanwhile is not an error
        finally:
            for ct in kept:
                lib.nfct_destroy(ct)
        return deleted
