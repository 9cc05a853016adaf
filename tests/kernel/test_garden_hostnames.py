"""``walled_garden.allow`` hostnames are resolved on the gateway and let through while restricted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import SUB1, tcp_connect

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology


@pytest.fixture
def gateway_hosts(topo: Topology) -> Iterator[Path]:
    """A hosts file only the gateway namespace sees (``ip netns exec`` bind-mounts it)."""
    folder = Path("/etc/netns") / topo.gateway.netns
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "hosts").write_text("127.0.0.1 localhost\n203.0.113.10 pay.garden.example\n"
                                  "2001:db8:203::10 pay.garden.example\n")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_allowed_hostname_is_reachable_other_hosts_are_not(topo: Topology, tmp_path: Path,
                                                           gateway_hosts: Path) -> None:
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64"]}]
    lab = Lab(topo, tmp_path, entries, allow=["pay.garden.example"])
    lab.start_daemon()
    try:
        restricted = topo.subscribers[0].netns
        lab.wait_for(lambda: topo.curl(restricted, "http://203.0.113.10/")[0] == 200, timeout=5,
                     what="garden host reachable by name")
        assert topo.curl(restricted, "http://[2001:db8:203::10]/")[:2] == (200, "GARDEN OK")
        assert tcp_connect(topo, restricted, "198.51.100.10", 443)[0] == "ECONNREFUSED"
        assert "event=garden_host_resolved host=pay.garden.example" in lab.log()
    finally:
        lab.stop_daemon()
