"""The ipset backend's own iptables chains (``gateway.ipset.rules: own``), rendered from the same
``Layout`` facts as the nftables table, one family at a time (``iptables`` / ``ip6tables``).

What they do, as the nftables table does (``layout.py``'s docstring):

* ``filter FORWARD`` → ``WALLED-GARDEN-FWD``: per subscriber interface, packets *to* a subscriber
  go through ``-DOWN`` (throttled download: one ``hashlimit`` bucket per throttled key, longest
  prefix first), packets *from* one through ``-UP``: a walled-garden member goes to ``-GARDEN``
  (garden, DNS, NTP, ICMP errors pass; TCP gets a reset, the rest admin-prohibited), a throttled
  one to ``-THROTTLE`` (upload bucket). Notice leaves forwarding alone.
* ``nat PREROUTING`` → ``WALLED-GARDEN-PRE`` → ``-NAT``: connections to the gateway's own
  addresses on the portal's ports are marked (``PORTAL_CT_MARK``) and their source recorded in
  ``walled-portalcaller4`` (``-CALL``); TCP 80/443 to the gateway go to the portal's listeners; a
  walled-garden member's HTTP (and a notice member's, until acknowledged) to anywhere outside the
  garden is redirected to the portal.
* ``filter INPUT`` → ``WALLED-GARDEN-IN``: a restricted subscriber may reach on the gateway only
  the portal, DNS, NTP, DHCP and ICMP (``-LOCAL``).

Our chains never ``ACCEPT``: what they let through they ``RETURN``, so the operator's own rules
after the jump still decide about it (an nftables ``accept`` in our table does not end other
tables' chains either). They only refuse, redirect, mark and rate-limit. The jumps are inserted
at the top of the three built-in chains, once; nothing else of the operator's rules is touched.
Rule counters with the comment ``walled-garden counter <name>`` are the layout's named counters.

Throttle (``hashlimit``, byte mode), and why it takes several rules. hashlimit's byte mode is a
token bucket that holds one second at the rate, and it charges a packet at most that second
(``hashlimit_byte_cost`` caps the cost). A forwarded packet may be a GRO/GSO super-packet of up
to 64 KiB (veth passes TSO packets on whole; a NIC's GRO merges a download's segments before
the forward hook), so at 10 kB/s one such packet a second went through, 64 kB/s: the limit did
nothing (measured, issue 19). So a packet longer than one second at the rate is charged again
by further rules on the same bucket (same ``--hashlimit-name``), one per second's worth more
(``-m length``: a short packet skips them at one comparison): ``ceil(length / rate)`` charges
in all, as the nftables ``limit`` charges the length. Beyond the first, a charge can only be
paid from the burst: hashlimit's ``--hashlimit-burst`` in byte mode is a count of refills of
the one-second bucket, spent once and given back only when the idle bucket expires
(``--hashlimit-htable-expire``, here the time the nftables bucket needs to fill up again). So
once the burst is spent a packet longer than one second at the rate is dropped, and TCP sends
shorter ones: the nftables table with a burst of one second. The bucket's name carries a digest
of its parameters, because the kernel keeps a bucket table by name with the parameters it was
created with: a new rate must get a new table, not the old one. A full-size packet must fit in
the one-second bucket, hence ``config.IPSET_MIN_THROTTLE_RATE``.
"""

from __future__ import annotations

import functools
import hashlib
import math

from ..model import Mode
from .ipset_sets import set_name, umbrella
from .layout import DHCP_PORTS, LINK_LOCAL6, PORTAL_CT_MARK, Layout, ack_set, redirect_set, throttle_set

#: (table, built-in chain, our chain) of the jumps ``rules: own`` inserts once each.
JUMPS = (("filter", "FORWARD", "WALLED-GARDEN-FWD"), ("filter", "INPUT", "WALLED-GARDEN-IN"),
         ("nat", "PREROUTING", "WALLED-GARDEN-PRE"))
#: Our chains per table, each replaced whole by ``iptables-restore --noflush``.
CHAINS = {"filter": ("WALLED-GARDEN-FWD", "WALLED-GARDEN-DOWN", "WALLED-GARDEN-UP", "WALLED-GARDEN-GARDEN",
                     "WALLED-GARDEN-THROTTLE", "WALLED-GARDEN-IN", "WALLED-GARDEN-LOCAL"),
          "nat": ("WALLED-GARDEN-PRE", "WALLED-GARDEN-NAT", "WALLED-GARDEN-CALL")}
COUNTER_COMMENT = "walled-garden counter "
TAG_COMMENT = "walled-garden layout "
_ICMP_ERRORS = {4: ("icmp", "icmp-type", ("destination-unreachable", "time-exceeded", "parameter-problem")),
                6: ("ipv6-icmp", "icmpv6-type",
                    ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem"))}
_PROHIBITED = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}
#: Throttle buckets per prefix length and direction (``layout.THROTTLE_METER_SIZE`` in nftables).
HASHLIMIT_MAX = 1 << 20
#: The longest packet ``-m length`` sees (the IP length field): a GRO/GSO super-packet at most.
MAX_PACKET = 65535


def interface(name: str) -> str:
    """An interface name as iptables spells it: the config's ``ppp*`` wildcard is ``ppp+``."""
    return name[:-1] + "+" if name.endswith("*") else name


def _counter(name: str) -> str:
    return f'-m comment --comment "{COUNTER_COMMENT}{name}"'


def _match(name: str, direction: str, negate: bool = False) -> str:
    return f"-m set {'! ' if negate else ''}--match-set {name} {direction}"


@functools.cache
def stamp(layout: Layout) -> str:
    """What ``WALLED-GARDEN-FWD``'s comment says after ``TAG_COMMENT``: the layout tag and a
    digest of the rules this release renders for it, both families (``rules <digest>``). The
    layout tag alone covers the configuration, not the rendering: a release that changes the
    rules for the same configuration must rewrite the chains at start (``IpsetDataplane.read``)."""
    text = "\n".join(line for version in (4, 6) for lines in _rules(layout, version).values() for line in lines)
    return f"{layout.tag} rules {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def chains(layout: Layout, version: int) -> dict[str, list[str]]:
    """Table → our chains' ``-A`` lines for one family (``iptables-restore`` syntax), with the
    stamp (the layout tag and the rules' digest) as the comment of a rule without a target at
    the end of ``WALLED-GARDEN-FWD``."""
    out = _rules(layout, version)
    tag = f'-A WALLED-GARDEN-FWD -m comment --comment "{TAG_COMMENT}{stamp(layout)}"'
    last = max(i for i, line in enumerate(out["filter"]) if line.startswith("-A WALLED-GARDEN-FWD "))
    out["filter"].insert(last + 1, tag)
    return out


def _rules(layout: Layout, version: int) -> dict[str, list[str]]:
    """``chains`` without the stamp."""
    sets = {kind: umbrella(kind, version) for kind in ("portal", "notice", "throttle", "noticeack")}
    garden = [set_name(f"allow{version}"), set_name(f"allowhost{version}")]
    not_garden_dst = " ".join(_match(name, "dst", True) for name in garden)
    not_garden_src = " ".join(_match(name, "src", True) for name in garden)
    ifaces = [f"-i {interface(name)} " for name in layout.interfaces] or [""]
    oifaces = [f"-o {interface(name)} " for name in layout.interfaces] or [""]
    longest = [(plen, shorter) for v, plen, shorter in layout._longest_first() if v == version]

    fwd = [f"-A WALLED-GARDEN-FWD {o}-j WALLED-GARDEN-DOWN" for o in oifaces]
    fwd += [f"-A WALLED-GARDEN-FWD {i}-j WALLED-GARDEN-UP" for i in ifaces]
    down: list[str] = []
    throttle: list[str] = [f"-A WALLED-GARDEN-THROTTLE {_match(name, 'dst')} -j RETURN" for name in garden]
    for plen, shorter in longest:
        members = set_name(throttle_set(version, plen))
        down += _throttled("WALLED-GARDEN-DOWN", f"{_match(members, 'dst')} {not_garden_src}",
                           _limit(layout, version, plen, "d"), layout.throttle_rate)
        throttle += _throttled("WALLED-GARDEN-THROTTLE", _match(members, "src"), _limit(layout, version, plen, "u"),
                               layout.throttle_rate)
        if shorter:   # the longest matching entry decides: stop before a shorter prefix of someone else
            throttle.append(f"-A WALLED-GARDEN-THROTTLE {_match(members, 'src')} -j RETURN")
            for kind in ("notice", "portal"):
                down.append(f"-A WALLED-GARDEN-DOWN {_match(set_name(f'{kind}{version}_{plen}'), 'dst')} -j RETURN")
    # The umbrellas match every prefix length at once. Where an entry may lie inside a shorter
    # one of someone else (sessions are resolved by exact network, so a /32 of one subscriber can
    # sit in another's /56), the longest decides, as in the nftables table: those lengths get
    # rules of their own first, and a key found there goes no further.
    split = [plen for plen, shorter in longest if shorter]
    up: list[str] = []
    for plen in split:
        portal_len, notice_len = (set_name(redirect_set(version, plen, mode)) for mode in (Mode.WALLED_GARDEN,
                                                                                           Mode.NOTICE))
        up += [f"-A WALLED-GARDEN-UP {_match(portal_len, 'src')} -g WALLED-GARDEN-GARDEN",
               f"-A WALLED-GARDEN-UP {_match(set_name(throttle_set(version, plen)), 'src')} -g WALLED-GARDEN-THROTTLE",
               f"-A WALLED-GARDEN-UP {_match(notice_len, 'src')} -j RETURN"]
    up += [f"-A WALLED-GARDEN-UP {_match(sets['portal'], 'src')} -g WALLED-GARDEN-GARDEN",
           f"-A WALLED-GARDEN-UP {_match(sets['throttle'], 'src')} -g WALLED-GARDEN-THROTTLE"]
    local_in = [f"-A WALLED-GARDEN-IN {i}{_match(sets[kind], 'src')} -g WALLED-GARDEN-LOCAL"
                for i in ifaces for kind in ("portal", "notice")]
    if version == 6 and layout.interfaces:   # link-local sources, as ``layout._input_hook`` says
        local_in += [f"-A WALLED-GARDEN-IN {i}-s {LINK_LOCAL6} -p {proto} -g WALLED-GARDEN-LOCAL"
                     for i in ifaces for proto in ("tcp", "udp")]
    filter_lines = fwd + down + up + _garden(layout, version, garden) + throttle + local_in + _local(layout, version)

    ports = sorted({*layout.portal_ports, 80, *((443,) if layout.portal_tls_port is not None else ())})
    pre = [f"-A WALLED-GARDEN-PRE {i}-j WALLED-GARDEN-NAT" for i in ifaces]
    nat = [f"-A WALLED-GARDEN-NAT -p tcp -m multiport --dports {','.join(map(str, ports))} "
           "-m addrtype --dst-type LOCAL -j WALLED-GARDEN-CALL"]
    for advertised, listener in ((80, layout.portal_port), (443, layout.portal_tls_port)):
        if listener is not None and listener != advertised:
            nat.append(f"-A WALLED-GARDEN-NAT -p tcp --dport {advertised} -m addrtype --dst-type LOCAL "
                       f"-j REDIRECT --to-ports {listener}")
    redirect = f"{_counter('redirected')} -j REDIRECT --to-ports {layout.portal_port}"
    for plen in split:   # the longest entry decides (see ``up``)
        portal_len, notice_len = (set_name(redirect_set(version, plen, mode)) for mode in (Mode.WALLED_GARDEN,
                                                                                           Mode.NOTICE))
        nat += [f"-A WALLED-GARDEN-NAT -p tcp --dport 80 {_match(portal_len, 'src')} {not_garden_dst} {redirect}",
                f"-A WALLED-GARDEN-NAT {_match(portal_len, 'src')} -j RETURN",
                f"-A WALLED-GARDEN-NAT -p tcp --dport 80 {_match(notice_len, 'src')} "
                f"{_match(set_name(ack_set(version, plen)), 'src', True)} {not_garden_dst} {redirect}",
                f"-A WALLED-GARDEN-NAT {_match(notice_len, 'src')} -j RETURN"]
    nat.append(f"-A WALLED-GARDEN-NAT -p tcp --dport 80 {_match(sets['portal'], 'src')} {not_garden_dst} {redirect}")
    nat.append(f"-A WALLED-GARDEN-NAT -p tcp --dport 80 {_match(sets['notice'], 'src')} "
               f"{_match(sets['noticeack'], 'src', True)} {not_garden_dst} {redirect}")
    call = [f"-A WALLED-GARDEN-CALL -j CONNMARK --or-mark {PORTAL_CT_MARK:#x}",
            f"-A WALLED-GARDEN-CALL -j SET --add-set {set_name(f'portalcaller{version}')} src --exist "
            "--timeout 900"]
    return {"filter": filter_lines, "nat": pre + nat + call}


def hashlimit_burst(layout: Layout) -> int:
    """``--hashlimit-burst`` in bytes: ``policy.throttle_burst``, but never under one second at
    the rate (iptables refuses less; the bucket holds that second anyway)."""
    return max(layout.throttle_burst, layout.throttle_rate)


def hashlimit_expire_ms(layout: Layout) -> int:
    """How long an idle subscriber's bucket is kept: as long as the nftables bucket takes to fill
    up again (burst / rate), at least a second. Its expiry gives the burst back (module docstring)."""
    return max(1000, math.ceil(1000 * hashlimit_burst(layout) / layout.throttle_rate))


def _limit(layout: Layout, version: int, plen: int, direction: str) -> str:
    """One bucket per throttled key of this prefix length, ``direction`` ``d``own (by
    destination) or ``u``p (by source); named ``wgd4-32-<digest of the parameters>``
    (hashlimit names are at most 15 characters)."""
    rate, burst, expire = layout.throttle_rate, hashlimit_burst(layout), hashlimit_expire_ms(layout)
    digest = hashlib.sha256(f"{rate} {burst} {expire}".encode()).hexdigest()[:6]
    mode, mask = ("dstip", "dstmask") if direction == "d" else ("srcip", "srcmask")
    return (f"-m hashlimit --hashlimit-above {rate}b/s --hashlimit-burst {burst}b --hashlimit-mode {mode} "
            f"--hashlimit-{mask} {plen} --hashlimit-name wg{direction}{version}-{plen}-{digest} "
            f"--hashlimit-htable-max {HASHLIMIT_MAX} --hashlimit-htable-expire {expire}")


def charges(rate: int) -> list[int]:
    """The lengths past which a packet is charged once more: every second's worth of ``rate``
    below ``MAX_PACKET`` (none at 64 KiB/s and more). ``ceil(length / rate)`` charges in all."""
    return [k * rate for k in range(1, math.ceil(MAX_PACKET / rate))]


def _throttled(chain: str, members: str, limit: str, rate: int) -> list[str]:
    """The throttle rules of one prefix length and direction: the first charge for every packet
    of a throttled key, then one more per second's worth of length (module docstring)."""
    rule = f"{members} {limit} -j DROP"
    return [f"-A {chain} {rule}"] + [f"-A {chain} -m length ! --length 0:{length} {rule}"
                                     for length in charges(rate)]


def _garden(layout: Layout, version: int, garden: list[str]) -> list[str]:
    """Walled-garden mode (``layout._garden_chain``): the allowed few return, the rest is refused."""
    return _garden_lines("-A WALLED-GARDEN-GARDEN", version, garden, layout.dns is not None,
                         layout.ntp is not None, counted=True)


def _garden_lines(append: str, version: int, garden: list[str], dns_listed: bool, ntp_listed: bool,
                  counted: bool) -> list[str]:
    """The garden chain's rules after ``append`` (``-A <chain>``, or the command that appends
    to the operator's chain): garden, DNS and NTP (to the listed servers when listed), ICMP
    errors return; TCP gets a reset, the rest admin-prohibited; ``counted``: with our counters."""
    proto, icmp_opt, icmp_errors = _ICMP_ERRORS[version]
    out = [f"{append} {_match(name, 'dst')} -j RETURN" for name in garden]
    for name, port, listed in (("dns", 53, dns_listed), ("ntp", 123, ntp_listed)):
        where = f"{_match(set_name(f'{name}{version}'), 'dst')} " if listed else ""
        for transport in (("udp", "tcp") if name == "dns" else ("udp",)):
            out.append(f"{append} {where}-p {transport} --dport {port} -j RETURN")
    out += [f"{append} -p {proto} --{icmp_opt} {kind} -j RETURN" for kind in icmp_errors]
    tcp, other = (f"{_counter('refused_tcp')} ", f"{_counter('refused_other')} ") if counted else ("", "")
    out += [f"{append} -p tcp {tcp}-j REJECT --reject-with tcp-reset",
            f"{append} {other}-j REJECT --reject-with {_PROHIBITED[version]}"]
    return out


def _local(layout: Layout, version: int) -> list[str]:
    """What a restricted subscriber may reach on the gateway itself (``layout._local_chain``)."""
    proto = _ICMP_ERRORS[version][0]
    ports = ",".join(str(p) for p in layout.portal_ports)
    return ["-A WALLED-GARDEN-LOCAL -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
            f"-A WALLED-GARDEN-LOCAL -p tcp -m multiport --dports {ports} -j RETURN",
            "-A WALLED-GARDEN-LOCAL -p udp --dport 53 -j RETURN",
            "-A WALLED-GARDEN-LOCAL -p tcp --dport 53 -j RETURN",
            "-A WALLED-GARDEN-LOCAL -p udp --dport 123 -j RETURN",
            f"-A WALLED-GARDEN-LOCAL -p udp -m multiport --dports {','.join(map(str, DHCP_PORTS))} -j RETURN",
            f"-A WALLED-GARDEN-LOCAL -p {proto} -j RETURN",
            f"-A WALLED-GARDEN-LOCAL -p tcp {_counter('refused_local')} -j REJECT --reject-with tcp-reset",
            f"-A WALLED-GARDEN-LOCAL {_counter('refused_local')} -j REJECT --reject-with {_PROHIBITED[version]}"]


def restore_text(layout: Layout, version: int, missing_jumps: set[tuple[str, str, str]] | None = None) -> str:
    """``iptables-restore --noflush`` input replacing our chains (declaring a chain flushes it) and
    inserting the jumps in ``missing_jumps`` (default: none) at the top of their built-in chains.
    One table's part is one atomic commit; a failure leaves the table as it was."""
    out: list[str] = []
    for table, lines in chains(layout, version).items():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in CHAINS[table]]
        out += lines
        out += [f"-I {builtin} 1 -j {ours}" for t, builtin, ours in JUMPS
                if t == table and (table, builtin, ours) in (missing_jumps or set())]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


#: The chain an operator with ``rules: external`` creates for walled-garden members (its name is
#: theirs to change; ours start ``WALLED-GARDEN-``, which the daemon manages).
EXTERNAL_CHAIN = "WG-RESTRICTED"


def external_lines(version: int, portal_port: int, interfaces: tuple[str, ...] = (), *,
                   dns: tuple[str, ...] | None = None, ntp: tuple[str, ...] | None = None,
                   tls_port: int | None = None) -> list[str]:
    """The rules an operator with ``rules: external`` adds (docs/ipset.md; ``walled-garden
    render`` prints them for the configuration), as shell commands: what ``rules: own`` does
    for walled-garden and notice members, but throttling and the gateway's own ports.

    ``dns``/``ntp``: None when ``walled_garden.dns``/``ntp`` allow any host (the default), else
    the configured servers (then only the ``walled-dnsV``/``walled-ntpV`` sets' hosts pass).
    Nothing here ``ACCEPT``s: a member's allowed traffic returns from our chain and the
    operator's FORWARD rules decide about it as about anyone's."""
    cmd = "iptables" if version == 4 else "ip6tables"
    ifaces = [f"-i {interface(n)} " for n in interfaces] or [""]
    portal, notice, ack = (umbrella(k, version) for k in ("portal", "notice", "noticeack"))
    allow, hosts = set_name(f"allow{version}"), set_name(f"allowhost{version}")
    not_garden = f"-m set ! --match-set {allow} dst -m set ! --match-set {hosts} dst"
    chain = EXTERNAL_CHAIN
    out = [f"{cmd} -N {chain}"]
    out += _garden_lines(f"{cmd} -A {chain}", version, [allow, hosts], dns is not None, ntp is not None,
                         counted=False)
    out += [f"{cmd} -I FORWARD 1 {i}-m set --match-set {portal} src -j {chain}" for i in ifaces]
    ports = sorted({portal_port, 80, *((tls_port, 443) if tls_port is not None else ())})
    local = f"-p tcp -m multiport --dports {','.join(map(str, ports))} -m addrtype --dst-type LOCAL"
    nat: list[str] = []
    for i in ifaces:
        # Connections to the portal: marked (a lift's conntrack flush spares them, so the
        # promise-to-pay answer arrives) and their source recorded (the portal's actions check it).
        nat += [f"{i}{local} -j CONNMARK --or-mark {PORTAL_CT_MARK:#x}",
                f"{i}{local} -j SET --add-set {set_name(f'portalcaller{version}')} src --exist --timeout 900"]
        for advertised, listener in ((80, portal_port), (443, tls_port)):
            if listener is not None and listener != advertised:
                nat.append(f"{i}-p tcp --dport {advertised} -m addrtype --dst-type LOCAL "
                           f"-j REDIRECT --to-ports {listener}")
        redirect = f"{not_garden} -j REDIRECT --to-ports {portal_port}"
        nat += [f"{i}-p tcp --dport 80 -m set --match-set {portal} src {redirect}",
                f"{i}-p tcp --dport 80 -m set --match-set {notice} src -m set ! --match-set {ack} src {redirect}"]
    out += [f"{cmd} -t nat -I PREROUTING {n} {line}" for n, line in enumerate(nat, 1)]
    return out
