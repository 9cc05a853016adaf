"""A table whose structure was changed by hand is repaired, with real traffic (SPEC 7; found by a
fault-injection audit): ``nft delete rule`` of the forward hook's ``iifname ... jump
from_subscriber`` or ``nft add table ... { flags dormant; }`` frees the restricted subscriber
while every element, sentinel and mark is still there. The table check (every
``service.TABLE_CHECK_SECONDS``) notices and replaces the table; a start notices before it
enforces anything. The same for the ipset backend's own chains (``rules: own``): a rule deleted
inside them, or a jump deleted while the daemon was down.

Subscriber 1 (``topo.subscribers[0]``) is restricted, subscriber 2 free; "refused" is a TCP
connect to the upstream host on 443 answered by the garden chain's reset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kernel_helpers import SUB1, tcp_connect
from test_backends import _tools

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from enforcer.service import TABLE_CHECK_SECONDS

HOST = "198.51.100.10"


def _refused(topo: Topology, index: int = 0) -> bool:
    return tcp_connect(topo, topo.subscribers[index].netns, HOST, 443)[0] == "ECONNREFUSED"


def _free(topo: Topology, index: int = 0) -> bool:
    return tcp_connect(topo, topo.subscribers[index].netns, HOST, 443)[0] == "connected"


def _gw(topo: Topology, *argv: str) -> str:
    return topo.run(topo.gateway.netns, *argv, check=True).stdout


def delete_jump(topo: Topology, lab: Lab) -> None:
    """The audit's repro: the forward hook's ``iifname ... jump from_subscriber`` rule deleted."""
    listing = _gw(topo, "nft", "-a", "list", "chain", "inet", lab.table, "forward")
    (handle,) = [line.rsplit("# handle ", 1)[1] for line in listing.splitlines() if "jump from_subscriber" in line]
    _gw(topo, "nft", "delete", "rule", "inet", lab.table, "forward", "handle", handle.strip())
    assert "jump from_subscriber" not in _gw(topo, "nft", "list", "chain", "inet", lab.table, "forward")


def make_dormant(topo: Topology, lab: Lab) -> None:
    _gw(topo, "nft", "add", "table", "inet", lab.table, "{ flags dormant; }")
    assert "flags dormant" in _gw(topo, "nft", "list", "table", "inet", lab.table)


DAMAGES: list[Callable[[Topology, Lab], None]] = [delete_jump, make_dormant]


def _repaired_status(lab: Lab, check: str) -> None:
    """The repair counted and shown (once its sync is done: the traffic may be refused again a
    moment before, as the ipset backend runs the iptables tools after its swaps)."""
    lab.wait_for(lambda: (lab.status() or {}).get("kernel_in_sync") is True, timeout=5, what="kernel_in_sync")
    status = lab.status()
    assert status is not None
    assert status["table_repairs"] >= 1
    problem = status["table"]["last_problem"]
    assert problem is not None and problem["check"] == check and "structure changed" in problem["detail"], problem
    assert status["table"]["structure"], "the reference the checks compare with"


def _no_repair_loop(lab: Lab) -> None:
    """The repaired table matches the new reference: the next checks find nothing."""
    before = lab.status()["table_repairs"]   # type: ignore[index]
    time.sleep(TABLE_CHECK_SECONDS + 1.5)
    assert lab.status()["table_repairs"] == before, lab.log()   # type: ignore[index]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_a_structure_changed_by_hand_is_repaired_within_the_check_interval(
        topo: Topology, lab: Lab, damage: Callable[[Topology, Lab], None]) -> None:
    assert _refused(topo) and _free(topo, 1)
    damage(topo, lab)
    assert _free(topo), "the hand change freed the restricted subscriber"
    waited = lab.wait_for(lambda: _refused(topo), timeout=TABLE_CHECK_SECONDS + 10, what="the table repaired")
    assert waited < TABLE_CHECK_SECONDS + 5, waited
    assert "event=table_lost" in lab.log() and "structure changed" in lab.log()
    _repaired_status(lab, "quick")
    _no_repair_loop(lab)
    assert lab.lookup(topo.subscribers[0].addr4)["restricted"]
    assert _free(topo, 1), "the free one stays free"
    assert topo.curl(topo.subscribers[0].netns, f"http://{HOST}/")[0] == 302, "redirected to the portal again"


@pytest.mark.parametrize("damage, kill", [(delete_jump, False), (make_dormant, True)],
                         ids=["delete_jump-stopped", "make_dormant-killed"])
def test_a_structure_changed_while_the_daemon_was_down_is_repaired_at_the_start(
        topo: Topology, lab: Lab, damage: Callable[[Topology, Lab], None], kill: bool) -> None:
    lab.stop_daemon(kill=kill)
    assert _refused(topo), "the table enforces while the daemon is down"
    damage(topo, lab)
    assert _free(topo)
    lab.start_daemon()
    assert _refused(topo), "repaired by the start itself, before the first check"
    log = lab.log()
    assert "event=table_lost" in log and "check=start" in log, log
    _repaired_status(lab, "start")
    assert lab.status()["table_repairs"] == 1
    assert _free(topo, 1)
    assert "flags dormant" not in _gw(topo, "nft", "list", "table", "inet", lab.table)
    assert "jump from_subscriber" in _gw(topo, "nft", "list", "chain", "inet", lab.table, "forward")
    lab.stop_daemon(kill=True)   # and a restart over the repaired table trusts it, as before
    lab.start_daemon()
    assert "event=kernel_trusted" in lab.log() and lab.status()["table_repairs"] == 0
    assert _refused(topo)


# -- the ipset backend's own chains (``rules: own``) ----------------------------------------------------

@pytest.fixture
def ipset_lab(topo: Topology, tmp_path: Path) -> Lab:
    _tools("ipset-nft")
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4], "reason": "overdue"}]
    lab = Lab(topo, tmp_path / "ipset", entries)
    lab.config["gateway"]["backend"] = "ipset"
    lab.config["gateway"]["ipset"] = {"rules": "own", "iptables": "nft"}
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    return lab


def _delete_garden_goto(topo: Topology) -> None:
    """The rule sending walled-garden members to ``WALLED-GARDEN-GARDEN`` deleted from ``-UP``."""
    _gw(topo, "iptables-nft", "-D", "WALLED-GARDEN-UP", "-m", "set", "--match-set", "walled-portal4", "src",
        "-g", "WALLED-GARDEN-GARDEN")


def test_ipset_a_rule_deleted_inside_our_chains_is_repaired_within_the_check_interval(
        topo: Topology, ipset_lab: Lab) -> None:
    """The quick check used to see only our jumps and the stamp; a rule deleted inside our chains
    waited for the full check, ten minutes."""
    lab = ipset_lab
    try:
        lab.start_daemon()
        assert _refused(topo) and _free(topo, 1)
        _delete_garden_goto(topo)
        assert _free(topo), "the deleted rule freed the walled-garden subscriber"
        waited = lab.wait_for(lambda: _refused(topo), timeout=TABLE_CHECK_SECONDS + 10, what="our chains repaired")
        assert waited < TABLE_CHECK_SECONDS + 5, waited
        assert "event=table_lost" in lab.log() and "chain WALLED-GARDEN-UP ipv4" in lab.log()
        _repaired_status(lab, "quick")
        _no_repair_loop(lab)
        assert _free(topo, 1)
    finally:
        lab.stop_daemon()


@pytest.mark.parametrize("damage", ["rule", "jump"])
def test_ipset_our_chains_changed_while_the_daemon_was_down_are_repaired_at_the_start(
        topo: Topology, ipset_lab: Lab, damage: str) -> None:
    lab = ipset_lab
    try:
        lab.start_daemon()
        assert _refused(topo)
        lab.stop_daemon()
        if damage == "rule":
            _delete_garden_goto(topo)
        else:
            _gw(topo, "iptables-nft", "-D", "FORWARD", "-j", "WALLED-GARDEN-FWD")
        assert _free(topo)
        lab.start_daemon()
        assert _refused(topo), "repaired by the start itself"
        assert "event=table_lost" in lab.log() and "check=start" in lab.log()
        status = lab.status()
        assert status is not None and status["table_repairs"] == 1
        assert status["table"]["last_problem"]["check"] == "start"
        assert _free(topo, 1)
        assert _gw(topo, "iptables-nft", "-S", "FORWARD").count("-j WALLED-GARDEN-FWD") == 1
    finally:
        lab.stop_daemon()
