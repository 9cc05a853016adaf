"""What one table holds: its layout tag and the elements of each container; and the digest of
the subscriber sets' elements that the table carries along (``digest_mark``)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: The elements of timeout sets with their expiry: set → key → (timeout, seconds left), whole
#: seconds, the time left rounded down (``Dataplane.read_timeouts``).
Expiring = dict[str, dict[str, tuple[int, int]]]


@dataclass
class TableState:
    """``elements`` never include the layout's sentinel (``layout.SENTINELS``); ``sealed`` names
    the sets that still hold theirs. A set missing from ``sealed`` was flushed (or created by
    someone else) since the layout created it, so its contents cannot be trusted as a diff base.
    ``expiring``: for the sets a replace carries over (``layout.carried_set``) only, their
    elements' expiry as the listing gave it (a replace reuses it instead of reading again); not
    compared: two readings of one table differ in it by the time between them."""

    layout_tag: str | None
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)
    expiring: Expiring = field(default_factory=dict, compare=False)

    def copy(self) -> TableState:
        return TableState(self.layout_tag, {name: dict(items) for name, items in self.elements.items()},
                          set(self.sealed), {name: dict(items) for name, items in self.expiring.items()})


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


#: The comment the layout tag's element of ``layouttag`` carries once the structure fingerprint
#: is known (``transaction.MarkStructure``), followed by the 16 hex digits of ``Structure.fingerprint``.
STRUCTURE_COMMENT = "walled-garden structure "


@dataclass(frozen=True)
class Structure:
    """What the table is made of, apart from the elements the daemon, the kernel and the DNS
    forwarder change: its flags, chains (hook, priority, policy) and their rules in order, the
    sets' and maps' declarations, the elements of the sets the layout fills itself (anonymous
    sets, ``allow``/``dns``/``ntp``) and named objects (``dataplane.Dataplane.structure``).

    ``fingerprint`` is a digest of it all ("" from a backend with nothing to fingerprint);
    ``parts`` the digest of each part (``table``, ``chain forward``, ``set allow4``, ...) and
    ``rules`` each chain's number of rules, so two readings can say what differs (``describe``);
    ``dormant`` the table's ``dormant`` flag (no hook sees a packet); ``marked`` the fingerprint
    the table carries from our own install (``STRUCTURE_COMMENT``), "" when none."""

    fingerprint: str
    parts: Mapping[str, str] = field(default_factory=dict)
    rules: Mapping[str, int] = field(default_factory=dict)
    dormant: bool = False
    marked: str = ""


def fingerprint(parts: Mapping[str, str]) -> str:
    """16 hex digits over every part's name and digest, independent of their order."""
    text = "\n".join(f"{name} {value}" for name, value in sorted(parts.items()))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def marked_fingerprint(comment: str | None) -> str:
    """The fingerprint a ``STRUCTURE_COMMENT`` carries; "" for anything else."""
    if comment is None or not comment.startswith(STRUCTURE_COMMENT):
        return ""
    value = comment[len(STRUCTURE_COMMENT):].strip()
    return value if len(value) == 16 and all(c in "0123456789abcdef" for c in value) else ""


def describe(reference: Structure | None, now: Structure, expected: str = "") -> str:
    """What differs between the structure we left (``reference``; None: only its fingerprint
    ``expected`` is known, e.g. from the table's mark at a start) and ``now``, in a line."""
    problems: list[str] = []
    if now.dormant and (reference is None or not reference.dormant):
        problems.append("table made dormant (no hook of it sees a packet)")
    if reference is None:
        if not problems:
            problems.append(f"fingerprint {now.fingerprint} instead of {expected or now.marked}: "
                            "rules, chains, sets or flags changed")
        return "; ".join(problems)
    if not problems and reference.parts.get("table") != now.parts.get("table"):
        problems.append("table flags or comment changed")
    anonymous: list[str] = []
    for name in sorted(reference.parts.keys() | now.parts.keys()):
        if name == "table" or reference.parts.get(name) == now.parts.get(name):
            continue
        where = anonymous if name.startswith("set __") else problems
        kind, _, label = name.partition(" ")
        if name not in now.parts:
            where.append(f"{name} deleted")
        elif name not in reference.parts:
            where.append(f"{name} added")
        elif kind == "chain" and reference.rules.get(label) != now.rules.get(label):
            where.append(f"{name}: {now.rules.get(label, 0)} rule(s) instead of {reference.rules.get(label, 0)}")
        else:
            where.append(f"{name} changed")
    problems += anonymous if not problems else []   # a rule's anonymous set goes with the rule
    return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
