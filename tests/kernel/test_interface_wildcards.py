"""``gateway.subscriber_interfaces`` with a prefix wildcard (``ppp*``), on the real kernel: a
PPPoE BNG has one interface per session, so the restriction must hold on every interface the
wildcard names, and on no other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

UPSTREAM = "http://198.51.100.10/"


@pytest.fixture
def both_restricted(topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """Both subscribers on the list; the interfaces are given by the test (``configure``)."""
    entries = [{"id": f"C-{i + 1}", "addresses": [s.addr4], "reason": "overdue"}
               for i, s in enumerate(topo.subscribers)]
    gateway = Lab(topo, tmp_path, entries)
    try:
        yield gateway
    finally:
        gateway.stop_daemon()
        (tmp_path / "daemon.log").exists() and print(gateway.log())


def configure(lab: Lab, interfaces: list[str]) -> None:
    lab.config["gateway"]["subscriber_interfaces"] = interfaces
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    lab.start_daemon()
    lab.start_portal()


def test_a_wildcard_restricts_on_every_interface_it_names_and_no_other(topo: Topology,
                                                                      both_restricted: Lab) -> None:
    first, second = topo.subscriber_interfaces      # <tag>g1, <tag>g2 on the gateway
    wildcard = first + "*"                           # names <tag>g1 (and <tag>g1x...), not <tag>g2
    assert not second.startswith(first)
    configure(both_restricted, [wildcard])
    status, _, headers, _ = topo.curl(topo.subscribers[0].netns, UPSTREAM)
    assert status == 302 and headers["location"] == both_restricted.portal_url, "the wildcard's interface"
    status, body, _, _ = topo.curl(topo.subscribers[1].netns, UPSTREAM)
    assert (status, body) == (200, "UPSTREAM OK"), "an interface the wildcard does not name is not ours"


def test_one_wildcard_for_all_session_interfaces(topo: Topology, both_restricted: Lab) -> None:
    first, second = topo.subscriber_interfaces
    prefix = first[:-1]                              # <tag>g: both interfaces start so
    assert second.startswith(prefix)
    configure(both_restricted, [prefix + "*"])
    for subscriber in topo.subscribers:
        status, _, headers, _ = topo.curl(subscriber.netns, UPSTREAM)
        assert status == 302 and headers["location"] == both_restricted.portal_url, subscriber.netns
