"""The fleet tests' NATS peers work: a nats-py client in a linked namespace reaches a real
``nats-server`` (single, and a 3-node cluster) through the namespaces, JetStream acks what it
publishes and deduplicates by ``Nats-Msg-Id``, a restarted server keeps its store, and a stream of
three replicas survives its leader killed. Nothing here touches the walled-garden code: when a
fleet test fails, this says whether the peers or the product are to blame."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_peers import SERVER_NET, FleetNet, client

from required import tool


@pytest.fixture
def single(tmp_path: Path) -> Iterator[tuple[FleetNet, str, str]]:
    tool("nats-server", "nats-server")
    with FleetNet(tmp_path / "nats") as net:
        yield net, net.add_client("a"), net.add_client("b")


def test_a_single_server_acks_deduplicates_and_keeps_its_store(single: tuple[FleetNet, str, str]) -> None:
    net, a, b = single
    url = net.urls[0]
    # Reachable only through our links: no default route in the NATS namespace or the clients.
    for ns in (net.netns, a, b):
        assert net_routes(ns, "default") == "", ns
    assert SERVER_NET in net_routes(a, SERVER_NET)

    first = client(a, "publish", "--servers", url, "--stream", "PEERS", "--count", "5", "--prefix", "x")
    assert [ack["seq"] for ack in first["acks"]] == [1, 2, 3, 4, 5], first
    # The same message ids from another namespace: deduplicated, the original sequences answered.
    again = client(b, "publish", "--servers", url, "--stream", "PEERS", "--count", "2", "--prefix", "x")
    assert [(ack["seq"], ack["duplicate"]) for ack in again["acks"]] == [(1, True), (2, True)], again

    # Killed: a client cannot publish (bounded); restarted on the same store: all five still there.
    net.kill("n1")
    down = client(a, "publish", "--servers", url, "--stream", "PEERS", "--count", "1", "--prefix", "y",
                  "--deadline", "1.5", timeout=20)
    assert "error" in down or "gave_up" in down, down
    net.restart("n1")
    info = client(b, "info", "--servers", url, "--stream", "PEERS")
    assert info["messages"] == 5 and info["data"] == [f"x-{i}" for i in range(5)], info


def test_a_three_node_cluster_keeps_an_r3_stream_through_its_leader_killed(tmp_path: Path) -> None:
    tool("nats-server", "nats-server")
    with FleetNet(tmp_path / "nats", nodes=3) as net:
        a, b = net.add_client("a"), net.add_client("b")
        servers = ",".join(net.urls)
        first = client(a, "publish", "--servers", servers, "--stream", "PEERS3", "--replicas", "3",
                       "--count", "20", "--prefix", "before")
        assert len(first["acks"]) == 20 and "gave_up" not in first, first
        info = client(b, "info", "--servers", servers, "--stream", "PEERS3")
        assert info["replicas"] == 3 and info["leader"] in {"n1", "n2", "n3"}, info
        leader = info["leader"]
        net.kill(leader)
        # The survivors elect a new leader; publishing goes on (retried meanwhile), nothing is lost.
        second = client(b, "publish", "--servers", servers, "--stream", "PEERS3", "--replicas", "3",
                        "--count", "20", "--prefix", "after", "--deadline", "30", timeout=60)
        assert len(second["acks"]) == 20 and "gave_up" not in second, (second, net.logs())
        info = client(a, "info", "--servers", servers, "--stream", "PEERS3")
        assert info["messages"] == 40 and info["leader"] not in {None, leader}, info
        assert info["data"] == [f"before-{i}" for i in range(20)] + [f"after-{i}" for i in range(20)]
        net.restart(leader)     # healthy again means it caught up with the stream
        assert client(a, "info", "--servers", net.server(leader).url, "--stream", "PEERS3")["messages"] == 40


def net_routes(netns: str, prefix: str) -> str:
    """``netns``'s IPv4 routes for ``prefix`` (``default`` for the default route), as ``ip`` prints them."""
    result = subprocess.run(["ip", "netns", "exec", netns, "ip", "-4", "route", "show", prefix],
                            capture_output=True, text=True, timeout=10, check=True)
    return result.stdout.strip()
