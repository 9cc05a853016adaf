"""A switch of ``gateway.backend`` leaves none of the other backend's objects behind
(``enforcer.backend_switch``), in a network namespace of the test's own."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from required import tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns() -> Iterator[str]:
    for name, package in (("nft", "nftables"), ("ipset", "ipset"), ("iptables-nft", "iptables"),
                          ("iptables-legacy", "iptables")):
        tool(name, package)
    name = f"wg-sw-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def inside(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=60,
                          check=check)


def switch_to(netns: str, backend: str, table: str) -> str:
    """``remove_other_backend`` as the daemon calls it, inside the namespace; what it removed."""
    code = ("import types, sys; from enforcer.backend_switch import remove_other_backend; "
            f"c = types.SimpleNamespace(gateway=types.SimpleNamespace(backend={backend!r}, table={table!r})); "
            "print(remove_other_backend(c))")
    return inside(netns, sys.executable, "-c", code, check=True).stdout


def test_to_ipset_the_nftables_table_goes_and_nothing_else(netns: str) -> None:
    table = "wg_switch_test"
    # ours: the comment every table of ours carries (kernel.table_owner)
    inside(netns, "nft", f"add table inet {table} {{ comment \"managed by walled-garden\"; }}\n"
                         "add table inet other_table\n"
                         f"add set inet {table} portal4_32 {{ type ipv4_addr; elements = {{ 100.64.0.5 }}; }}")
    assert "nftables table inet wg_switch_test" in switch_to(netns, "ipset", table)
    assert inside(netns, "nft", "list", "table", "inet", table, check=False).returncode != 0
    assert inside(netns, "nft", "list", "table", "inet", "other_table").returncode == 0   # not ours: kept
    assert switch_to(netns, "ipset", table).strip() == "[]"      # nothing left: nothing done


def test_to_nftables_our_ipsets_chains_and_jumps_go_and_nothing_else(netns: str) -> None:
    from enforcer.dataplane.ipset_sets import PREFIX

    ours, theirs = f"{PREFIX}portal4-32", "operator-debtors"
    for name in (ours, theirs):
        inside(netns, "ipset", "create", name, "hash:net")
    inside(netns, "ipset", "add", ours, "100.64.0.5")
    for variant in ("nft", "legacy"):
        ipt = f"iptables-{variant}"
        inside(netns, ipt, "-N", "WALLED-GARDEN-FWD")
        inside(netns, ipt, "-A", "WALLED-GARDEN-FWD", "-m", "set", "--match-set", ours, "src", "-j", "REJECT")
        inside(netns, ipt, "-I", "FORWARD", "1", "-j", "WALLED-GARDEN-FWD")
        inside(netns, ipt, "-A", "FORWARD", "-m", "set", "--match-set", theirs, "src", "-j", "DROP")
    removed = switch_to(netns, "nftables", "walled_garden")
    assert "iptables-nft" in removed and "iptables-legacy" in removed
    names = inside(netns, "ipset", "list", "-n").stdout.split()
    assert ours not in names and theirs in names
    for variant in ("nft", "legacy"):
        rules = inside(netns, f"iptables-{variant}", "-S").stdout
        assert "WALLED-GARDEN" not in rules
        assert f"--match-set {theirs} src -j DROP" in rules      # the operator's rule is untouched


def test_to_ipset_a_table_of_that_name_that_is_not_ours_is_left_alone(netns: str) -> None:
    """``gateway.table`` naming someone else's table: the start refuses it, and the switch
    never deletes it either."""
    table = "wg_switch_foreign"
    inside(netns, "nft", f"add table inet {table}\n"
                         f"add chain inet {table} input {{ type filter hook input priority 0; policy accept; }}\n"
                         f"add rule inet {table} input tcp dport 22 accept")
    assert switch_to(netns, "ipset", table).strip() == "[]"
    assert "tcp dport 22 accept" in inside(netns, "nft", "list", "table", "inet", table).stdout
