"""The DNS forwarder's overhead (issue 14): the same resolver queried directly and through the forwarder.

    sudo .venv/bin/python tests/bench/bench_dns.py [--rates 1000,5000] [--seconds 10] [--rounds 2]
        [--allowed-share 0.1] [--names 20000]

Goal: at most 1 ms added at p99 at 5,000 queries/s.

Setup, all in namespaces of its own (a ``Topology`` with a random tag, removed at the end, also
on failure or Ctrl-C): the daemon (``Lab``) with ``walled_garden.dns: gateway``, allow
``*.psp.example``, its forwarder's per-subscriber rate limit lifted (one client sends the whole
load); subscriber 1 restricted, subscriber 2 free. The resolver is Debian's dnsmasq on
198.51.100.53 in the upstream namespace answering from a hosts file (``--addn-hosts``, local TTL
300 s): a fast, fixed-answer resolver, so what differs between the two paths is the forwarder.

* ``direct``: dnsperf in the free subscriber's namespace sends to 198.51.100.53; the gateway
  forwards the packets (the same hops, no forwarder).
* ``dnsmasq``: the same free subscriber, its DNS redirected (a table of the bench's own, the same
  ``redirect`` as the daemon's) to Debian's dnsmasq on the gateway forwarding to the same
  resolver without a cache: a mature C forwarder in the forwarder's place, the reference for
  what one more userspace hop costs on this machine;
* ``forwarder``: dnsperf in the restricted subscriber's namespace sends to the same address; the
  table redirects it to the forwarder, which asks dnsmasq and (for allowed names) adds the
  answer's addresses to the kernel set before answering.

The query mix: ``--allowed-share`` of the queries are AAAA for ``a<i>.psp.example`` (allowed,
each with its own address, so the forwarder's admits are real kernel adds while the pool lasts),
the rest A for ``n<i>.bench.example`` (not allowed: forwarded only). Figures are reported for
all queries and for the allowed names separately ("admits").

Load: dnsperf (Debian package), not a Python generator: it is C, paces its queries at ``-Q``
on a fixed rate with up to 1,000 outstanding (so a slow answer does not slow the offered load),
and ``-v`` prints each query's latency with its name, which gives the exact distribution
(dnsperf 2.10 prints only mean/stddev itself; its histogram option came later). A Python
generator on this 2-core shared machine would add its own GC/scheduler jitter to the p99 it is
supposed to measure. Latency is dnsperf's send -> answer, per query.

Rounds alternate the order (direct, forwarder, forwarder, direct, ...) because the machine is
shared; each mode's figures are over all its rounds. After the runs the daemon's metrics are
read: rate-limited or failed queries, kernel failures and addresses added are printed, and a
run with lost queries or rate limiting says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parents[1] / "kernel"))

from dns_peers import RESOLVER4, add_upstream_addresses  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from enforcer.demo.dhcp import Process  # noqa: E402
from enforcer.demo.lab import Lab  # noqa: E402
from enforcer.demo.topology import Topology  # noqa: E402

#: The reference forwarder (dnsmasq on the gateway, the free subscriber's DNS redirected to it).
REFERENCE_PORT, REFERENCE_TABLE = 5301, "wgbenchref"
FORWARDER_PORT = 5300
ALLOWED_SUFFIX = ".psp.example"


@dataclass
class Mode:
    """One path's figures over all its rounds."""

    name: str
    sent: int = 0
    completed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)          # seconds, every answered query
    allowed: list[float] = field(default_factory=list)            # the allowed names' share
    rcodes: dict[str, int] = field(default_factory=dict)
    forwarder_cpu: float = 0.0   # CPU seconds of the forwarder process during this path's runs


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted here); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def write_names(directory: Path, names: int, share: float, seed: int = 14) -> tuple[Path, Path]:
    """The resolver's hosts file and dnsperf's query file (shuffled, the allowed ``share``)."""
    hosts, queries = directory / "bench.hosts", directory / "queries.txt"
    allowed = max(1, int(names * share))
    other = max(1, names - allowed)
    with hosts.open("w") as out:
        for i in range(other):
            out.write(f"192.0.2.{1 + i % 250} n{i}.bench.example\n")
        for i in range(allowed):
            out.write(f"2001:db8:192:{1 + i // 0x10000:x}::{i % 0x10000:x} a{i}{ALLOWED_SUFFIX}\n")
    lines = [f"n{i}.bench.example A\n" for i in range(other)] + [f"a{i}{ALLOWED_SUFFIX} AAAA\n" for i in range(allowed)]
    random.Random(seed).shuffle(lines)
    queries.write_text("".join(lines))
    return hosts, queries


def dnsperf(topo: Topology, netns: str, queries: Path, rate: int, seconds: float, out: Path, mode: Mode) -> None:
    """One dnsperf run from ``netns``; its per-query lines are added to ``mode``."""
    argv = ["dnsperf", "-s", RESOLVER4, "-d", str(queries), "-l", f"{seconds:g}", "-Q", str(rate),
            "-q", "1000", "-t", "2", "-v"]
    with out.open("w") as stdout:
        result = subprocess.run(["ip", "netns", "exec", netns, *argv], stdout=stdout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=seconds + 30.0)
    text = out.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"dnsperf in {netns} exited with {result.returncode}: {text[-2000:]}")
    for line in text.splitlines():
        if line.startswith("> "):
            fields = line.split()   # "> NOERROR name type seconds"; a timeout: "> T name type"
            mode.rcodes[fields[1]] = mode.rcodes.get(fields[1], 0) + 1
            if len(fields) != 5:
                continue
            mode.latencies.append(float(fields[4]))
            if fields[2].endswith(ALLOWED_SUFFIX):
                mode.allowed.append(float(fields[4]))
        elif line.strip().startswith("Queries sent:"):
            mode.sent += int(line.split()[2])
        elif line.strip().startswith("Queries completed:"):
            mode.completed += int(line.split()[2])
        elif line.strip().startswith("Run time (s):"):
            mode.seconds += float(line.split()[3])


def metrics(topo: Topology) -> dict[str, float]:
    """``walled_garden_dns_*`` samples summed over their labels but ``result``/``family``."""
    text = topo.run(topo.gateway.netns, "curl", "-sf", "--max-time", "3", "http://127.0.0.1:9640/metrics").stdout
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("walled_garden_dns"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                              if k in ("result", "transport", "le"))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


def forwarder_cpu() -> float:
    """CPU seconds (user + system, softirq work done in its context included) the DNS forwarder
    process and the reference dnsmasq have used so far; a forwarder's kernel work for a query
    (two sends through veth pairs into other namespaces) is charged to it, as on a gateway. Only
    one of them has work during a path's runs, so the difference is that one's."""
    found = subprocess.run(["pgrep", "-f", f"enforcer.dns_garden.process|--port={REFERENCE_PORT}"],
                           capture_output=True, text=True).stdout
    total = 0.0
    for pid in found.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def own_quantile(before: dict[str, float], after: dict[str, float], share: float) -> float:
    """The forwarder's own view (``walled_garden_dns_added_seconds``: its time minus the
    resolver's): the upper bound of the bucket holding the ``share`` quantile of the runs, ms."""
    prefix = "walled_garden_dns_added_seconds_bucket{le="
    buckets = sorted((float(key[len(prefix):-1]), after[key] - before.get(key, 0.0))
                     for key in after if key.startswith(prefix))
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    for bound, count in buckets:
        if count >= share * buckets[-1][1]:
            return bound * 1000
    return float("nan")


def row(label: str, mode: Mode, values: list[float], whole: bool = True) -> str:
    """A table line; ``whole`` False (a share of the queries) leaves lost and q/s blank: dnsperf
    counts them only for the whole run."""
    qps = f"{mode.completed / mode.seconds:>9.0f}" if mode.seconds and whole else f"{'':>9}"
    lost = f"{mode.sent - mode.completed:>6}" if whole else f"{'':>6}"
    ms = [percentile(values, share) * 1000 for share in (0.5, 0.9, 0.99, 0.999)]
    return (f"{label:<22} {len(values):>9} {lost} {qps} " + " ".join(f"{v:>8.3f}" for v in ms)
            + f" {max(values, default=float('nan')) * 1000:>8.2f}")


def bench(args: argparse.Namespace, work: Path) -> int:
    hosts, queries = write_names(work, args.names, args.allowed_share)
    with Topology(subscribers=2) as topo:
        add_upstream_addresses(topo, RESOLVER4)
        resolver = Process(topo.popen, topo.upstream.netns, [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--addn-hosts={hosts}", "--local-ttl=300", "--cache-size=10000", "--port=53",
            f"--listen-address={RESOLVER4}", "--bind-interfaces", "--user=root", "--group=root",
            f"--pid-file={work / 'dnsmasq.pid'}", "--dns-forward-max=10000",
        ], work / "dnsmasq.log")
        resolver.start_until("names", timeout=15.0)   # "read <hosts> - N names"
        try:
            entries = [{"id": "C-BENCH", "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64"]}]
            lab = Lab(topo, work / "lab", entries, allow=["*.psp.example"],
                      garden={"dns": "gateway", "resolvers": [RESOLVER4],
                              "dns_forwarder": {"port": FORWARDER_PORT, "query_rate": 1_000_000,
                                                "query_burst": 1_000_000}})
            lab.start_daemon()
            try:
                lab.wait_for(lambda: metrics(topo).get("walled_garden_dns_forwarder_up") == 1, timeout=15,
                             what="walled_garden_dns_forwarder_up 1")
                return measure(args, topo, lab, queries, work)
            finally:
                lab.stop_daemon()
                if args.verbose:
                    print(lab.log())
        finally:
            resolver.stop()


def measure(args: argparse.Namespace, topo: Topology, lab: Lab, queries: Path, work: Path) -> int:
    restricted, free = topo.subscribers[0].netns, topo.subscribers[1].netns
    paths = {"direct": free, "dnsmasq": free, "forwarder": restricted}
    reference = Process(topo.popen, topo.gateway.netns, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", f"--server={RESOLVER4}",
        "--cache-size=0", f"--port={REFERENCE_PORT}", "--user=root", "--group=root",
        f"--pid-file={work / 'reference.pid'}", "--dns-forward-max=10000"], work / "reference.log")
    reference.start_until("using nameserver", timeout=15.0)
    try:
        for name, netns in paths.items():   # warm-up: ARP/NDP, conntrack, the forwarders' sockets
            with redirected(topo, name == "dnsmasq"):
                dnsperf(topo, netns, queries, 1000, 1, work / f"warmup-{name}.txt", Mode(name))
        return _measure(args, topo, paths, queries, work)
    finally:
        reference.stop()


@contextlib.contextmanager
def redirected(topo: Topology, on: bool) -> Iterator[None]:
    """While on: the free subscriber's DNS goes to the reference forwarder (dnsmasq on the
    gateway) by a redirect like the daemon's, in a table of the bench's own."""
    if not on:
        yield
        return
    gw_if = topo.subscriber_interfaces[1]
    rules = (f"table ip {REFERENCE_TABLE} {{\n chain pre {{\n  type nat hook prerouting priority dstnat - 20; "
             f'policy accept;\n  iifname "{gw_if}" meta l4proto {{ tcp, udp }} th dport 53 '
             f"redirect to :{REFERENCE_PORT}\n }}\n}}")
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as ruleset:
        ruleset.write(rules + "\n")
        ruleset.flush()
        topo.run(topo.gateway.netns, "nft", "-f", ruleset.name, check=True)
    try:
        yield
    finally:
        topo.run(topo.gateway.netns, "nft", "delete", "table", "ip", REFERENCE_TABLE, check=True)
        topo.run(topo.gateway.netns, "conntrack", "-F")   # the next path starts without its entries


def _measure(args: argparse.Namespace, topo: Topology, paths: dict[str, str], queries: Path, work: Path) -> int:
    summary: list[str] = []
    for rate in args.rates:
        before = metrics(topo)
        modes = {name: Mode(name) for name in paths}
        for index in range(args.rounds):
            order = list(paths)[index % 3:] + list(paths)[:index % 3]   # each path first in turn
            for name in order:
                started, cpu = time.monotonic(), forwarder_cpu()
                with redirected(topo, name == "dnsmasq"):
                    dnsperf(topo, paths[name], queries, rate, args.seconds, work / f"{rate}-{index}-{name}.txt",
                            modes[name])
                modes[name].forwarder_cpu += forwarder_cpu() - cpu
                print(f"{rate} q/s round {index + 1}/{args.rounds} {name}: {time.monotonic() - started:.1f}s",
                      flush=True)
        time.sleep(1.5)   # the forwarder sends its counters every second
        summary.append(report(args, rate, modes, before, metrics(topo)))
    print("\nadded by the forwarder (forwarder - direct), goal p99 <= +1 ms at 5,000 q/s:")
    print("\n".join(summary))
    return 0


def report(args: argparse.Namespace, rate: int, modes: dict[str, Mode], before: dict[str, float],
           after: dict[str, float]) -> str:
    """Print one rate's figures table; return its one-line "added" summary."""
    print(f"\nDNS forwarder overhead: {rate} q/s offered, {args.rounds} x {args.seconds:g}s per path, "
          f"{args.allowed_share:.0%} allowed names ({args.names} names), resolver dnsmasq (hosts file)")
    print(f"{'path':<22} {'answered':>9} {'lost':>6} {'q/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'p99.9 ms':>8} {'max ms':>8}")
    for mode in modes.values():
        print(row(f"{mode.name} all", mode, mode.latencies))
        print(row(f"{mode.name} allowed", mode, mode.allowed, whole=False))
    direct, forwarder, reference = modes["direct"], modes["forwarder"], modes["dnsmasq"]
    added = {share: (percentile(forwarder.latencies, share) - percentile(direct.latencies, share)) * 1000
             for share in (0.5, 0.99)}
    by_dnsmasq = {share: (percentile(reference.latencies, share) - percentile(direct.latencies, share)) * 1000
                  for share in (0.5, 0.99)}
    admits = {share: (percentile(forwarder.allowed, share) - percentile(direct.allowed, share)) * 1000
              for share in (0.5, 0.99)}
    print("rcodes:", {name: mode.rcodes for name, mode in modes.items()})
    print("daemon metrics during the runs (after - before):")
    for key in sorted(set(after) | set(before)):
        delta = after.get(key, 0.0) - before.get(key, 0.0)
        if delta and "_bucket" not in key:
            print(f"  {key} {delta:+g}")
    own = {share: own_quantile(before, after, share) for share in (0.5, 0.99)}
    answered = max(1, len(forwarder.latencies))
    print(f"forwarder's own added latency (its histogram, bucket bounds): p50 <= {own[0.5]:g} ms, "
          f"p99 <= {own[0.99]:g} ms; its CPU: {forwarder.forwarder_cpu:.1f} s for {answered} answers "
          f"({forwarder.forwarder_cpu / answered * 1e6:.0f} us per query, kernel work included); dnsmasq's in "
          f"its place: {reference.forwarder_cpu / max(1, len(reference.latencies)) * 1e6:.0f} us per query")
    lost = {name: mode.sent - mode.completed for name, mode in modes.items()}
    limited = sum(value - before.get(key, 0.0) for key, value in after.items() if "result=rate_limited" in key)
    if any(lost.values()):
        print(f"WARNING: queries lost (timed out after 2 s): {lost}")
    if limited:
        print(f"WARNING: the forwarder rate-limited {limited:g} of the bench's queries")
    return (f"  {rate:>6} q/s: all p50 {added[0.5]:+.3f} ms, p99 {added[0.99]:+.3f} ms (dnsmasq as the "
            f"forwarder, same place: p50 {by_dnsmasq[0.5]:+.3f} ms, p99 {by_dnsmasq[0.99]:+.3f} ms); allowed names p50 "
            f"{admits[0.5]:+.3f} ms, p99 {admits[0.99]:+.3f} ms; lost {lost['forwarder']} vs {lost['direct']} "
            f"direct; goal (all queries' p99 <= +1 ms) {'met' if added[0.99] <= 1.0 else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda text: [int(v) for v in text.split(",")], default=[5000],
                        help="queries/s offered per run (dnsperf -Q), comma-separated: one table each")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per path, order alternated")
    parser.add_argument("--allowed-share", type=float, default=0.1, help="share of queries for allowed names")
    parser.add_argument("--names", type=int, default=40000, help="distinct names in the query file")
    parser.add_argument("--verbose", action="store_true", help="print the daemon's log at the end")
    args = parser.parse_args()
    if not 0 <= args.allowed_share <= 1 or min(args.rates) < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--allowed-share is 0..1; --rates, --seconds and --rounds are positive")
    if os.geteuid() != 0:
        print("run as root (it creates network namespaces and an nftables table in them)", file=sys.stderr)
        return 1
    for program, package in (("dnsperf", "dnsperf"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(program) is None:
            print(f"needs {program} (Debian package {package}; bash .ci/install installs it)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="wg-bench-dns-"))
    try:
        return bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
