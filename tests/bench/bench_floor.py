"""The floors under issue 16's cold-start and memory goals, measured side by side in one run.

    sudo .venv/bin/python tests/bench/bench_floor.py [--n 100000] [--rounds 5]

What no change to our own code can go below, because it is paid before the first list line
is read or after the last one is committed:

* **start-up**: a fresh interpreter importing what the daemon imports (``walled-garden run``
  before it reads anything) and what the webhook worker imports (aiohttp, standardwebhooks,
  prometheus_client): wall time and VmRSS, median of ``--rounds`` fresh processes; beside it a
  bare ``python -c pass``.
* **the commit**: ``nft -f`` of the transaction ``walled-garden render`` prints for N restricted
  subscribers (as ``bench_scale.py``), into a scratch namespace.
* **the parse**: ``parse_list`` of the same CSV list in one process, and the least any Python
  parser of it does (``csv.reader`` plus ``socket.inet_pton`` per address, no checks at all).

It then prints the floor of a cold start (start-up + the least parse + the commit) against the
goal (2 x ``nft -f``) and the floor of the memory (the two processes' start-up RSS) against
the goal (100 MB), so a reader can see which goal a Python daemon with these dependencies can
reach at all. Subscriber i is as in ``bench_scale.py``.
"""

from __future__ import annotations

import argparse
import csv
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

import yaml  # noqa: E402
from private_netns import reexec_in_private_netns  # noqa: E402
from scale_helpers import ScratchNetns, address_count, python_cli, use_this_checkout, write_list  # noqa: E402

from enforcer.gc_pause import gc_paused  # noqa: E402
from enforcer.subscribers import parse_list  # noqa: E402

GOAL_RATIO, GOAL_MB = 2.0, 100.0
#: What each process loads before it reads the list (enforcer/cli.py ``run``: the daemon, its
#: nftables backend and libnftables, the version metric; the worker's ``main``), then its VmRSS in KiB.
PROBES = {
    "bare interpreter": "pass",
    "daemon imports": ("import enforcer.cli, enforcer.service, enforcer.daemon, enforcer.process_metrics\n"
                       "from enforcer.dataplane.kernel import KernelDataplane\n"
                       "KernelDataplane('wg_floor')\n"           # libnftables loaded, as ``Enforcer()`` does
                       "enforcer.process_metrics.package_version()"),
    "webhook worker imports": ("import enforcer.webhook_worker, enforcer.api.listeners, enforcer.api.webhooks, "
                               "enforcer.logs"),
}
_PRINT_RSS = "\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"


def start_up(code: str, rounds: int) -> tuple[float, float]:
    """Median wall seconds and VmRSS MB of a fresh interpreter running ``code``."""
    seconds, rss = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code + _PRINT_RSS], capture_output=True, text=True,
                             timeout=60, check=True, cwd=HERE.parents[2]).stdout
        seconds.append(time.perf_counter() - started)
        rss.append(int(out.split()[-1]) / 1024)
    return statistics.median(seconds), statistics.median(rss)


def least_parse(text: str) -> float:
    """``csv.reader`` and ``inet_pton`` of every address: no check, no object kept."""
    started = time.perf_counter()
    for row in csv.reader(io.StringIO(text, newline="")):
        for item in row[1].split():
            address = item.partition("/")[0]
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
            except OSError:
                pass          # the header
    return time.perf_counter() - started


def commit(n: int, work: Path, rounds: int) -> float:
    """Median seconds of ``nft -f`` of the rendered transaction for n subscribers."""
    table = "wg_floor"
    list_path, config_path, rendered = work / "restricted.csv", work / "config.yaml", work / "rendered.nft"
    write_list(list_path, n, "csv")
    config_path.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"), "subscribers": {"source": str(list_path)},
        "gateway": {"subscriber_interfaces": ["wgfloor0"], "table": table,
                    "subscriber_prefixes": ["100.64.0.0/10", "2001:db8::/32"]},
        "walled_garden": {"allow": ["203.0.113.0/24"], "dns": "any"}}))
    with open(rendered, "w") as out:
        subprocess.run([*python_cli(), "render", "--config", str(config_path)], stdout=out, check=True, timeout=600)
    times = []
    for _ in range(rounds):
        with ScratchNetns() as netns:
            started = time.perf_counter()
            result = netns.run(["nft", "-f", str(rendered)], 600)
            times.append(time.perf_counter() - started)
            if result.returncode != 0:
                raise SystemExit(f"nft -f failed: {result.stderr[:500]}")
    return statistics.median(times)


def measure(n: int, rounds: int) -> int:
    print(f"# floors under a cold start and the memory, {n:,} subscribers ({address_count(n):,} addresses); "
          f"median of {rounds}\n")
    print(f"{'start-up':<28}{'seconds':>9}{'VmRSS MB':>10}")
    figures = {}
    for name, code in PROBES.items():
        figures[name] = start_up(code, rounds)
        print(f"  {name:<26}{figures[name][0]:>9.3f}{figures[name][1]:>10.1f}")
    with tempfile.TemporaryDirectory(prefix="wg-floor-") as tmp:
        work = Path(tmp)
        nft_s = commit(n, work, rounds)
        text = (work / "restricted.csv").read_text()
        ours, least = [], []
        for _ in range(rounds):
            with gc_paused():
                started = time.perf_counter()
                parse_list(text, "restricted.csv")
                ours.append(time.perf_counter() - started)
            least.append(least_parse(text))
    ours_s, least_s = statistics.median(ours), statistics.median(least)
    print(f"\n{'the list':<28}{'seconds':>9}")
    print(f"  {'parse_list (ours)':<26}{ours_s:>9.3f}")
    print(f"  {'csv + inet_pton, no checks':<26}{least_s:>9.3f}")
    print(f"  {'nft -f of the transaction':<26}{nft_s:>9.3f}")
    floor = figures["daemon imports"][0] + least_s + nft_s
    print(f"\ncold start floor (daemon start-up + least parse + nft -f): {floor:.3f} s = "
          f"{floor / nft_s:.2f}x nft -f (goal <= {GOAL_RATIO:g}x)")
    memory = figures["daemon imports"][1] + figures["webhook worker imports"][1]
    print(f"memory floor (daemon + worker after their imports, no subscriber): {memory:.1f} MB "
          f"(goal <= {GOAL_MB:g} MB with {n:,} subscribers)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (1 <= args.n <= 2_000_000 and 1 <= args.rounds <= 50):
        parser.error("--n 1..2,000,000, --rounds 1..50")
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    use_this_checkout()   # the start-up is timed with compiled bytecode, as an installed daemon has it
    return measure(args.n, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
