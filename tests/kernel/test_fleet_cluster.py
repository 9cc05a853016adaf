"""A fleet on a 3-node NATS cluster (issue 15, SPEC §11): the stream has three replicas, and one
node dies in the middle of a flood of billing events posted to both gateways. Billing retries
what it is answered 503 (same ``webhook-id``), so every event is answered 200 in the end, and
each is applied exactly once on both gateways: nothing lost, nothing twice."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from fleet_helpers import event, running_fleet, sid, wait_until
from nats_peers import client

from enforcer.demo.topology import Topology
from required import tool

PAYERS = 100       # listed and walled in; each pays once
NEWLY = 100        # not listed; each is restricted once by billing
FLOOD_DEADLINE = 60.0


def payer(i: int) -> tuple[str, str]:
    return f"C-2{i:03d}", f"100.64.200.{i + 1}"


def newly(i: int) -> tuple[str, str]:
    return f"C-3{i:03d}", f"100.64.201.{i + 1}"


def entries(topo: Topology) -> list[dict[str, Any]]:
    """Subscriber 1 at its own address (real traffic), the payers at addresses of their own."""
    listed = [{"id": sid(1), "addresses": [topo.subscribers[0].addr4], "reason": "overdue"}]
    return listed + [{"id": ident, "addresses": [address], "reason": "overdue"}
                     for ident, address in map(payer, range(PAYERS))]


def test_a_cluster_node_killed_mid_flood_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    tool("nats-server", "nats-server")
    def unguarded(config: dict[str, Any]) -> None:
        config["subscribers"]["guard"] = {"max_restrict": 10_000}    # the first list holds 101
    with running_fleet(tmp_path, entries, nodes=3, adjust=unguarded) as fleet:
        a, b = fleet.a, fleet.b
        info = client(a.topo.gateway.netns, "info", "--servers", ",".join(fleet.nats.urls), "--stream", "WALLED_GARDEN")
        assert info["replicas"] == 3 and info["leader"], info
        leader = info["leader"]

        flood = [event("payment.received", ident, f"msg_flood_pay_{i}") for i, (ident, _) in
                 enumerate(map(payer, range(PAYERS)))]
        flood += [event("subscriber.restricted", ident, f"msg_flood_restrict_{i}", addresses=[address],
                        reason="overdue") for i, (ident, address) in enumerate(map(newly, range(NEWLY)))]
        flood = flood[0::2] + flood[1::2]      # payments and restrictions interleaved ...
        to_a, to_b = flood[0::2], flood[1::2]  # ... and split between the gateways
        started = time.monotonic()
        sending = [a.post_async(*to_a, retry=True, deadline=FLOOD_DEADLINE, workers=6),
                   b.post_async(*to_b, retry=True, deadline=FLOOD_DEADLINE, workers=6)]

        def applied() -> int:
            status = a.lab.status() or {}
            return int((status.get("fleet") or {}).get("applied_sequence") or 0)
        wait_until(lambda: applied() >= len(flood) // 4, 30, "a quarter of the flood applied on A", interval=0.1,
                   detail=fleet.logs)
        fleet.nats.kill(leader)        # the stream's leader: the survivors must elect another
        killed_at = time.monotonic() - started

        results = [result for sender in sending for result in sender.result()]
        took = time.monotonic() - started
        statuses = Counter(status for result in results for status in result["attempts"])
        print(f"flood of {len(flood)}: leader {leader} killed at {killed_at:.1f}s, all answered in {took:.1f}s; "
              f"attempts by status {dict(statuses)}")
        failed = [result for result in results if result["status"] != 200
                  or result["answer"].get("result") != "applied"]
        assert not failed, (failed[:5], fleet.logs())
        assert set(statuses) <= {200, 503, 0}, statuses

        wait_until(lambda: all((g.lab.status() or {}).get("fleet", {}).get("applied_sequence") == len(flood)
                               for g in (a, b)), 30, "both gateways applied the whole flood", interval=0.2,
                   detail=fleet.logs)
        for gateway in (a, b):
            status = gateway.fleet_status()
            assert status["stream_last_sequence"] == len(flood), ("one message per event", status)
            changes = Counter(row["subscriber"] for row in gateway.audit(since_start=True))
            for ident, _ in map(payer, range(PAYERS)):
                assert changes[ident] == 1, (gateway.name, ident, gateway.audit(ident))
            for ident, _ in map(newly, range(NEWLY)):
                assert changes[ident] == 1, (gateway.name, ident, gateway.audit(ident))
            walled = set(gateway.kernel_set())
            assert walled == {gateway.addr(1), *(address for _, address in map(newly, range(NEWLY)))}, \
                (gateway.name, sorted(walled)[:10])
            assert gateway.redirected(1), "enforcement went on throughout"
        # The killed node comes back on its own store. Not waited for: NATS's own /healthz calls it
        # healthy only once every consumer replica is "current", which on nats-server 2.9 can take
        # minutes when nothing is acknowledged meanwhile (seen here); what this test owes is above.
        node = fleet.nats.server(leader)
        node.start()
        assert node.running
