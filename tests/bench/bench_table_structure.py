"""Benchmark of the table check's structure comparison: what it costs, and that it reads no element.

    sudo .venv/bin/python tests/bench/bench_table_structure.py [--sizes 1000,100000] [--repeat 9]

Per size, in a private network namespace, right after a write (a payment: nft 1.0.6 then reloads
its cache on the next listing): ``KernelDataplane.structure`` (netlink dumps of the table's own
objects: table, chains, rules, set declarations, the static and anonymous sets' elements), on the
kernel thread's context and on the reader's, beside ``nft -t -s list table`` through libnftables
(terse and stateless: the structure as text, the alternative the reconciler's docstring weighs),
and the cheap element lookups (``holds_layout``) the check ran before. Medians, seconds.
"""

from __future__ import annotations

import argparse
import statistics
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
from enforcer.dataplane.libnftables import Nftables, _load  # noqa: E402
from enforcer.policy import PolicyInputs  # noqa: E402
from enforcer.reconciler import Reconciler  # noqa: E402
from enforcer.table_layout import base_layout  # noqa: E402

CONFIG = (f"state_dir: /tmp/wg-bench-structure\nsubscribers: {{source: /dev/null}}\n"
          f"gateway: {{table: {TABLE}, subscriber_interfaces: [sub0, sub1]}}\n"
          "walled_garden: {allow: [192.0.2.0/24], dns: [192.0.2.53], ntp: [192.0.2.123]}\n")
#: libnftables output flags (libnftables.h): terse, stateless, numeric.
TERSE, STATELESS, NUMERIC = 1 << 11, 1 << 2, (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)


def terse_listing() -> object:
    """A libnftables context listing the table terse and stateless (no elements printed)."""
    lib = _load()
    ctx = lib.nft_ctx_new(0)
    lib.nft_ctx_output_set_flags(ctx, TERSE | STATELESS | NUMERIC)
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)

    def run() -> None:
        if lib.nft_run_cmd_from_buffer(ctx, f"list table inet {TABLE}".encode()) != 0:
            raise RuntimeError(lib.nft_ctx_get_error_buffer(ctx))
    return run


def median(fn: object, repeat: int, before: object) -> float:
    out = []
    for _ in range(repeat):
        before()  # type: ignore[operator]
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - started)
    return statistics.median(out)


def run(sizes: list[int], repeat: int) -> None:
    config = parse_config(CONFIG)
    nft = Nftables()
    listing = terse_listing()
    print(f"# structure check at N subscribers (every fourth with an IPv6 /56); median of {repeat}, seconds,")
    print("# each right after a write (a payment)")
    print(f"{'subscribers':>12} {'structure':>10} {'on reader':>10} {'nft -t -s list':>15} {'lookups':>8} "
          f"{'parts':>6}")
    for n in sizes:
        nft_delete_table(nft)
        dataplane = KernelDataplane(TABLE, nft)
        reconciler = Reconciler(dataplane, base_layout(config))
        reconciler.sync_all(PolicyInputs({s.id: s for s in subscribers(n)}, {}, {}).decide_all(0.0),
                            read_kernel=True)
        layout = reconciler.layout
        assert layout is not None and reconciler.structure is not None
        reader = dataplane.reader()

        def write() -> None:
            nft.run(f"add element inet {TABLE} allowhost4 {{ 198.51.100.9 }}")
            nft.run(f"delete element inet {TABLE} allowhost4 {{ 198.51.100.9 }}")

        own = median(lambda d=dataplane, lay=layout: d.structure(lay), repeat, write)
        off = median(lambda r=reader, lay=layout: r.structure(lay), repeat, write)
        text = median(listing, repeat, write)
        lookups = median(lambda r=reader, lay=layout: r.holds_layout(lay.tag, lay.containers()), repeat, write)
        assert dataplane.structure(layout).fingerprint == reconciler.structure.fingerprint
        print(f"{n:>12} {own:>10.4f} {off:>10.4f} {text:>15.4f} {lookups:>8.4f} "
              f"{len(reconciler.structure.parts):>6}")
    nft_delete_table(nft)


def main() -> int:
    code = reexec_in_private_netns(__file__)
    if code is not None:
        return code
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    run([int(s) for s in args.sizes.split(",")], args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
