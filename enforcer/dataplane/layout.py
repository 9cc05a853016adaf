"""The shape of our one nftables table: chains, sets, maps and the rules that use them.

Subscriber addresses live in hash sets keyed by address, one set per (mode, family, prefix
length), looked up with a mask for prefixes; interval sets are avoided because deleting
from large ones is slow (docs/reference.md, Dataplane). A walled-garden address is one element of ``portalV_L``,
a notice address one of ``noticeV_L``, a throttled one of ``noticeV_L`` and ``throttleV_L``:
the forward hook sends members to their mode's chain, the nat hook sends their plain HTTP
to the portal, and the throttle set also lets the download be rate-limited by destination
(the upload is limited in the ``throttle`` chain). Not verdict maps: every transaction that
adds a ``goto`` element to a verdict map makes the kernel re-validate the whole map
(measured at 100k elements: 6.3 ms for one added element through libnftables against 0.05 ms for a
plain set, 32 ms per update through `nft -f`; docs/benchmarks.md), an O(n) walk on
every payment. Everything the layout renders is derived from config, so a
``tag`` of the rendered text tells whether the kernel already holds this exact layout.

The gateway itself (docs/reference.md, Safety rules 7). Every subscriber, restricted or not, that connects to one
of the gateway's own addresses (``fib daddr type local``) on TCP 80 is redirected to the portal
listener, and on TCP 443 to the portal's TLS listener when ``portal.tls`` is set: ``portal.url``
and ``/api/captive`` answer free subscribers too, and the portal never needs port 80 itself. A
port the listener already has (``portal.listen`` on 80) is left alone rather than redirected.
``redirect`` sends the connection to the primary address of the interface it came in on, so the
portal listens on ``0.0.0.0`` (or that address). Then:

* the ``portal`` prerouting hook (before nat) marks every connection from a subscriber
  interface to one of the gateway's own addresses on the portal's ports (80, 443, the
  listeners') with the conntrack mark bit ``PORTAL_CT_MARK`` (the conntrack flush spares those
  entries, so the answer to "I promise to pay" survives the lift; operators must not use that
  bit of ``ct mark``), and records the source address in ``portalcallerV`` (a timeout set,
  ``CALLER_TIMEOUT``), so the daemon can check that an address asking for a promise really
  called the portal recently. Redirected HTTP to other sites is not marked: the lift flushes it;
* the ``input`` hook sends packets whose source is a restricted subscriber (any ``portal``/``notice``
  set; throttle keys are in ``notice`` too) to the ``local`` chain, where only the portal ports,
  DNS (UDP/TCP 53), established/related traffic and the network-essential DHCP (UDP 67/68,
  546/547) and ICMP/ICMPv6 (neighbour discovery, router solicitation, echo) pass, and NTP
  (UDP 123: a device with a wrong clock cannot check the portal's or a payment site's
  certificate); everything else gets a TCP reset or ICMP admin-prohibited and counts in
  ``refused_local``. Free subscribers never enter that chain for their own addresses; but every
  host on a subscriber interface also has an IPv6 link-local address (``fe80::/10``) in no set,
  which would reach a service listening on ``::`` (the webhook listener, metrics, SSH) even from
  a restricted subscriber: with ``gateway.subscriber_interfaces`` set, link-local TCP and UDP
  from those interfaces goes to ``local`` too, whoever sends it (no subscriber needs more of the
  gateway). Only TCP and UDP: VRRP and OSPFv3 from a peer on that link are their own protocols
  and pass; a TCP/UDP protocol a peer opens towards the gateway from its link-local address
  (BGP unnumbered, BFD) does not, while one the gateway opens does (established).

Drift (docs/reference.md, Safety rules 8). Every reconciled set is created holding one sentinel
element (``SENTINELS``: 255.255.255.255 and ffff:...:ffff, limited broadcast and reserved
multicast, never a subscriber address nor a source of a forwarded packet, and with host bits set
so a masked lookup never matches it), added in the batch that creates the table. The sentinel is
part of the layout, not of the reconciled elements: a ``flush set`` by another tool removes it,
and one cheap ``get element`` batch per check notices; the same batch asks for the layout tag as
an element of ``layouttag`` (``TAG_SET``).

Restart (issue 16). ``layouttag`` also holds the reconciler's digest mark: an IPv6 address whose
upper 32 bits are all 1 (never a tag), carrying a 64-bit digest of the subscriber sets' elements
and the ruleset generation our transaction commits as (``state.digest_mark``). A start whose
saved decisions give the same digest, at the same generation, trusts the table instead of
reading 125k elements back (``reconciler``). The tag's own element carries, as its comment, the
fingerprint of the table's structure as our install left it (``state.Structure``: flags,
chains, rules, set declarations, ``static_sets``' elements): a rule deleted or the table made
``dormant`` frees subscribers while every element is in place, so the table check and every
start compare the structure too (``reconciler``'s docstring says against what, and why).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property

from ..model import DEFAULT_THROTTLE_RATE, Mode, Network, default_throttle_burst
from .state import TableState

#: Prefix lengths kept ready even when no subscriber uses them yet, so the common cases never
#: need a layout change (which costs a full sync).
STANDARD_PREFIXES: frozenset[tuple[int, int]] = frozenset({(4, 32), (6, 128), (6, 64), (6, 56)})

#: The chain each restricting mode jumps to from the forward hook.
MODE_CHAINS: dict[Mode, str] = {
    Mode.WALLED_GARDEN: "garden",
    Mode.NOTICE: "notice",
    Mode.THROTTLE: "throttle",
}

#: How the reconciler's per-prefix "mode view" records each mode. The view (``modeV_L`` →
#: key → verdict) is bookkeeping only: who holds a key and in which mode; the kernel holds
#: the same facts as set membership (``containers``).
MODE_VERDICTS: dict[Mode, str] = {mode: f"goto {chain}" for mode, chain in MODE_CHAINS.items()}

_ICMP4_ERRORS = "destination-unreachable, time-exceeded, parameter-problem"
_ICMP6_ERRORS = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"


MODE_PREFIX = "mode"


def sentinel_family(container: str) -> int:
    """4 or 6: the address family of a reconciled set (``portal4_16`` → 4, ``allowhost6`` → 6)."""
    match = re.search(r"([46])(?:_\d+)?$", container)
    if match is None:
        raise ValueError(f"{container!r} is not a reconciled set of the layout")
    return int(match.group(1))


def mode_map(version: int, prefixlen: int) -> str:
    """The name of the reconciler's mode view for one prefix length (not a kernel object)."""
    return f"{MODE_PREFIX}{version}_{prefixlen}"


def mode_prefix(container: str) -> tuple[int, int]:
    """(version, prefix length) of a mode view's name (``mode4_32`` → (4, 32)): ``mode_map`` undone."""
    version, plen = container[len(MODE_PREFIX):].split("_")
    return int(version), int(plen)


def redirect_set(version: int, prefixlen: int, mode: Mode = Mode.WALLED_GARDEN) -> str:
    """Where an address goes so its plain HTTP lands on the portal.

    Walled-garden subscribers are always redirected; notice and throttle subscribers only until
    they acknowledge the notice (an element in the ``ack_set``, which expires by itself).
    """
    kind = "portal" if mode is Mode.WALLED_GARDEN else "notice"
    return f"{kind}{version}_{prefixlen}"


def ack_set(version: int, prefixlen: int) -> str:
    return f"noticeack{version}_{prefixlen}"


def throttle_set(version: int, prefixlen: int) -> str:
    """Addresses in throttle mode, so packets *to* them can be rate-limited (matched by daddr)."""
    return f"throttle{version}_{prefixlen}"


@functools.cache
def placements(version: int, prefixlen: int, mode: Mode) -> tuple[tuple[str, str | None], ...]:
    """Where a restricted key of this family and prefix length goes in ``mode``, as (container,
    value) pairs: the mode view with its verdict, the redirect set, and the throttle set for
    throttle. The one mapping from a decision to elements; ``with_mode_view`` is its inverse."""
    out: list[tuple[str, str | None]] = [(mode_map(version, prefixlen), MODE_VERDICTS[mode]),
                                         (redirect_set(version, prefixlen, mode), None)]
    if mode is Mode.THROTTLE:
        out.append((throttle_set(version, prefixlen), None))
    return tuple(out)


def throttle_meter(version: int, prefixlen: int, direction: str) -> str:
    """The dynamic set holding one token bucket per throttled key, ``direction`` up or down.

    The kernel fills it from the packet path; the reconciler never touches it.
    """
    return f"thr{direction}{version}_{prefixlen}"


#: Most keys a throttle meter holds per prefix length; a key beyond it would go unlimited
#: (the kernel cannot add its bucket), so this is far above any gateway's subscriber count.
THROTTLE_METER_SIZE = 1 << 20
#: An idle subscriber's bucket is dropped after this; it is full again by then anyway.
THROTTLE_METER_TIMEOUT = "1m"


HOST_ALLOW = {4: "allowhost4", 6: "allowhost6"}

#: ``dns: gateway``: addresses the DNS forwarder learnt from answers for allowed names, per family
#: (``timeout`` sets the forwarder process fills and the kernel empties; never reconciled).
DNS_GARDEN_SETS = {4: "dnsgarden4", 6: "dnsgarden6"}
#: The ``ct mark`` bit on connections a restricted subscriber opened to a DNS-learnt address, so
#: they outlive the address's timeout (a payment in progress is not cut when the TTL runs out).
#: Reserved like ``PORTAL_CT_MARK``.
GARDEN_CT_MARK = 0x00200000

#: The ``ct mark`` bit set on every connection from a subscriber interface to the portal's ports.
#: The conntrack flush spares connections carrying it, so a lift never cuts the portal's answer.
#: Reserved: operators' own rules must not set or clear this bit of ``ct mark``.
PORTAL_CT_MARK = 0x00400000

#: Timeout sets of source addresses that recently connected to the portal's ports (per family).
CALLER_SET = {4: "portalcaller4", 6: "portalcaller6"}
#: How long a caller stays in ``CALLER_SET`` after its last packet to the portal.
CALLER_TIMEOUT = "15m"

#: The most elements a replace carries over from each of ``CALLER_SET`` (``Layout.carried_sets``).
CARRIED_CALLERS = 65_536

_CARRIED = re.compile(r"^(?:portalcaller[46]|dnsgarden[46])$")


def carried_set(name: str) -> bool:
    """Is ``name`` one of the sets ``Layout.carried_sets`` names, in some layout? (A listing keeps
    the expiry of these sets' elements only: not of the throttle meters, up to a million.)"""
    return _CARRIED.match(name) is not None


#: The element every reconciled set holds from its creation on (see the module docstring); it is
#: never mirrored, diffed or read back as an element: ``TableState.sealed`` says where it is.
SENTINELS = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}

#: The table's named counters (``walled_garden_kernel_packets_total{counter}``): ``redirected``
#: restricted HTTP sent to the portal, ``refused_tcp``/``refused_other`` refused in the garden
#: chain, ``refused_local`` a restricted subscriber's packets to the gateway itself refused.
COUNTERS = ("redirected", "refused_tcp", "refused_other", "refused_local")

#: A set holding the layout tag as one element (``tag_address``): asking the kernel for that one
#: element costs ~0.2 ms whatever the table holds, where listing the ``layout`` chain makes nft
#: 1.0.6 load every set's elements first (~0.8 s at 100k subscribers, docs/benchmarks.md).
TAG_SET = "layouttag"


def tag_address(tag: str) -> str:
    """The layout tag (16 hex digits) as the IPv6 address stored in ``TAG_SET``."""
    return str(ipaddress.IPv6Address(int(tag, 16)))


#: UDP ports of DHCP (v4 server/client) and DHCPv6 (client/server) a restricted subscriber keeps.
DHCP_PORTS = (67, 68, 546, 547)
#: IPv6 link-local sources: no subscriber set holds them (``_input_hook``).
LINK_LOCAL6 = "fe80::/10"


@dataclass(frozen=True)
class Layout:
    """Everything static about the table; two equal layouts render identical text."""

    table: str
    interfaces: tuple[str, ...]
    allow: tuple[Network, ...]
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None
    portal_port: int
    prefixes: frozenset[tuple[int, int]] = STANDARD_PREFIXES
    throttle_rate: int = DEFAULT_THROTTLE_RATE                              # bytes/s per key and direction
    throttle_burst: int = default_throttle_burst(DEFAULT_THROTTLE_RATE)    # bytes
    portal_tls_port: int | None = None       # PortalConfig.tls.listen.port, when portal.tls is set
    dns_port: int | None = None              # dns: gateway: the DNS forwarder's port (see ``_dns_rules``)
    ntp: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None = None   # None: NTP to any host
    dns_garden_size: int = 65536             # dns: gateway: the DNS-learnt sets' size cap, per family

    @property
    def portal_ports(self) -> tuple[int, ...]:
        """The portal's listener ports (plain, then TLS), each once."""
        ports = [self.portal_port]
        if self.portal_tls_port is not None and self.portal_tls_port != self.portal_port:
            ports.append(self.portal_tls_port)
        return tuple(ports)

    def with_prefixes(self, used: set[tuple[int, int]]) -> Layout:
        wanted = STANDARD_PREFIXES | frozenset(used)
        if wanted == self.prefixes:
            return self
        return replace(self, prefixes=wanted)

    def containers(self) -> dict[str, str]:
        """Name → ``"map"`` or ``"set"`` for every element container the reconciler fills."""
        out: dict[str, str] = {}
        for version, plen in sorted(self.prefixes):
            out[redirect_set(version, plen)] = "set"
            out[redirect_set(version, plen, Mode.NOTICE)] = "set"
            out[throttle_set(version, plen)] = "set"
        out[HOST_ALLOW[4]] = "set"
        out[HOST_ALLOW[6]] = "set"
        return out

    def ack_sets(self) -> list[str]:
        """Timeout sets the daemon adds to on request and the kernel empties by itself."""
        return [ack_set(version, plen) for version, plen in sorted(self.prefixes)]

    def carried_sets(self) -> dict[str, int | None]:
        """The timeout sets whose elements only the kernel holds and no one puts back (the
        portal's recent callers, with ``dns: gateway`` the DNS-learnt addresses), by name, with
        the most elements a replace carries into each (None: no limit). A replace of the table
        carries their elements over (``reconciler.Reconciler._carry``), as a restart without a
        replace keeps them.

        The callers: at most ``CARRIED_CALLERS`` per family (those with the most time left),
        although the sets take ``THROTTLE_METER_SIZE``: anyone can fill them with spoofed SYNs
        (docs/security.md), and every carried element costs a replace ~3.5 µs (a repair too,
        while the flushed set's subscribers are free); a gateway's real callers within 15
        minutes are far fewer. The DNS-learnt addresses: as many as the set takes (its ``size``
        less the forwarder's marker), the forwarder's own bound.

        Not the notice acknowledgements: they belong to a subscriber, not to an address, and
        after a replace ``PortalActions._reacknowledge`` (``Engine.on_replaced``) puts back
        those still due, at their subscribers' addresses now; carried by address, one would go
        to whoever holds the address now, or outlive a subscriber no longer in notice. Nor
        the throttle meters: token buckets, full again within their timeout anyway."""
        out: dict[str, int | None] = dict.fromkeys(CALLER_SET.values(), CARRIED_CALLERS)
        if self.dns_port is not None:
            out.update(dict.fromkeys(DNS_GARDEN_SETS.values(), max(0, self.dns_garden_size - 1)))
        return out

    @cached_property
    def tag(self) -> str:
        return hashlib.sha256(self._body.encode()).hexdigest()[:16]

    def render(self) -> str:
        """The table as ``nft -f`` text, without subscriber elements."""
        tag_element = f"add element inet {self.table} {TAG_SET} {{ {tag_address(self.tag)} }}\n"
        return self._body.replace("@@TAG@@", self.tag) + tag_element

    @cached_property
    def _body(self) -> str:
        lines = [f"table inet {self.table} {{",
                 '\tcomment "managed by walled-garden; do not edit: changes are overwritten"']
        for version, plen in sorted(self.prefixes):
            addr = "ipv4_addr" if version == 4 else "ipv6_addr"
            lines.append(f"\tset {redirect_set(version, plen)} {{ type {addr}; }}")
            lines.append(f"\tset {redirect_set(version, plen, Mode.NOTICE)} {{ type {addr}; }}")
            lines.append(f"\tset {ack_set(version, plen)} {{ type {addr}; flags timeout; }}")
            lines.append(f"\tset {throttle_set(version, plen)} {{ type {addr}; }}")
            for direction in ("up", "down"):
                lines.append(f"\tset {throttle_meter(version, plen, direction)} {{ type {addr}; "
                             f"size {THROTTLE_METER_SIZE}; flags dynamic,timeout; timeout {THROTTLE_METER_TIMEOUT}; }}")
        for version in (4, 6):
            addr = "ipv4_addr" if version == 4 else "ipv6_addr"
            # Overlapping CIDRs would make nft reject the whole interval set: merge them first.
            nets = ", ".join(str(n) for n in _collapsed(self.allow, version))
            elements = f" elements = {{ {nets} }};" if nets else ""
            lines.append(f"\tset allow{version} {{ type {addr}; flags interval;{elements} }}")
            lines.append(f"\tset {HOST_ALLOW[version]} {{ type {addr}; }}")
            lines.append(f"\tset {CALLER_SET[version]} {{ type {addr}; size {THROTTLE_METER_SIZE}; "
                         f"flags dynamic,timeout; timeout {CALLER_TIMEOUT}; }}")
            for name, servers in self._server_sets():
                if servers is not None:
                    listed = ", ".join(str(a) for a in servers if a.version == version)
                    elements = f" elements = {{ {listed} }};" if listed else ""
                    lines.append(f"\tset {name}{version} {{ type {addr};{elements} }}")
            if self.dns_port is not None:   # created empty: the forwarder fills it (and its marker)
                lines.append(f"\tset {DNS_GARDEN_SETS[version]} {{ type {addr}; size {self.dns_garden_size}; "
                             "flags timeout; }")
        lines.append(f"\tset {TAG_SET} {{ type ipv6_addr; }}")
        lines += self._garden_chain() + self._open_chains() + self._hooks() + self._local_chain() + self._input_hook()
        lines.append("\tchain layout {")
        lines.append('\t\tcounter comment "walled-garden layout @@TAG@@"')
        lines.append("\t}")
        lines.append("}")
        # Each reconciled set's sentinel, in the same batch as the table (see the module docstring).
        for name in self.containers():
            lines.append(f"add element inet {self.table} {name} {{ {SENTINELS[sentinel_family(name)]} }}")
        return "\n".join(lines) + "\n"

    def _server_sets(self) -> list[tuple[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None]]:
        """The ``dns``/``ntp`` sets the table has (servers listed: not None), and their servers."""
        return [(name, servers) for name, servers in (("dns", self.dns), ("ntp", self.ntp))
                if not (name == "dns" and self.dns_port is not None)]

    def static_sets(self) -> list[str]:
        """The named sets whose elements the layout renders itself (``allow``, the listed ``dns``
        and ``ntp`` servers): part of the table's structure (``Dataplane.structure``), unlike
        the sets the reconciler, the kernel or the DNS forwarder fill."""
        return [f"{name}{version}" for version in (4, 6)
                for name in ["allow", *(n for n, servers in self._server_sets() if servers is not None)]]

    def garden_sets(self, version: int) -> list[str]:
        """The sets whose addresses a restricted subscriber may reach (never redirected or slowed)."""
        names = [f"allow{version}", HOST_ALLOW[version]]
        if self.dns_port is not None:
            names.append(DNS_GARDEN_SETS[version])
        return names

    def _not_garden(self, version: int, direction: str) -> str:
        """``ip daddr != @allow4 ip daddr != @allowhost4 ...``: the address is outside the garden."""
        field_ = f"{'ip' if version == 4 else 'ip6'} {direction}"
        return "".join(f"{field_} != @{name} " for name in self.garden_sets(version))

    def _garden_accepts(self) -> list[str]:
        """The walled garden's destinations; with ``dns: gateway`` also the DNS-learnt ones, whose
        connections are marked (``GARDEN_CT_MARK``) so they outlive the address's timeout."""
        rules = [f"{'ip' if v == 4 else 'ip6'} daddr @{self.garden_sets(v)[i]} accept" for i in (0, 1) for v in (4, 6)]
        if self.dns_port is not None:
            mark = f"{GARDEN_CT_MARK:#010x}"
            rules.insert(0, f"ct mark & {mark} == {mark} accept")
            rules += [f"{'ip' if v == 4 else 'ip6'} daddr @{DNS_GARDEN_SETS[v]} ct mark set ct mark | {mark} accept"
                      for v in (4, 6)]
        return rules

    def _garden_chain(self) -> list[str]:
        """Walled-garden mode: the allowed few pass, TCP gets a reset, the rest admin-prohibited.

        DNS: with ``dns: any`` port 53 anywhere, with a list only to those resolvers; with ``dns:
        gateway`` none at all (it is redirected to the forwarder before it gets here). NTP: to any
        host, or only to ``walled_garden.ntp``.
        """
        rules = self._garden_accepts()
        if self.dns is None:
            rules.append("meta l4proto { tcp, udp } th dport 53 accept")
        elif self.dns_port is None:
            rules.append("ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept")
            rules.append("ip6 daddr @dns6 meta l4proto { tcp, udp } th dport 53 accept")
        if self.ntp is None:
            rules.append("udp dport 123 accept")
        else:
            rules += ["ip daddr @ntp4 udp dport 123 accept", "ip6 daddr @ntp6 udp dport 123 accept"]
        rules += [f"icmp type {{ {_ICMP4_ERRORS} }} accept",
                  f"icmpv6 type {{ {_ICMP6_ERRORS} }} accept",
                  'meta l4proto tcp counter name "refused_tcp" reject with tcp reset',
                  'counter name "refused_other" reject with icmpx admin-prohibited']
        return ["\tcounter refused_tcp { }", "\tcounter refused_other { }", "\tcounter redirected { }",
                "\tchain garden {"] + [f"\t\t{r}" for r in rules] + ["\t}"]

    def _open_chains(self) -> list[str]:
        """Notice leaves forwarding open; throttle too, but rate-limits the upload (see below)."""
        return ["\tchain notice {", "\t}", "\tchain throttle {"] + [f"\t\t{r}" for r in self._throttle_up()] + ["\t}"]

    def _limit(self) -> str:
        return f"limit rate over {self.throttle_rate} bytes/second burst {self.throttle_burst} bytes"

    def _throttle_up(self) -> list[str]:
        """Upload: one token bucket per subscriber key, above the rate packets are dropped.

        The forward hook jumps here when the source's longest matching entry is throttle, so
        the first throttle set that holds the source (longest prefix first) is that entry;
        ``accept`` then keeps a shorter throttled prefix of someone else from counting it too.
        Walled-garden destinations (how to pay) are never slowed.
        """
        rules = [f"{'ip' if v == 4 else 'ip6'} daddr @{self.garden_sets(v)[i]} accept"
                 for i in range(len(self.garden_sets(4))) for v in (4, 6)]
        for version, plen, shorter in self._longest_first():
            key = _masked(version, plen, "saddr")
            rules.append(f"{key} @{throttle_set(version, plen)} update @{throttle_meter(version, plen, 'up')} "
                         f"{{ {key} {self._limit()} }} drop")
            if shorter:
                rules.append(f"{key} @{throttle_set(version, plen)} accept")
        return rules

    def _iif(self) -> str:
        if not self.interfaces:
            return ""
        return "iifname { " + ", ".join(f'"{name}"' for name in self.interfaces) + " } "

    def _ports(self) -> str:
        ports = self.portal_ports
        return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(str(p) for p in ports) + " }"

    def _local_chain(self) -> list[str]:
        """What a restricted subscriber may reach on the gateway itself (see the module docstring)."""
        rules = ["ct state established,related accept",
                 f"tcp dport {self._ports()} accept",
                 "meta l4proto { tcp, udp } th dport 53 accept",
                 "udp dport 123 accept"]
        if self.dns_port is not None:   # redirected DNS, after the nat hook changed its port
            rules.append(f"meta l4proto {{ tcp, udp }} th dport {self.dns_port} accept")
        rules += ["udp dport { " + ", ".join(str(p) for p in DHCP_PORTS) + " } accept",
                  "meta l4proto { icmp, ipv6-icmp } accept",
                  'meta l4proto tcp counter name "refused_local" reject with tcp reset',
                  'counter name "refused_local" reject with icmpx admin-prohibited']
        return (["\tcounter refused_local { }", "\tchain local {"] + [f"\t\t{r}" for r in rules] + ["\t}"])

    def _portal_rules(self) -> tuple[str, list[str]]:
        """Connections to the portal *at the gateway's own addresses*: mark them, remember the caller.

        The first rules of the nat ``prerouting`` chain, which sees only a connection's first
        packet: the ``ct mark`` lasts as long as the connection, so no later packet needs a look,
        and the paying subscribers' forwarded packets never meet these rules (issue 16). The
        destination is still the one the subscriber chose (the redirects come after): a restricted
        subscriber's HTTP to another site, redirected to the portal, is not marked, so the lift
        flushes it (a browser's spare connection to that site must not land on the portal again
        once they are free); the page's own connection, to ``portal.url``'s host, is kept. The
        caller set is refreshed by every new connection to the portal (a browser opens one per
        page load; ``CALLER_TIMEOUT`` is far longer than it keeps one idle). The mark and the
        caller update are rules of their own: an ``update`` on a full set ends its rule, and the
        mark must be set whatever happens to the caller set. Returns (the nat rule, the
        ``portal_call`` chain's rules).
        """
        ports = sorted({*self.portal_ports, 80, *((443,) if self.portal_tls_port is not None else ())})
        # Cheapest test first: the fib lookup runs only for TCP to these ports.
        listed = ", ".join(str(p) for p in ports)
        portal = f"{self._iif()}tcp dport {{ {listed} }} fib daddr type local jump portal_call"
        rules = [f"ct mark set ct mark or {PORTAL_CT_MARK:#010x}",
                 f"update @{CALLER_SET[4]} {{ ip saddr }}",
                 f"update @{CALLER_SET[6]} {{ ip6 saddr }}"]
        return portal, rules

    def _input_hook(self) -> list[str]:
        """Packets to the gateway itself from restricted subscribers: confined to the ``local`` chain."""
        iif = self._iif()
        rules: list[str] = []
        if self.dns_port is not None:
            # The forwarder answers only queries the nat hook redirected to it: from any interface,
            # loopback included, a packet sent to its port directly is dropped (no open resolver).
            rules.append(f"meta l4proto {{ tcp, udp }} th dport {self.dns_port} ct status & dnat == 0 drop")
        for version, plen in sorted(self.prefixes, key=lambda p: (p[0], -p[1])):
            match = _masked_saddr(version, plen)
            rules.append(f"{iif}{match} @{redirect_set(version, plen)} goto local")
            rules.append(f"{iif}{match} @{redirect_set(version, plen, Mode.NOTICE)} goto local")
        if iif:   # whose a link-local source is, no set can say (see the module docstring)
            rules.append(f"{iif}ip6 saddr {LINK_LOCAL6} meta l4proto {{ tcp, udp }} goto local")
        return (["\tchain input {", "\t\ttype filter hook input priority filter - 10; policy accept;"]
                + [f"\t\t{r}" for r in rules] + ["\t}"])

    def _download_rules(self) -> dict[int, list[str]]:
        """Download: packets *to* a throttled key (the ``to_subscriber`` chain, per family).

        Jumped to from the ``forward`` hook before ``from_subscriber``; its rules only ``drop``
        or ``return`` (never ``accept``, which would end the base chain), so it can never let a
        restricted subscriber's own packets skip the mode sets. Longest prefix first, and an
        address whose longest entry is another mode (``portal``/``notice`` sets hold every
        restricted key) stops the walk, so it is never limited by a shorter throttled prefix of
        someone else.
        """
        rules: dict[int, list[str]] = {4: [], 6: []}
        for version, plen, shorter in self._longest_first():
            key = _masked(version, plen, "daddr")
            garden = self._not_garden(version, "saddr")
            rules[version].append(f"{key} @{throttle_set(version, plen)} {garden}"
                                  f"update @{throttle_meter(version, plen, 'down')} {{ {key} {self._limit()} }} drop")
            if shorter:
                rules[version].append(f"{key} @{redirect_set(version, plen, Mode.NOTICE)} return")
                rules[version].append(f"{key} @{redirect_set(version, plen)} return")
        return rules

    def _longest_first(self) -> list[tuple[int, int, bool]]:
        """(version, prefix length, whether a shorter prefix of the family follows), longest first."""
        ordered = sorted(self.prefixes, key=lambda p: (p[0], -p[1]))
        return [(v, plen, i + 1 < len(ordered) and ordered[i + 1][0] == v) for i, (v, plen) in enumerate(ordered)]

    def _hooks(self) -> list[str]:
        """The ``forward`` hook (one base chain, issue 16) and the nat ``prerouting`` hook.

        ``forward`` tests the interface once per direction and jumps to a regular chain per
        direction: ``to_subscriber`` (download limits) first, because it only drops or returns,
        then ``from_subscriber``, where the longest matching prefix's mode set decides the mode
        chain. A paying subscriber's IPv4 packet meets two interface tests, the IPv4 sets and a
        ``return``; the portal marking (``_portal_rules``) and every redirect live in the nat
        hook, which sees a connection's first packet only.
        """
        iif = self._iif()
        oif = iif.replace("iifname", "oifname", 1)
        forward: dict[int, list[str]] = {4: [], 6: []}
        portal, portal_call = self._portal_rules()
        nat: list[str] = [portal]
        # The gateway's own addresses: every subscriber reaches the portal at the advertised ports.
        for advertised, listener in ((80, self.portal_port), (443, self.portal_tls_port)):
            if listener is not None and listener != advertised:
                nat.append(f"{iif}tcp dport {advertised} fib daddr type local redirect to :{listener}")
        # Longest prefix first so the most specific entry decides.
        for version, plen, shorter in self._longest_first():
            match = _masked_saddr(version, plen)
            # Membership decides the chain; throttle keys are in the notice set too, so first.
            forward[version].append(f"{match} @{redirect_set(version, plen)} goto {MODE_CHAINS[Mode.WALLED_GARDEN]}")
            forward[version].append(f"{match} @{throttle_set(version, plen)} goto {MODE_CHAINS[Mode.THROTTLE]}")
            if shorter:   # notice leaves forwarding open: it only has to stop the walk to shorter prefixes
                forward[version].append(f"{match} @{redirect_set(version, plen, Mode.NOTICE)} "
                                        f"goto {MODE_CHAINS[Mode.NOTICE]}")
            garden = self._not_garden(version, "daddr")
            redirect = f'counter name "redirected" redirect to :{self.portal_port}'
            if self.dns_port is not None:   # all their DNS, to any address, goes to the forwarder
                for mode in (Mode.WALLED_GARDEN, Mode.NOTICE):
                    nat.append(f"{iif}{match} @{redirect_set(version, plen, mode)} meta l4proto {{ tcp, udp }} "
                               f"th dport 53 redirect to :{self.dns_port}")
            nat.append(f"{iif}{match} @{redirect_set(version, plen)} tcp dport 80 {garden}{redirect}")
            nat.append(f"{iif}{match} @{redirect_set(version, plen, Mode.NOTICE)} "
                       f"{match} != @{ack_set(version, plen)} tcp dport 80 {garden}{redirect}")
        return (_by_family("to_subscriber", self._download_rules()) + _by_family("from_subscriber", forward)
                + ["\tchain portal_call {"] + [f"\t\t{r}" for r in portal_call] + ["\t}",
                   "\tchain forward {", "\t\ttype filter hook forward priority filter - 10; policy accept;",
                   f"\t\t{oif}jump to_subscriber", f"\t\t{iif}jump from_subscriber", "\t}",
                   "\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat - 10; policy accept;"]
                + [f"\t\t{r}" for r in nat] + ["\t}"])


def _by_family(name: str, rules: dict[int, list[str]]) -> list[str]:
    """A regular chain with the IPv4 rules, then (an IPv4 packet returning first) the IPv6 ones."""
    body = rules[4] + (["meta nfproto ipv4 return"] if rules[4] and rules[6] else []) + rules[6]
    return [f"\tchain {name} {{"] + [f"\t\t{r}" for r in body] + ["\t}"]


def _masked_saddr(version: int, prefixlen: int) -> str:
    return _masked(version, prefixlen, "saddr")


def _collapsed(networks: Iterable[Network], version: int) -> list[Network]:
    """The ``version`` networks among ``networks`` with overlaps merged (``collapse_addresses``
    takes one family at a time)."""
    if version == 4:
        return list(ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network)))
    return list(ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network)))


def _masked(version: int, prefixlen: int, direction: str) -> str:
    field_ = f"ip {direction}" if version == 4 else f"ip6 {direction}"
    full = 32 if version == 4 else 128
    if prefixlen == full:
        return field_
    mask = ipaddress.ip_network(f"{'0.0.0.0' if version == 4 else '::'}/{prefixlen}").netmask
    return f"{field_} & {mask}"


def elements_for(network: Network, mode: Mode) -> list[tuple[str, str, str | None]]:
    """The (container, key, value) elements that restrict one address or prefix in ``mode``."""
    version, plen = network.version, network.prefixlen
    key = socket.inet_ntop(socket.AF_INET if version == 4 else socket.AF_INET6, network.network_address.packed)
    out: list[tuple[str, str, str | None]] = [(redirect_set(version, plen, mode), key, None)]
    if mode is Mode.THROTTLE:
        out.append((throttle_set(version, plen), key, None))
    return out


_MEMBER = re.compile(r"^(portal|notice|throttle)([46])_(\d+)$")


def with_mode_view(state: TableState | None) -> TableState | None:
    """Add the mode view (``modeV_L`` → key → verdict) that the kernel's sets imply.

    A key in ``portal`` is walled-garden, in ``throttle`` throttle, in ``notice`` only notice;
    this is the inverse of ``reconciler.subscriber_elements``, so a table read back after a
    restart diffs cleanly against the decisions.
    """
    if state is None:
        return None
    view: dict[str, dict[str, str | None]] = {}
    rank = {"notice": 0, "throttle": 1, "portal": 2}
    mode_of = {"portal": Mode.WALLED_GARDEN, "throttle": Mode.THROTTLE, "notice": Mode.NOTICE}
    best: dict[tuple[str, str], str] = {}
    for container, items in state.elements.items():
        match = _MEMBER.match(container)
        if match is None:
            continue
        kind, version, plen = match.groups()
        name = mode_map(int(version), int(plen))
        view.setdefault(name, {})
        for key in items:
            held = best.get((name, key))
            if held is None or rank[kind] > rank[held]:
                best[(name, key)] = kind
    for (name, key), kind in best.items():
        view.setdefault(name, {})[key] = MODE_VERDICTS[mode_of[kind]]
    return TableState(state.layout_tag, {**state.elements, **view}, set(state.sealed))
