"""The ipset backend (issue 19) side by side with a raw ``ipset restore`` of the same elements and
with the nftables backend: cold load, one payment, and reading the sets back (a start).

    sudo .venv/bin/python tests/bench/bench_ipset.py [--size 100000] [--repeat 3] [--payments 20]

Runs itself inside a private network namespace (``private_netns``), so it touches neither the
machine's ipsets nor its iptables or nftables rules. The subscribers are ``bench_dataplane``'s
(every fourth with an IPv6 /56 too). One run measures every path, alternating their order round
by round, because the machine is shared and noisy; medians are reported.

* cold load: the reconciler's full sync from nothing. ipset backend: fresh sets filled by one
  ``ipset restore`` and swapped in, then our iptables chains (``rules: own``, iptables-restore
  per family); raw: ``ipset restore`` of the same sets and elements under their final names
  (``walled-garden render``'s ipset part); nftables: the table and its elements, one libnftables
  transaction (``bench_dataplane``'s cold load).
* one payment: ``Reconciler.update`` lifting one subscriber (what a payment event runs on the
  kernel thread, without the conntrack flush and the state write). ipset: one ``ipset restore``
  process with the diff's lines; raw: ``ipset restore`` of the same ``del`` lines; nftables: one
  libnftables transaction.
* read back: ``Dataplane.read()`` of the whole table (the ipset backend does it at every start,
  having no generation to trust a digest mark with).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from bench_dataplane import TABLE, nft_delete_table, subscribers  # noqa: E402
from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.config import Config, parse_config  # noqa: E402
from enforcer.dataplane.fake import FakeDataplane  # noqa: E402
from enforcer.dataplane.ipset import IpsetDataplane, render  # noqa: E402
from enforcer.dataplane.ipset_sets import element, set_name  # noqa: E402
from enforcer.dataplane.kernel import KernelDataplane  # noqa: E402
from enforcer.dataplane.layout import elements_for  # noqa: E402
from enforcer.dataplane.libnftables import Nftables  # noqa: E402
from enforcer.model import Mode  # noqa: E402
from enforcer.policy import Decision, PolicyInputs  # noqa: E402
from enforcer.reconciler import Reconciler  # noqa: E402
from enforcer.table_layout import base_layout  # noqa: E402

PATHS = ("ipset", "raw", "nftables")


def _ipset_restore(text: str) -> float:
    started = time.perf_counter()
    subprocess.run(["ipset", "restore"], input=text, text=True, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class Bench:
    def __init__(self, config: Config, n: int) -> None:
        self.config, self.layout = config, base_layout(config)
        self.subs = subscribers(n)
        self.decisions = PolicyInputs({s.id: s for s in self.subs}, {}, {}).decide_all(0.0)
        self.ipset = IpsetDataplane(TABLE, "own", "auto", self.layout)
        self.nft = Nftables()
        fake = FakeDataplane(TABLE)
        Reconciler(fake, self.layout).sync_all(self.decisions)
        self.raw_sets = "".join(render(tx, "external") for tx in fake.transactions).split("\n", 1)[1]
        self.elements = sum(len(s.addresses) for s in self.subs)
        self.reconcilers: dict[str, Reconciler] = {}

    def clean(self) -> None:
        self.ipset.remove_everything()
        nft_delete_table(self.nft)

    def cold(self, path: str) -> float:
        self.clean()
        if path == "raw":
            return _ipset_restore(self.raw_sets)
        dataplane = self.ipset if path == "ipset" else KernelDataplane(TABLE, self.nft)
        reconciler = Reconciler(dataplane, self.layout)   # type: ignore[arg-type]
        seconds = _timed(lambda: reconciler.sync_all(self.decisions, read_kernel=True))
        self.reconcilers[path] = reconciler
        return seconds

    def payment(self, path: str, i: int) -> float:
        """Lift subscriber ``i`` in the table ``path`` loaded last (cold)."""
        sub = self.subs[i]
        if path == "raw":
            lines = [f"del {set_name(container)} {element(container, key)}\n"
                     for network in sub.addresses for container, key, _ in elements_for(network, Mode.WALLED_GARDEN)]
            return _ipset_restore("".join(lines))
        reconciler = self.reconcilers[path]
        return _timed(lambda: reconciler.update({sub.id: Decision(sub.id, Mode.FREE, "payment")}))

    def read_back(self, path: str) -> float:
        dataplane = IpsetDataplane(TABLE, "own", "auto", self.layout) if path == "ipset" else \
            KernelDataplane(TABLE, self.nft)
        return _timed(dataplane.read)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--payments", type=int, default=20, help="payments per path and round")
    args = parser.parse_args()
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    with tempfile.TemporaryDirectory() as work:
        config = parse_config(
            f"state_dir: {work}/state\nsubscribers:\n  source: {work}/list.csv\n"
            f"gateway:\n  subscriber_interfaces: [eth1]\n  table: {TABLE}\n  backend: ipset\n"
            "walled_garden:\n  allow: ['203.0.113.0/24']\n")
        bench = Bench(config, args.size)
        versions = [subprocess.run(argv, capture_output=True, text=True).stdout.split("\n")[0].strip()
                    for argv in (["ipset", "-v"], ["iptables", "-V"], ["nft", "--version"])]
        print(f"{'; '.join(versions)}; kernel {os.uname().release}; netns {os.environ['WG_BENCH_NETNS']}; "
              f"iptables variant {bench.ipset.variant}")
        print(f"{args.size} restricted subscribers, {bench.elements} elements; median of {args.repeat} rounds "
              f"(payments: {args.payments} per path and round)")
        cold: dict[str, list[float]] = {p: [] for p in PATHS}
        pay: dict[str, list[float]] = {p: [] for p in PATHS}
        read: dict[str, list[float]] = {"ipset": [], "nftables": []}
        try:
            for round_ in range(args.repeat):
                order = PATHS if round_ % 2 == 0 else tuple(reversed(PATHS))
                for path in order:
                    cold[path].append(bench.cold(path))
                    for k in range(args.payments):
                        pay[path].append(bench.payment(path, (round_ * args.payments + k) * 7919 % args.size))
                    if path in read:
                        read[path].append(bench.read_back(path))
        finally:
            bench.clean()
        med = {p: statistics.median(v) for p, v in cold.items()}
        print("\n# cold load (s)")
        print(f"{'ipset backend':>14} {'ipset restore':>14} {'nftables':>9} {'ipset/raw':>10} {'ipset/nft':>10}")
        print(f"{med['ipset']:>14.3f} {med['raw']:>14.3f} {med['nftables']:>9.3f} "
              f"{med['ipset'] / med['raw']:>10.2f} {med['ipset'] / med['nftables']:>10.2f}")
        print("\n# one payment, kernel write (ms): median / max")
        print("  ".join(f"{p}: {statistics.median(v) * 1000:.2f} / {max(v) * 1000:.2f}" for p, v in pay.items()))
        print("\n# read back the whole table (s, Dataplane.read)")
        print("  ".join(f"{p}: {statistics.median(v):.3f}" for p, v in read.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
