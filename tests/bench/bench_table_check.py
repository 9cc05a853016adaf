"""Benchmark of the table check: what it costs, and how long a repair takes.

    sudo .venv/bin/python tests/bench/bench_table_check.py [--sizes 10000,100000] [--repeat 5]

Per size, in a private network namespace: the cheap check (``Reconciler.check_kernel(False)``:
layout tag and one sentinel per set, one batch of element lookups), the full check
(``check_kernel(True)``: every element compared with the mirror), side by side with a raw
``nft list table`` of the same table (the listing the full check cannot avoid), and the repair
of one element deleted by hand (detection by the full check + ``sync_all(read_kernel=True)``).
Medians of ``--repeat`` rounds, alternating order, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from bench_dataplane import TABLE, nft_delete_table, subscribers  # noqa: E402
from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.config import parse_config  # noqa: E402
from enforcer.dataplane.kernel import KernelDataplane  # noqa: E402
from enforcer.dataplane.libnftables import Nftables  # noqa: E402
from enforcer.policy import Decision, PolicyInputs  # noqa: E402
from enforcer.reconciler import Reconciler, probe  # noqa: E402
from enforcer.table_layout import base_layout  # noqa: E402

CONFIG = f"state_dir: /tmp/wg-bench-check\nsubscribers: {{source: /dev/null}}\ngateway: {{table: {TABLE}}}\n"


def timed(fn: object) -> float:
    started = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - started


def run(sizes: list[int], repeat: int) -> None:
    config = parse_config(CONFIG)
    nft = Nftables()
    print(f"# table check at N subscribers (every fourth with an IPv6 /56); median of {repeat}, seconds")
    print("cheap: right after a write, on the kernel thread's context (as before) and on the reader's own (as now)")
    print(f"{'subscribers':>12} {'cheap kt':>9} {'cheap rd':>9} {'write':>8} {'full':>8} {'nft list':>9} "
          f"{'full/list':>9} {'repair 1 el.':>13}")
    for n in sizes:
        nft_delete_table(nft)
        decisions = PolicyInputs({s.id: s for s in subscribers(n)}, {}, {}).decide_all(0.0)
        reconciler = Reconciler(KernelDataplane(TABLE, nft), base_layout(config))
        reconciler.sync_all(decisions, read_kernel=True)
        cheap, cheap_reader, write, full, listing, repair = [], [], [], [], [], []
        reader = reconciler.dataplane.reader()
        for round_ in range(repeat):
            order = ("full", "list") if round_ % 2 == 0 else ("list", "full")
            for which in order:
                if which == "full":
                    full.append(timed(lambda reconciler=reconciler: check(reconciler, True)))
                else:
                    listing.append(timed(lambda: subprocess.run(["nft", "list", "table", "inet", TABLE],
                                                                check=True, stdout=subprocess.DEVNULL)))
            # a webhook's write, then the 5-second check: on the kernel thread's own context ...
            write.append(timed(lambda: nft.run(f"add element inet {TABLE} allowhost4 {{ 198.51.100.9 }}")))
            cheap.append(timed(lambda reconciler=reconciler: check(reconciler, False)))
            nft.run(f"delete element inet {TABLE} allowhost4 {{ 198.51.100.9 }}")
            # ... and on the reader's context, which the daemon now uses off the kernel thread
            cheap_reader.append(timed(lambda reader=reader, layout=reconciler.layout: probe(reader, layout)))
            victim = f"100.64.{(round_ // 250) % 256}.{round_ % 250 + 1}"
            nft.run(f"delete element inet {TABLE} portal4_32 {{ {victim} }}")

            def detect_and_repair(reconciler: Reconciler = reconciler,
                                  decisions: dict[str, Decision] = decisions) -> None:
                assert reconciler.check_kernel(True), "the deleted element went unnoticed"
                reconciler.sync_all(decisions, read_kernel=True)
                check(reconciler, True)
            repair.append(timed(detect_and_repair))
        m = statistics.median
        print(f"{n:>12} {m(cheap):>9.4f} {m(cheap_reader):>9.4f} {m(write):>8.4f} {m(full):>8.3f} "
              f"{m(listing):>9.3f} {m(full) / m(listing):>9.2f} {m(repair):>13.3f}")
    nft_delete_table(nft)


def check(reconciler: Reconciler, full: bool) -> None:
    problem = reconciler.check_kernel(full)
    assert not problem, f"the table drifted by itself: {problem}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    code = reexec_in_private_netns(__file__)
    if code is not None:
        return code
    run([int(s) for s in args.sizes.split(",")], args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
