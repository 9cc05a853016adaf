"""Conntrack flush passes on a busy gateway: what one pass costs as the conntrack table grows.

    sudo .venv/bin/python tests/bench/bench_conntrack.py [--sizes 0,20000,200000] [--repeat 3]

Runs in a private network namespace (created and removed here). For each size the table is
filled with that many established TCP entries (``conntrack -R``: IPv4 sources from
100.64.0.0/10, one in ten IPv6 from 2001:db8::/32), then one flush pass for a single
subscriber address that has two entries is timed, side by side in the same round:

* ``filtered``: ``Ctnetlink`` with a kernel-filtered dump (what a lone IPv4 event takes);
* ``full``: ``Ctnetlink`` with one dump of both families parsed here (what a flood takes);
* ``dual``: an IPv4 address plus an IPv6 /56, planned by the measured costs;
* ``tool``: ``conntrack -D -s ADDR`` (the fallback, and what most scripts do).

Each figure is the median of ``--repeat`` rounds; the entries deleted are put back between
rounds. CPU is the process's user + system time for the pass (the kernel's walk included).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.ctnetlink import Ctnetlink  # noqa: E402

SUBSCRIBER4, SUBSCRIBER6 = "100.127.255.7", "2001:db8:ffff:ff00::7"


def entry(source: str, destination: str, sport: int) -> str:
    return (f"-I -p tcp -s {source} -d {destination} --sport {sport} --dport 443 --state ESTABLISHED "
            "-t 3600 -u SEEN_REPLY")


def fill(count: int) -> None:
    """``count`` entries from many sources, plus two each from the subscriber's two addresses."""
    lines = []
    for i in range(count):
        if i % 10 == 9:
            lines.append(entry(f"2001:db8:{i % 65536:x}::{i // 65536 + 1:x}", "2001:db8:ffff::1", 10000 + i % 50000))
        else:
            lines.append(entry(str(ipaddress.ip_address(int(ipaddress.ip_address("100.64.0.1")) + i)), "192.0.2.1",
                               10000 + i % 50000))
    lines += [entry(SUBSCRIBER4, "192.0.2.1", 1000), entry(SUBSCRIBER4, "192.0.2.1", 1001),
              entry(SUBSCRIBER6, "2001:db8:ffff::1", 1000), entry(SUBSCRIBER6, "2001:db8:ffff::1", 1001)]
    with tempfile.NamedTemporaryFile("w", suffix=".ct") as handle:
        handle.write("\n".join(lines) + "\n")
        handle.flush()
        subprocess.run(["conntrack", "-R", handle.name], check=True, capture_output=True)


def put_back() -> None:
    """The subscriber's four entries again (a pass deleted them)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ct") as handle:
        handle.write("\n".join([entry(SUBSCRIBER4, "192.0.2.1", 1000), entry(SUBSCRIBER4, "192.0.2.1", 1001),
                                entry(SUBSCRIBER6, "2001:db8:ffff::1", 1000),
                                entry(SUBSCRIBER6, "2001:db8:ffff::1", 1001)]) + "\n")
        handle.flush()
        subprocess.run(["conntrack", "-R", handle.name], capture_output=True)   # existing ones: harmless error


def timed(action) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    deleted = action()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,20000,200000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    subprocess.run(["nft", "add table inet ctbench; add chain inet ctbench c { type filter hook forward priority 0; }; "
                           "add rule inet ctbench c ct state new counter"], check=True)
    host4, pair = ipaddress.ip_network(f"{SUBSCRIBER4}/32"), ipaddress.ip_network("2001:db8:ffff:ff00::/56")
    print(f"kernel {os.uname().release}; conntrack buckets "
          f"{Path('/proc/sys/net/netfilter/nf_conntrack_buckets').read_text().strip()}; "
          f"netns {os.environ['WG_BENCH_NETNS']}; median of {args.repeat}")
    print(f"{'entries':>8} | {'filtered ms':>11} {'cpu':>5} | {'full ms':>8} {'cpu':>5} | {'dual ms':>8} {'cpu':>5} "
          f"{'plan':>8} | {'tool ms':>8} {'cpu':>5} | full/filtered")
    for size in (int(s) for s in args.sizes.split(",")):
        subprocess.run(["conntrack", "-F"], capture_output=True)
        fill(size)
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in ("filtered", "full", "dual", "tool")}
        plans = []
        for _ in range(args.repeat):
            learned = Ctnetlink()                     # costs measured by earlier passes in this table
            learned.flush([host4], filtered=True)
            learned.flush([ipaddress.ip_network("198.51.100.1/32"), pair])
            learned.flush([ipaddress.ip_network("198.51.100.1/32")], filtered=False)
            for kind in ("filtered", "full", "dual", "tool"):
                put_back()
                fresh = Ctnetlink()
                if kind == "filtered":
                    results[kind].append(timed(lambda fresh=fresh: fresh.flush([host4], filtered=True)))
                elif kind == "full":
                    results[kind].append(timed(lambda fresh=fresh: fresh.flush([host4, pair])))
                elif kind == "dual":
                    results[kind].append(timed(lambda learned=learned: learned.flush([host4, pair])))
                    plans.append(learned.last_pass)
                else:
                    def tool() -> int:
                        run = subprocess.run(["conntrack", "-D", "-s", SUBSCRIBER4], capture_output=True, text=True)
                        return int(run.stderr.split("conntrack-tools): ")[1].split()[0])
                    results[kind].append(timed(tool))
                fresh.close()
            learned.close()
        med = {k: (statistics.median(r[0] for r in v) * 1000, statistics.median(r[1] for r in v) * 1000,
                   min(r[2] for r in v)) for k, v in results.items()}
        # the tool's CPU is in its own process: wall time is what it costs the caller
        print(f"{size:>8} | {med['filtered'][0]:>11.1f} {med['filtered'][1]:>5.0f} | {med['full'][0]:>8.1f} "
              f"{med['full'][1]:>5.0f} | {med['dual'][0]:>8.1f} {med['dual'][1]:>5.0f} "
              f"{max(plans, key=plans.count):>8} | "
              f"{med['tool'][0]:>8.1f} {'—':>5} | {med['full'][0] / med['filtered'][0]:.1f}x")
        deleted = {k: v[2] for k, v in med.items()}
        assert (deleted["filtered"] == 2 and deleted["full"] == 4 and deleted["dual"] == 4
                and deleted["tool"] == 2), deleted
    return 0


if __name__ == "__main__":
    sys.exit(main())
