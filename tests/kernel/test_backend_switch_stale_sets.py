"""A switch from ``gateway.backend: ipset`` with ``rules: external`` to nftables while the
operator's iptables lines still name our ipsets (docs/ipset.md asks for them to go first): the
sets cannot be destroyed, so the daemon empties them (``IpsetDataplane._destroy_or_empty``,
``backend_switch.BackendSwitch``); a customer who pays after the switch is not kept walled by a
stale set. In network namespaces of the tests' own."""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kernel_helpers import SUB1, tcp_connect

from enforcer.dataplane import iptables_rules
from enforcer.demo.lab import PORTAL_PORT, Lab
from enforcer.demo.topology import Topology
from required import tool

UPSTREAM = "http://198.51.100.10/"


def _needs_tools() -> None:
    for name, package in (("ipset", "ipset"), ("iptables", "iptables"), ("ip6tables", "iptables"),
                          ("iptables-nft", "iptables"), ("iptables-legacy", "iptables")):
        tool(name, package)


# -- the clean-up alone, in a bare namespace -------------------------------------------------------

@pytest.fixture
def netns() -> Iterator[str]:
    _needs_tools()
    name = f"wg-stale-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(netns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def entries(netns: str, name: str) -> list[str]:
    return [line.split()[2] for line in inside(netns, "ipset", "save", name).splitlines()
            if line.startswith(f"add {name} ")]


def test_sets_a_rule_not_ours_names_are_emptied_and_reported(netns: str) -> None:
    """The umbrella and the allow set named by the operator's lines stay, emptied; the umbrella's
    member, named by nothing else, goes; the operator's own set and rule are untouched; the
    ``status`` section says which sets were left."""
    restore = ("create walled-portal4-32 hash:net family inet\nadd walled-portal4-32 100.64.0.5\n"
               "create walled-portal4 list:set size 129\nadd walled-portal4 walled-portal4-32\n"
               "create walled-allow4 hash:net family inet\nadd walled-allow4 203.0.113.0/24\n"
               "create operator-debtors hash:net family inet\nadd operator-debtors 100.64.0.9\n")
    subprocess.run(["ip", "netns", "exec", netns, "ipset", "restore"], input=restore, text=True, check=True,
                   timeout=60)
    for line in ("-N WG-RESTRICTED", "-A WG-RESTRICTED -m set --match-set walled-allow4 dst -j RETURN",
                 "-A WG-RESTRICTED -j REJECT", "-I FORWARD 1 -m set --match-set walled-portal4 src -j WG-RESTRICTED",
                 "-A FORWARD -m set --match-set operator-debtors src -j DROP"):
        inside(netns, "iptables", *shlex.split(line))
    code = ("import json, types; from enforcer.backend_switch import BackendSwitch; "
            "s = BackendSwitch(types.SimpleNamespace(gateway=types.SimpleNamespace(backend='nftables', "
            "table='walled_garden'))); said = s.run(); print(json.dumps({'said': said, 'status': s.status()}))")
    out = json.loads(inside(netns, sys.executable, "-c", code))
    status = out["status"]
    assert status["done"] and status["sets_left_emptied"] == ["walled-portal4", "walled-allow4"], out
    assert status["sets_left_not_emptied"] == [], out
    assert any("emptied" in line for line in out["said"]), out
    names = inside(netns, "ipset", "list", "-n").split()
    assert "walled-portal4-32" not in names, "the member goes once the umbrella is empty"
    assert entries(netns, "walled-portal4") == [] and entries(netns, "walled-allow4") == []
    assert entries(netns, "operator-debtors") == ["100.64.0.9"], "not ours: untouched"
    rules = inside(netns, "iptables", "-S")
    assert "--match-set walled-portal4 src -j WG-RESTRICTED" in rules, "the operator's lines are theirs to delete"
    assert "--match-set operator-debtors src -j DROP" in rules


# -- the real daemon: switched, then a payment ------------------------------------------------------

def _in_gw(topo: Topology, *argv: str) -> str:
    done = topo.run(topo.gateway.netns, *argv, timeout=30.0)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def test_a_customer_paying_after_the_switch_is_not_walled_by_a_stale_set(topo: Topology, tmp_path: Path) -> None:
    _needs_tools()
    s1, s2 = topo.subscribers
    lab = Lab(topo, tmp_path, [{"id": SUB1, "addresses": [s1.addr4], "reason": "overdue"}])
    lab.config["gateway"]["backend"] = "ipset"
    lab.config["gateway"]["ipset"] = {"rules": "external", "iptables": "auto"}
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    interfaces = tuple(topo.subscriber_interfaces)
    try:
        lab.start_daemon()
        for line in (iptables_rules.external_lines(4, PORTAL_PORT, interfaces)
                     + iptables_rules.external_lines(6, PORTAL_PORT, interfaces)):
            _in_gw(topo, *shlex.split(line))   # the operator's lines (docs/ipset.md, rules: external)
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED", "walled by the ipsets"
        lab.stop_daemon()

        # The switch, without deleting the lines first.
        del lab.config["gateway"]["ipset"]
        lab.config["gateway"]["backend"] = "nftables"
        lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
        lab.start_daemon()
        lab.wait_for(lambda: "event=other_backend_removed" in lab.log(), timeout=15, what="the switch's clean-up")
        assert tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "ECONNREFUSED", "walled by the table now"
        assert tcp_connect(topo, s2.netns, "198.51.100.10", 443)[0] == "connected", "the free one is free"

        lab.send_event("payment.received", SUB1)
        lab.wait_for(lambda: tcp_connect(topo, s1.netns, "198.51.100.10", 443)[0] == "connected", timeout=10,
                     what="the paid customer let out (no stale ipset walling them)")
        assert topo.curl(s1.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK")
        log = lab.log()
        assert "event=other_backend_left" in log and "walled-portal4" in log, log
        assert "walled-portal4" in _in_gw(topo, "ipset", "list", "-n").split(), "named by a rule: it stays"
        assert "Number of entries: 0" in _in_gw(topo, "ipset", "list", "-t", "walled-portal4"), "but empty"
        status = lab.status()
        assert status is not None and "walled-portal4" in status["backend_switch"]["sets_left_emptied"], status
        text = subprocess.run([sys.executable, "-m", "enforcer.cli", "status", "--config", str(lab.config_path)],
                              capture_output=True, text=True, timeout=30)
        assert "old ipsets left empty: " in text.stdout and "walled-portal4" in text.stdout, text
    finally:
        lab.stop_daemon()
