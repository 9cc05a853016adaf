"""The ipset backend's sets: which ones a ``Layout`` asks for, their names, types and sizes, and
how a reconciler element (container, key) is written as an ipset element and read back.

One ``hash:net`` set per reconciler container (``portal4_24`` → ``walled-portal4-24``, elements
``100.64.7.0/24``), so that the own rules can do what the nftables table does (the longest
prefix decides; throttle buckets per prefix, ``--hashlimit-srcmask``), plus per family and kind
a ``list:set`` umbrella (``walled-portal4``: every ``walled-portal4-*``) that rules, ours or the
operator's (``gateway.ipset.rules: external``), match with one ``-m set`` whatever prefix
lengths the list uses. The layout's static sets (``walled-allow4``, resolvers, NTP servers), the
timeout sets (``walled-noticeack4-24``, ``walled-portalcaller4``) and the tag set (``walled-layouttag``,
``layout.TAG_SET``: the layout tag and the digest mark, as in the nftables table) complete it.

Sizes. ``maxelem`` is what a set may ever hold; the kernel's default, 65,536, is a trap at 100k
subscribers. Each set is created with ``capacity(n)``: twice its elements, at least 65,536, and
grown (a bigger set filled and swapped in, ``IpsetDataplane``) when a diff would pass it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model import Mode
from .layout import (
    CALLER_SET,
    CALLER_TIMEOUT,
    HOST_ALLOW,
    SENTINELS,
    TAG_SET,
    Layout,
    _collapsed,
    ack_set,
    redirect_set,
    sentinel_family,
    tag_address,
    throttle_set,
)

#: Every set of ours starts with this (ipset names are one namespace for the whole network
#: namespace; ``ipset list -n | grep ^walled-`` shows ours). Temporary sets of a full sync: ``TEMP``.
PREFIX = "walled-"
TEMP = "walledtmp-"
#: The smallest ``maxelem`` we create (the kernel's default).
MIN_CAPACITY = 65536
#: ``list:set`` umbrellas hold one member per prefix length in use: IPv6 has 129 (/0 to /128), and
#: a smaller umbrella makes every full sync of a list using more lengths fail.
UMBRELLA_SIZE = 129
#: The kinds with an umbrella per family (``walled-portal4``, ...), in the order rules test them.
UMBRELLA_KINDS = ("portal", "throttle", "notice", "noticeack")
_CALLER_SECONDS = 15 * 60
_PER_PREFIX = re.compile(r"^(portal|notice|throttle|noticeack)([46])_(\d+)$")
_PER_PREFIX_NAME = re.compile(r"^(portal|notice|throttle|noticeack)([46])-(0|[1-9][0-9]{0,2})$")
#: The sets of ours that are neither per prefix length nor umbrellas, without ``PREFIX``.
_FIXED = frozenset({*(f"{kind}{version}" for kind in ("allow", "dns", "ntp") for version in (4, 6)),
                    *HOST_ALLOW.values(), *CALLER_SET.values(), TAG_SET})


def set_name(container: str) -> str:
    """The ipset of a reconciler container (``portal4_24`` → ``walled-portal4-24``)."""
    return PREFIX + container.replace("_", "-")


def container_of(name: str) -> str | None:
    """``set_name``'s inverse for our sets (``walled-portal4-24`` → ``portal4_24``); None for others."""
    if not name.startswith(PREFIX):
        return None
    return name[len(PREFIX):].replace("-", "_")


def umbrella(kind: str, version: int) -> str:
    return f"{PREFIX}{kind}{version}"


def temporary(name: str) -> str:
    """The temporary set a full sync (or a growth) fills for our set ``name`` before swapping it in."""
    return TEMP + name[len(PREFIX):]


def per_prefix(name: str) -> tuple[str, int, int] | None:
    """(kind, version, prefix length) of a per-prefix set's name (``walled-portal4-24``), None for
    any other name (a length the family does not have included)."""
    if not name.startswith(PREFIX):
        return None
    match = _PER_PREFIX_NAME.match(name[len(PREFIX):])
    if match is None or int(match.group(3)) > (32 if match.group(2) == "4" else 128):
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def is_umbrella(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX):-1] in UMBRELLA_KINDS and name[-1] in "46"


def ours(name: str) -> bool:
    """Is ``name`` one that ``specs`` can generate (a per-prefix set, an umbrella, a static set)?
    Only such a set is read as ours, and only such a set (or its ``temporary``) is ever destroyed:
    ``walled-`` alone is a prefix someone else may use too (``wg-`` was WireGuard's)."""
    return (name.startswith(PREFIX) and name[len(PREFIX):] in _FIXED) or is_umbrella(name) \
        or per_prefix(name) is not None


def ours_temporary(name: str) -> bool:
    """Is ``name`` the ``temporary`` of one of ``ours``?"""
    return name.startswith(TEMP) and ours(PREFIX + name[len(TEMP):])


def prefix_of(container: str) -> tuple[int, int] | None:
    """(version, prefix length) of a per-prefix container, None for the others."""
    match = _PER_PREFIX.match(container)
    return (int(match.group(2)), int(match.group(3))) if match else None


def element(container: str, key: str) -> str:
    """The ipset element of a reconciler key: ``100.64.7.0`` in ``portal4_24`` → ``100.64.7.0/24``."""
    where = prefix_of(container)
    if where is None or where[1] == (32 if where[0] == 4 else 128):
        return key
    return f"{key}/{where[1]}"


def key_of(container: str, text: str) -> str:
    """The reconciler key of an element as ``ipset save`` lists it (its inverse of ``element``).
    A key of another length than the set's (someone else's ``ipset add``) keeps its ``/len``, so it
    reads as an unexpected element, never as ours."""
    where = prefix_of(container)
    if where is None:
        return text
    address, _, length = text.partition("/")
    full = 32 if where[0] == 4 else 128
    return address if int(length or full) == where[1] else text


def capacity(elements: int) -> int:
    """``maxelem`` for a set about to hold ``elements``: room to double, never below the default."""
    return max(MIN_CAPACITY, 1 << (2 * (elements + 1) - 1).bit_length())


def hashsize(elements: int) -> int:
    """The initial hash size: about two elements a bucket, so a cold load does not resize."""
    return max(1024, 1 << max(elements // 2, 1).bit_length())


@dataclass(frozen=True)
class SetSpec:
    """One set of the layout: ``create`` options beyond the size, and its fixed elements."""

    container: str            # the reconciler's name (``portal4_24``), or ours for static sets
    kind: str                 # "hash:net", "hash:ip", "list:set"
    family: int               # 4 or 6 (0 for a list:set)
    timeout: int | None = None     # None: no timeout; 0: per-element timeouts
    static: tuple[str, ...] = ()   # elements the layout itself puts in (sentinel, tag, allow)
    max_size: int | None = None    # a fixed maxelem (the caller sets)

    @property
    def name(self) -> str:
        return set_name(self.container)

    def create(self, name: str, elements: int) -> str:
        """The ``ipset restore`` line that creates this set under ``name`` for ``elements``."""
        if self.kind == "list:set":
            return f"create {name} list:set size {UMBRELLA_SIZE}"
        size = self.max_size or capacity(elements)
        options = f" timeout {self.timeout}" if self.timeout is not None else ""
        family = "inet" if self.family == 4 else "inet6"
        return (f"create {name} {self.kind} family {family} hashsize {hashsize(elements)} maxelem {size}"
                f"{options}")


def specs(layout: Layout) -> dict[str, SetSpec]:
    """Every set the layout asks for, by ipset name; umbrellas last (their members exist first)."""
    if layout.dns_port is not None:
        raise ValueError("the ipset backend does not support walled_garden.dns: gateway")
    out: dict[str, SetSpec] = {}

    def add(spec: SetSpec) -> None:
        out[spec.name] = spec

    for version, plen in sorted(layout.prefixes):
        sentinel = (SENTINELS[version],)
        for container in (redirect_set(version, plen), redirect_set(version, plen, Mode.NOTICE),
                          throttle_set(version, plen)):
            add(SetSpec(container, "hash:net", version, static=sentinel))
        add(SetSpec(ack_set(version, plen), "hash:net", version, timeout=0))
    for version in (4, 6):
        add(SetSpec(HOST_ALLOW[version], "hash:net", version, static=(SENTINELS[version],)))
        add(SetSpec(f"allow{version}", "hash:net", version,
                    static=tuple(str(n) for n in _collapsed(layout.allow, version))))
        add(SetSpec(CALLER_SET[version], "hash:ip", version, timeout=_CALLER_SECONDS, max_size=1 << 20))
        for kind, servers in (("dns", layout.dns), ("ntp", layout.ntp)):
            if servers is not None:
                add(SetSpec(f"{kind}{version}", "hash:ip", version,
                            static=tuple(str(a) for a in servers if a.version == version)))
    add(SetSpec(TAG_SET, "hash:ip", 6, static=(tag_address(layout.tag),)))
    for version in (4, 6):
        for kind in UMBRELLA_KINDS:
            out[umbrella(kind, version)] = SetSpec(f"{kind}{version}", "list:set", 0)
    return out


def members(layout: Layout, kind: str, version: int) -> list[str]:
    """The per-prefix sets an umbrella holds, longest prefix first."""
    plens = sorted((p for v, p in layout.prefixes if v == version), reverse=True)
    return [set_name(f"{kind}{version}_{plen}") for plen in plens]


def sentinel_of(container: str) -> str:
    return SENTINELS[sentinel_family(container)]


assert CALLER_TIMEOUT == "15m", "_CALLER_SECONDS follows layout.CALLER_TIMEOUT"
