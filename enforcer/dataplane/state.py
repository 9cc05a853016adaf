"""What one table holds: its layout tag and the elements of each container; and the digest of
the subscriber sets' elements that the table carries along (``digest_mark``)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class TableState:
    """``elements`` never include the layout's sentinel (``layout.SENTINELS``); ``sealed`` names
    the sets that still hold theirs. A set missing from ``sealed`` was flushed (or created by
    someone else) since the layout created it, so its contents cannot be trusted as a diff base."""

    layout_tag: str | None
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)

    def copy(self) -> TableState:
        return TableState(self.layout_tag, {name: dict(items) for name, items in self.elements.items()},
                          set(self.sealed))


def element_hash(container: str, key: str) -> int:
    """A 64-bit hash of one element, the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(f"{container} {key}".encode(), digest_size=8).digest(), "little")


def digest(elements: Mapping[str, Iterable[str]], containers: Iterable[str]) -> int:
    """The XOR of ``element_hash`` over the keys of ``containers``: independent of order, and one
    XOR per element added or deleted keeps it up to date (``Reconciler._apply``)."""
    out = 0
    for name in containers:
        for key in elements.get(name, ()):
            out ^= element_hash(name, key)
    return out


def digest_mark(value: int, generation: int) -> str:
    """The digest as an element of the layout's ``layouttag`` set (an IPv6 address): 32 bits of
    1 (so it is never the layout tag's own element, ``layout.tag_address``, whose upper 64 bits
    are 0), the ruleset generation the transaction writing it commits as (32 bits), the digest
    (64 bits); written as nft lists it (``inet_ntop``)."""
    packed = ((1 << 96) | ((generation & 0xFFFFFFFF) << 64) | value).to_bytes(16, "big")
    return socket.inet_ntop(socket.AF_INET6, packed)


def mark_digest(mark: str) -> int | None:
    """The digest a ``digest_mark`` carries; None for anything else."""
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, mark), "big")
    except OSError:
        return None
    return value & 0xFFFFFFFFFFFFFFFF if value >> 96 == 1 else None
