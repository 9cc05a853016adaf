"""A gateway of a fleet that lost its state while its table stayed in the kernel (SPEC §8: the
state is rebuilt from the kernel and the list; SPEC §11: every gateway decides the same).

The audit's repro through the real daemons: a payment on A lifts on both; its grace ends and both
wall again; B is stopped, its ``state_dir`` deleted (the table stays in B's kernel), and started:
it rebuilds from the kernel and the list, then replays the stream. The old payment must keep its
own instant on B (its grace long over: B walls, as A does), not count as received at B's restart
(a full grace again: free on B while A walls). A subscriber who paid moments before B stopped
stays free on B.

The same replay by a gateway that was only down: a notice acknowledged on A's portal while B was
down, over on A before B returns, lets nothing through on B either (it runs from A's instant).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import CATCH_UP_TIMEOUT, event, running_fleet, sid, wait_until
from test_fleet import acknowledge_on_portal

from enforcer.demo.topology import Topology
from required import tool

GRACE = 20.0            # policy.payment_grace (seconds): long enough for B's restart, short to wait out
ACK_FOR = 8.0           # portal.notice_ack_for (seconds): over before B is back
LIFT_BOUND = 5.0


@pytest.fixture(autouse=True)
def _nats_server() -> None:
    tool("nats-server", "nats-server")


def listed(topo: Topology) -> list[dict[str, Any]]:
    return [{"id": sid(i), "addresses": [topo.subscribers[i - 1].addr4], "reason": "overdue"} for i in (1, 2)]


def short_grace(config: dict[str, Any]) -> None:
    config["policy"]["payment_grace"] = f"{GRACE:g}s"


def test_a_gateway_rebuilt_from_its_kernel_does_not_free_an_old_payment(tmp_path: Path) -> None:
    with running_fleet(tmp_path, listed, adjust=short_grace) as fleet:
        a, b = fleet.a, fleet.b
        [paid] = a.post(event("payment.received", sid(1), "msg_lost_pay_old"))
        assert paid["status"] == 200, paid
        wait_until(lambda: b.reaches_upstream(1), LIFT_BOUND, "B lifts the subscriber A was paid for",
                   detail=fleet.logs)
        paid_at = a.cli_json("explain", sid(1))["payment_grace"]["paid_at"]
        wait_until(lambda: a.redirected(1) and b.redirected(1), GRACE + 15, "both wall again once the grace is over",
                   interval=0.5, detail=fleet.logs)
        [recent] = a.post(event("payment.received", sid(2), "msg_lost_pay_recent"))
        assert recent["status"] == 200, recent
        wait_until(lambda: b.reaches_upstream(2), LIFT_BOUND, "B lifts the one who paid just now", detail=fleet.logs)

        b.lab.stop_daemon()                               # the table stays in B's kernel ...
        assert b.addr(1) in b.kernel_set() and b.addr(2) not in b.kernel_set()
        shutil.rmtree(b.lab.work / "state")               # ... its state does not
        restarted = time.time()
        b.lab.start_daemon(timeout=CATCH_UP_TIMEOUT + 20.0)

        status = b.cli_json("status")
        assert status["state"]["rebuilt"] is not None, status["state"]   # rebuilt from the kernel, then replayed
        assert status["fleet"]["applied_sequence"] == a.fleet_status()["stream_last_sequence"], status["fleet"]
        explained = b.cli_json("explain", sid(1))
        assert explained["mode"] == "walled-garden", explained
        assert b.addr(1) in b.kernel_set() and b.redirected(1), "B walls the old payer, as A does"
        grace = explained["payment_grace"]      # the payment's own instant, not B's restart
        assert grace is None or abs(grace["paid_at"] - paid_at) < 1.0, (grace, paid_at, restarted)
        assert a.redirected(1)
        assert b.reaches_upstream(2), "the one who paid before B stopped stays free on B"
        time.sleep(1.0)                                   # and nothing later changes that (the timer's round)
        assert b.redirected(1) and b.addr(1) in b.kernel_set()


def test_a_gateway_back_from_down_does_not_let_an_old_acknowledgement_through(tmp_path: Path) -> None:
    def notice(topo: Topology) -> list[dict[str, Any]]:
        return [{"id": sid(1), "addresses": [topo.subscribers[0].addr4], "reason": "overdue"},
                {"id": sid(2), "addresses": [topo.subscribers[1].addr4], "reason": "overdue", "mode": "notice"}]

    def short_terms(config: dict[str, Any]) -> None:
        short_grace(config)
        config.setdefault("portal", {})["notice_ack_for"] = f"{ACK_FOR:g}s"

    with running_fleet(tmp_path, notice, adjust=short_terms) as fleet:
        a, b = fleet.a, fleet.b
        b.lab.stop_daemon()                               # B is down (its state stays)
        acknowledge_on_portal(a, 2)                       # "Continue" on A's portal ...
        assert a.reaches_upstream(2)
        [paid] = a.post(event("payment.received", sid(1), "msg_down_pay"))   # ... and a payment after it
        assert paid["status"] == 200, paid
        paid_at = a.cli_json("explain", sid(1))["payment_grace"]["paid_at"]
        wait_until(lambda: a.redirected(2), ACK_FOR + 10, "the acknowledgement ends on A", interval=0.5,
                   detail=fleet.logs)
        wait_until(lambda: a.redirected(1), GRACE + 15, "the grace ends on A", interval=0.5, detail=fleet.logs)

        b.lab.start_daemon(timeout=CATCH_UP_TIMEOUT + 20.0)   # READY=1 after the catch-up
        status = b.cli_json("status")
        assert status["fleet"]["applied_sequence"] == a.fleet_status()["stream_last_sequence"], status["fleet"]
        assert b.redirected(2), "B lets through an acknowledgement that ended on A before B came back"
        assert b.lab.lookup(b.addr(2)).get("ack_until") is None
        explained = b.cli_json("explain", sid(1))
        assert explained["mode"] == "walled-garden" and b.redirected(1), explained
        grace = explained["payment_grace"]
        assert grace is None or abs(grace["paid_at"] - paid_at) < 1e-3, (grace, paid_at)
