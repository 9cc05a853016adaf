"""A restart trusts the kernel table only when it is provably as the daemon left it (issue 16).

The daemon's last transaction wrote a digest mark naming the ruleset generation it committed as
(``Reconciler._carries``): a start with nothing committed since takes the table as it is, without
reading it back; after any ``nft`` edit while the daemon was down, the table is read back and
repaired, so the edit never frees (or walls) anyone.
"""

from __future__ import annotations

from kernel_helpers import SUB1

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

UPSTREAM = "http://198.51.100.10/"


def _restarts(lab: Lab) -> list[str]:
    return [line for line in lab.log().splitlines() if "event=kernel_trusted" in line or "event=restored" in line]


def test_a_restart_with_nothing_committed_since_trusts_the_table(topo: Topology, lab: Lab) -> None:
    lab.stop_daemon(kill=True)
    lab.start_daemon()
    assert lab.lookup(topo.subscribers[0].addr4)["restricted"]
    assert any("event=kernel_trusted" in line for line in _restarts(lab)), lab.log()
    assert topo.curl(topo.subscribers[0].netns, UPSTREAM)[0] == 302
    assert topo.curl(topo.subscribers[1].netns, UPSTREAM)[:2] == (200, "UPSTREAM OK")


def test_an_element_deleted_while_the_daemon_was_down_is_put_back(topo: Topology, lab: Lab) -> None:
    restricted = topo.subscribers[0]
    lab.stop_daemon(kill=True)
    topo.run(topo.gateway.netns, "nft", "delete", "element", "inet", lab.table, "portal4_32",
             f"{{ {restricted.addr4} }}", check=True)
    assert topo.curl(restricted.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK"), "the edit freed them"
    before = len(_restarts(lab))
    lab.start_daemon()
    started = _restarts(lab)[before:]
    assert not any("event=kernel_trusted" in line for line in started), started
    assert topo.curl(restricted.netns, UPSTREAM)[0] == 302, "the read-back restores the restriction"
    assert lab.lookup(restricted.addr4)["subscriber"] == SUB1


def test_an_element_added_while_the_daemon_was_down_is_taken_out(topo: Topology, lab: Lab) -> None:
    free = topo.subscribers[1]
    lab.stop_daemon(kill=True)
    topo.run(topo.gateway.netns, "nft", "add", "element", "inet", lab.table, "portal4_32",
             f"{{ {free.addr4} }}", check=True)
    assert topo.curl(free.netns, UPSTREAM)[0] == 302, "the edit walled them"
    before = len(_restarts(lab))
    lab.start_daemon()
    assert not any("event=kernel_trusted" in line for line in _restarts(lab)[before:])
    assert topo.curl(free.netns, UPSTREAM)[:2] == (200, "UPSTREAM OK")
