"""What only the ipset backend has (``gateway.backend: ipset``, docs/ipset.md), with the real
daemon in the kernel tests' topology: the chains rewritten at start when this release renders
other rules for the same configuration, ``rules: external`` with exactly the operator's lines
docs/ipset.md gives, and a set growing past its ``maxelem`` through a list update. The traffic
checks common to both backends are in ``test_backends.py``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kernel_helpers import SUB1, tcp_connect
from test_backends import UPSTREAM, UPSTREAM6, _tools

from enforcer.config import load_config
from enforcer.dataplane import iptables_rules
from enforcer.demo.lab import PORTAL_PORT, Lab
from enforcer.demo.topology import Topology
from enforcer.table_layout import base_layout

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ipset.md"
SUB_FREE, SUB_NOTICE = "C-2002", "C-2003"


def _lab(topo: Topology, tmp_path: Path, rules: str, variant: str, entries: list[dict]) -> Lab:
    topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80, 443))
    topo.serve_http(topo.garden, "GARDEN OK", ports=(80,))
    lab = Lab(topo, tmp_path, entries)
    lab.config["gateway"]["backend"] = "ipset"
    lab.config["gateway"]["ipset"] = {"rules": rules, "iptables": variant}
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    return lab


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(subscribers=3) as topology:
        yield topology


def _in_gw(topo: Topology, *argv: str) -> subprocess.CompletedProcess[str]:
    done = topo.run(topo.gateway.netns, *argv, timeout=30.0)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done


def _feed(topo: Topology, text: str, *argv: str) -> None:
    """Run argv in the gateway's namespace with ``text`` on its stdin (``*-restore``)."""
    subprocess.run(["ip", "netns", "exec", topo.gateway.netns, *argv], input=text, capture_output=True, text=True,
                   timeout=30, check=True)


def _restricted(topo: Topology, netns: str, url: str = UPSTREAM) -> bool:
    return topo.curl(netns, url)[0] == 302


# -- the stamp: layout tag and rules digest ---------------------------------------------------

@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_a_release_rendering_other_rules_rewrites_the_chains_at_start(
        topo: Topology, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chains an older release installed (here: without the restricted subscribers' DHCP rule,
    stamped with that release's digest) for the same configuration are replaced at the next start."""
    _tools(f"ipset-{variant}")
    s1 = topo.subscribers[0]
    lab = _lab(topo, tmp_path, "own", variant, [{"id": SUB1, "addresses": [s1.addr4], "reason": "overdue"}])
    lab.start_daemon()
    try:
        lab.stop_daemon()
        layout = base_layout(load_config(str(lab.config_path)))
        tool = f"iptables-{variant}"
        current = iptables_rules.stamp(layout)
        assert current in _in_gw(topo, tool, "-S", "WALLED-GARDEN-FWD").stdout, "installed with this release's stamp"
        with monkeypatch.context() as patch:   # the "older release"
            local = iptables_rules._local
            patch.setattr(iptables_rules, "_local", lambda *args: [r for r in local(*args) if "67,68" not in r])
            iptables_rules.stamp.cache_clear()
            older = iptables_rules.stamp(layout)
            for version in (4, 6):
                text = iptables_rules.restore_text(layout, version)
                _feed(topo, text, f"{'ip' if version == 4 else 'ip6'}tables-{variant}-restore", "--noflush")
        iptables_rules.stamp.cache_clear()
        assert older.split()[0] == current.split()[0] and older != current, "same layout tag, other rules"
        listing = _in_gw(topo, tool, "-S").stdout
        assert older in listing and "67,68" not in listing
        lab.start_daemon()
        listing = _in_gw(topo, tool, "-S").stdout
        assert current in listing and older not in listing, lab.log()
        assert "67,68" in listing, "the DHCP rule is back"
        assert listing.count("-j WALLED-GARDEN-FWD") == 1, "the jump inserted once"
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED", "still restricted"
        assert tcp_connect(topo, topo.subscribers[1].netns, "198.51.100.10", 443)[0] == "connected", "still free"
    finally:
        lab.stop_daemon()


def test_a_firewall_reload_that_drops_our_jumps_is_repaired_at_the_next_check(topo: Topology,
                                                                             tmp_path: Path) -> None:
    """An ``iptables-restore`` of the operator's own ruleset (Shorewall, netfilter-persistent)
    rewrites FORWARD, INPUT and nat PREROUTING without our jumps: the quick table check (every
    5 s) notices and puts them back, as it puts back a deleted nftables table."""
    _tools("ipset-nft")
    s1, s2, _ = topo.subscribers
    lab = _lab(topo, tmp_path, "own", "nft", [{"id": SUB1, "addresses": [s1.addr4], "reason": "overdue"}])
    lab.start_daemon()
    try:
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED"
        for table in ("filter", "nat"):   # the operator's ruleset: empty built-in chains, policy ACCEPT
            _feed(topo, f"*{table}\n-F {'PREROUTING' if table == 'nat' else 'FORWARD'}\n"
                  + ("-F INPUT\n" if table == "filter" else "") + "COMMIT\n", "iptables-nft-restore", "--noflush")
        assert "-j WALLED-GARDEN-FWD" not in _in_gw(topo, "iptables-nft", "-S", "FORWARD").stdout
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "connected", "freed by the reload"
        lab.wait_for(lambda: tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED", timeout=15,
                     what="the jumps put back")
        assert "event=table_lost" in lab.log() and "iptables jumps or chains" in lab.log()
        assert _in_gw(topo, "iptables-nft", "-S", "FORWARD").stdout.count("-j WALLED-GARDEN-FWD") == 1
        assert tcp_connect(topo, s2.netns, "198.51.100.10", 443)[0] == "connected", "the free one stays free"
    finally:
        lab.stop_daemon()


def test_a_flushed_umbrella_is_repaired_at_the_next_check(topo: Topology, tmp_path: Path) -> None:
    """The rules match only the ``list:set`` umbrellas: ``ipset flush walled-portal4`` frees every
    walled-garden subscriber while every set still holds its elements and sentinel. The quick
    table check tests each umbrella's members, logs ``event=table_lost`` and the full sync lists
    them again; ``ipset del`` of one member likewise."""
    _tools("ipset-nft")
    s1, s2, _ = topo.subscribers
    lab = _lab(topo, tmp_path, "own", "nft", [{"id": SUB1, "addresses": [s1.addr4], "reason": "overdue"}])
    lab.start_daemon()
    try:
        members = _in_gw(topo, "ipset", "save", "walled-portal4").stdout
        for damage in (("flush", "walled-portal4"), ("del", "walled-portal4", "walled-portal4-32")):
            assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED"
            _in_gw(topo, "ipset", *damage)
            assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "connected", f"freed by {damage}"
            lab.wait_for(lambda: tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED",
                         timeout=15, what=f"the umbrella repaired after {damage}")
            assert _in_gw(topo, "ipset", "save", "walled-portal4").stdout == members
            assert tcp_connect(topo, s2.netns, "198.51.100.10", 443)[0] == "connected", "the free one stays free"
        assert "event=table_lost" in lab.log() and "umbrella walled-portal4 lacks walled-portal4-32" in lab.log()
        lab.wait_for(lambda: "walledtmp-" not in _in_gw(topo, "ipset", "list", "-n").stdout, timeout=5,
                     what="the old contents destroyed (after the swaps and the rules)")
    finally:
        lab.stop_daemon()


# -- rules: external ----------------------------------------------------------------------------

def _documented_lines() -> list[str]:
    """The lines docs/ipset.md's ``rules: external`` section gives, as written there."""
    section = DOCS.read_text().split("## `rules: external`", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block is not None, "docs/ipset.md lost its rules: external block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _operator_lines(topo: Topology) -> list[list[str]]:
    """The documented lines for this topology's subscriber interfaces, as argv: the chain once,
    the jumps and nat lines per interface (docs/ipset.md: as ``render`` prints them)."""
    interfaces = tuple(topo.subscriber_interfaces)
    lines = iptables_rules.external_lines(4, PORTAL_PORT, interfaces) + \
        iptables_rules.external_lines(6, PORTAL_PORT, interfaces)
    def general(line: str) -> str:   # without the interface and the position
        return re.sub(r"(-I \S+) \d+ ", r"\1 ", re.sub(r"-i \S+ ", "", line))

    assert {general(line) for line in lines} == {general(line) for line in _documented_lines()}, \
        "per interface, the lines documented for eth1"
    return [shlex.split(line) for line in lines]


def test_the_documented_lines_are_what_external_lines_prints() -> None:
    assert _documented_lines() == iptables_rules.external_lines(4, 8080, ("eth1",)) + \
        iptables_rules.external_lines(6, 8080, ("eth1",))


def test_external_rules_with_the_documented_lines(topo: Topology, tmp_path: Path) -> None:
    """The daemon keeps only the sets; the operator's lines from the docs (per subscriber
    interface) make walled garden, notice and free traffic right, IPv6 included."""
    _tools("ipset-nft")
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("needs iptables and ip6tables")   # _tools fails in CI before this
    s1, s2, s3 = topo.subscribers
    lab = _lab(topo, tmp_path, "external", "auto",
               [{"id": SUB1, "addresses": [s1.addr4, "2001:db8:100:1::/64"], "reason": "overdue"},
                {"id": SUB_NOTICE, "addresses": [s3.addr4], "mode": "notice", "reason": "overdue"}])
    lab.start_daemon()
    lab.start_portal()
    try:
        saved = _in_gw(topo, "iptables-save").stdout + _in_gw(topo, "ip6tables-save").stdout
        assert "WALLED-GARDEN" not in saved, "rules: external installs no chain and no jump"
        assert {"walled-portal4", "walled-notice4", "walled-allow4", "walled-portal6"} <= set(
            _in_gw(topo, "ipset", "list", "-n").stdout.split())
        assert topo.curl(s1.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK"), "no rule yet: nothing enforced"
        assert PORTAL_PORT == 8080, "the documented lines name port 8080"
        for argv in _operator_lines(topo):
            _in_gw(topo, *argv)
        status, _, headers, _ = topo.curl(s1.netns, UPSTREAM)
        assert status == 302 and headers["location"] == lab.portal_url
        assert topo.curl(s1.netns, lab.portal_url)[0] == 200
        result, seconds = tcp_connect(topo, s1.netns, "198.51.100.10", 443)
        assert result == "ECONNREFUSED" and seconds < 1.0, (result, seconds)
        assert topo.curl(s1.netns, "http://203.0.113.10/")[:2] == (200, "GARDEN OK")
        assert topo.curl(s1.netns, UPSTREAM6)[0] == 302
        assert topo.curl(s2.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK"), "free"
        assert tcp_connect(topo, s2.netns, "198.51.100.10", 443)[0] == "connected"
        assert topo.curl(s3.netns, UPSTREAM)[0] == 302, "notice: HTTP to the portal"
        assert tcp_connect(topo, s3.netns, "198.51.100.10", 443)[0] == "connected", "notice: the rest open"
        lab.send_event("payment.received", SUB1)
        lab.wait_for(lambda: topo.curl(s1.netns, UPSTREAM)[0] == 200, timeout=5, what="the payment lifts")
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "connected"
    finally:
        lab.stop_daemon()
        for argv in reversed(_operator_lines(topo)):   # the namespace goes anyway; tidy all the same
            if "-I" in argv:
                delete = [("-D" if a == "-I" else a) for a in argv]
                del delete[delete.index("-D") + 2]   # the position
                topo.run(topo.gateway.netns, *delete, timeout=30.0)
            elif "-N" in argv:
                for verb in ("-F", "-X"):
                    topo.run(topo.gateway.netns, *[verb if a == "-N" else a for a in argv], timeout=30.0)


# -- maxelem growth -----------------------------------------------------------------------------

def _header(topo: Topology, name: str) -> dict[str, int]:
    text = _in_gw(topo, "ipset", "list", "-t", name).stdout
    maxelem = re.search(r"maxelem (\d+)", text)
    entries = re.search(r"Number of entries: (\d+)", text)
    assert maxelem and entries, text
    return {"maxelem": int(maxelem.group(1)), "entries": int(entries.group(1))}


def test_a_list_update_past_maxelem_swaps_in_a_bigger_set(topo: Topology, tmp_path: Path) -> None:
    """``walled-portal4-32`` made small behind the daemon's back (as an older release or the kernel's
    default of 65,536 would be, only smaller), then a list update that needs more room: the set
    is swapped for a bigger copy before the update, nobody is lifted or restricted by accident."""
    _tools("ipset-nft")
    s1, s2, s3 = topo.subscribers
    extra = [f"100.64.50.{i}" for i in range(1, 9)]   # listed addresses nobody uses: room needed
    entries = [{"id": SUB1, "addresses": [s1.addr4], "reason": "overdue"}]
    lab = _lab(topo, tmp_path, "own", "nft", entries)
    lab.start_daemon()
    lab.start_portal()
    try:
        assert _restricted(topo, s1.netns)
        lab.stop_daemon()
        # Shrink the set: a copy with maxelem 2 (the sentinel and s1) swapped in, as the daemon grows them.
        saved = _in_gw(topo, "ipset", "save", "walled-portal4-32").stdout
        small = re.sub(r"maxelem \d+", "maxelem 2", saved.replace("walled-portal4-32", "walledtmp-small"))
        _feed(topo, small + "swap walledtmp-small walled-portal4-32\ndestroy walledtmp-small\n", "ipset", "restore")
        assert _header(topo, "walled-portal4-32") == {"maxelem": 2, "entries": 2}
        lab.start_daemon()   # reads the sets back, their maxelem with them
        assert _restricted(topo, s1.netns) and not _restricted(topo, s2.netns)
        probing = topo.popen(s1.netns, "sh", "-c", "for i in $(seq 1 40); do curl -s -o /dev/null -w '%{http_code}\\n' "
                             f"--max-time 2 {UPSTREAM}; sleep 0.05; done", stdout=subprocess.PIPE, text=True)
        lab.write_list([*entries, {"id": "C-2010", "addresses": [s3.addr4, *extra], "reason": "overdue"}])
        lab.wait_for(lambda: _restricted(topo, s3.netns), timeout=10, what="the update applied")
        out, _ = probing.communicate(timeout=60)
        codes = out.split()
        assert codes and set(codes) == {"302"}, f"s1 stayed restricted through the swap: {codes}"
        header = _header(topo, "walled-portal4-32")
        assert header["maxelem"] >= 65536 and header["entries"] == 1 + 1 + 1 + len(extra), header
        assert _restricted(topo, s1.netns) and not _restricted(topo, s2.netns)
        assert topo.curl(s2.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK")
        assert "walledtmp-" not in _in_gw(topo, "ipset", "list", "-n").stdout, "the temporary set is gone"
        assert f"event=sync kind=partial elements={1 + len(extra)} " in lab.log(), "a diff, not a full sync"
    finally:
        lab.stop_daemon()
