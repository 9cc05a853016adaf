"""A notice acknowledgement leaves an address with its subscriber, in the same commit, on the real
kernel (unit level: tests/unit/test_acks_follow_subscribers.py).

An element diff that takes an address from acknowledged subscriber A drops that address's
``noticeack`` element and adds one at the address A gains (``Reconciler._move_acknowledgements``).
The element may be gone already (the kernel let it expire), and nft 1.0.6 has no ``destroy
element`` while a ``delete element`` of an absent one fails the whole transaction (ENOENT): the
drop is an ``add`` then a ``delete`` in one transaction (``transaction.DropElements``); the ipset
backend's is ``del -exist``. Each case runs the reconciler on the real backend in a network
namespace of its own (a ``python`` started with ``ip netns exec``) and reads the acknowledgement
set back with ``nft``/``ipset`` after each step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import scratch_netns

from required import tool

TABLE = "wg_ackmove_test"
ROOT = Path(__file__).resolve().parents[2]   # this checkout: the code the subprocess runs

#: The steps, on ``nft`` or ``ipset`` (argv[1]); prints, as JSON, the acknowledgement set (key ->
#: timeout, as the tool lists it) and the owner of each address after each step.
SCRIPT = textwrap.dedent(f"""
    import json, subprocess, sys
    from ipaddress import ip_network
    from enforcer.dataplane.layout import Layout
    from enforcer.dataplane.transaction import DeleteElements, Transaction
    from enforcer.model import Mode
    from enforcer.policy import Decision
    from enforcer.reconciler import Reconciler
    from enforcer.subscribers import Subscriber, parse_address

    backend = sys.argv[1]
    layout = Layout({TABLE!r}, ("wgack0",), (ip_network("203.0.113.0/24"),), None, 8080)
    if backend == "nft":
        from enforcer.dataplane.kernel import KernelDataplane
        dataplane = KernelDataplane({TABLE!r})
    else:
        from enforcer.dataplane.ipset import IpsetDataplane
        dataplane = IpsetDataplane({TABLE!r}, rules="external", base=layout)
    rec = Reconciler(dataplane, layout)

    def notice(sid, *addresses):
        held = tuple(parse_address("100.64.0." + a) for a in addresses)
        return Decision(sid, Mode.NOTICE, "overdue", Subscriber(sid, held, Mode.NOTICE, "overdue"))

    def acks():
        if backend == "nft":
            data = json.loads(subprocess.run(["nft", "-j", "list", "set", "inet", {TABLE!r}, "noticeack4_32"],
                                             capture_output=True, text=True, check=True).stdout)
            (found,) = [obj["set"] for obj in data["nftables"] if "set" in obj]
            return {{item["elem"]["val"]: item["elem"].get("timeout") for item in found.get("elem", [])}}
        out = {{}}
        for line in subprocess.run(["ipset", "save", "walled-noticeack4-32"], capture_output=True, text=True,
                                   check=True).stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["add"]:
                out[parts[2]] = int(parts[4])   # ipset keeps what is left: its timeout, a second less at most
        return out

    def owners():
        return {{k: rec.owner_of("mode4_32", "100.64.0." + k) for k in ("10", "11", "20", "21")}}

    steps = {{}}
    a, b = notice("C-1", "10"), notice("C-2", "11")
    rec.sync_all({{"C-1": a, "C-2": b}}, read_kernel=True)
    rec.acknowledge(a, 3600)
    steps["acknowledged"] = acks()
    # the list gives A's .10 to B (never acknowledged) and A .20
    a, b = notice("C-1", "20"), notice("C-2", "11", "10")
    rec.update({{"C-1": a, "C-2": b}}, {{"C-1": 3000}})
    steps["moved"] = [acks(), owners()]
    # B acknowledges; A's .20 goes to B too: B's time on it, not what A had left
    rec.acknowledge(b, 1800)
    a, b = notice("C-1", "21"), notice("C-2", "11", "10", "20")
    rec.update({{"C-1": a, "C-2": b}}, {{"C-1": 2900, "C-2": 1700}})
    steps["between"] = [acks(), owners()]
    # A's element expired in the kernel, then A paid: the drop finds nothing, the change commits
    dataplane.apply(Transaction({TABLE!r}, [DeleteElements("noticeack4_32", ("100.64.0.21",))]))
    rec.update({{"C-1": Decision("C-1", Mode.FREE, "paid")}}, {{"C-1": 0}})
    steps["paid"] = [acks(), owners()]
    print(json.dumps(steps))
""")


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def steps(self, backend: str) -> dict[str, object]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", SCRIPT, backend],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result



@pytest.fixture
def ns() -> Iterator[Namespace]:
    with scratch_netns("wg-ackmove") as name:   # the table and the sets go with it
        yield Namespace(name)


def _close(found: dict[str, int], wanted: dict[str, int]) -> bool:
    """ipset lists what is left (a second or two below the timeout given); nft the timeout itself."""
    return found.keys() == wanted.keys() and all(wanted[k] - 5 <= found[k] <= wanted[k] for k in wanted)


@pytest.mark.parametrize("backend", ["nft", "ipset"])
def test_an_acknowledgement_follows_its_subscriber_in_the_kernel(ns: Namespace, backend: str) -> None:
    tool("nft", "nftables")
    if backend == "ipset":
        tool("ipset", "ipset")
    steps = ns.steps(backend)
    assert _close(steps["acknowledged"], {"100.64.0.10": 3600}), steps   # type: ignore[arg-type]
    (found, owners) = steps["moved"]   # type: ignore[misc]
    assert owners == {"10": "C-2", "11": "C-2", "20": "C-1", "21": None}
    assert _close(found, {"100.64.0.20": 3000}), found   # not on B's .10 any more
    (found, owners) = steps["between"]   # type: ignore[misc]
    assert owners == {"10": "C-2", "11": "C-2", "20": "C-2", "21": "C-1"}
    assert _close(found, {"100.64.0.21": 2900, "100.64.0.10": 1800, "100.64.0.11": 1800, "100.64.0.20": 1700}), found
    (found, owners) = steps["paid"]   # type: ignore[misc]
    assert owners == {"10": "C-2", "11": "C-2", "20": "C-2", "21": None}
    assert _close(found, {"100.64.0.10": 1800, "100.64.0.11": 1800, "100.64.0.20": 1700}), found
