"""Soak test: the real daemon and portal under list churn, signed events, portal traffic and
restarts, watched for growth (RSS, file descriptors) and for lost answers.

    sudo .venv/bin/python tests/bench/soak.py              # 10 minutes
    sudo .venv/bin/python tests/bench/soak.py --quick      # 60-second smoke
    sudo .venv/bin/python tests/bench/soak.py --minutes 60 # longer

Why: unit and kernel tests each look at one moment; a leak of one file descriptor per restart,
per list load or per webhook, or a task that quietly stops, only shows over many minutes of
everything at once. This runs ``walled-garden run`` and ``walled-garden portal`` as the unit
files do (their own processes, the webhook worker forked by the daemon) in a simulated ISP
(``enforcer.demo.topology``: gateway, two subscribers, upstream, garden namespaces), and:

- rewrites the list file every ``--churn-every`` seconds, replacing and re-moding ~2 % of entries
  (the subscriber in namespace s1 stays listed, so its traffic meets the portal);
- sends signed ``payment.received`` / ``subscriber.restricted`` events at ``--rate`` per second
  from the upstream namespace (where billing would be), each subscriber at most one in flight;
- fetches the portal page, ``/api/captive`` and an upstream page from both subscriber namespaces;
- stops the daemon every ``--restart-every`` seconds, alternately SIGTERM and SIGKILL (the whole
  process group, webhook worker included), and starts it again, timing until it answers;
- samples RSS and open descriptors of daemon, webhook worker and portal, and the supervised
  tasks and their failures from ``status``, every ``--sample-every`` seconds.

``status`` shows the supervised tasks (by name, with failures), not a count of every asyncio
task, so the table has the supervised task count and the failure total rather than a raw task count.

At the end every event subscriber whose last event that may have been applied was a payment
answered 200 (all are within the 1 h grace) must be free, both in the daemon's ``lookup`` and
in the kernel's sets; a restriction answered 200 as last must be restricted. The verdict per
process and figure is *flat* when the average of the last quarter of samples (taken at least
``--warmup`` seconds after that process started) is within 10 % (or 3 descriptors) of the
first quarter's.

Traffic only goes to addresses of the topology's own namespaces (documentation and shared
ranges) and to loopback; the whole run happens inside a private namespace of its own
(``private_netns``), the topology's namespaces and every process are removed on any exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.dataplane.layout import redirect_set, throttle_set  # noqa: E402
from enforcer.demo.lab import API_PORT, Lab  # noqa: E402
from enforcer.demo.topology import Topology  # noqa: E402
from enforcer.model import Mode  # noqa: E402

#: The event subscribers' addresses: one /32 each inside 100.100.0.0/16 (shared address space,
#: routed nowhere; only the gateway's sets ever see them).
EVENT_NET = ipaddress.ip_network("100.100.0.0/16")
#: The listed subscribers' addresses, disjoint from the event subscribers' ones.
LIST_NET = ipaddress.ip_network("100.80.0.0/14")

#: Billing's side: signed events at a steady rate, one JSON line per answer. Runs in the upstream
#: namespace; bounded by its duration; each subscriber has at most one request in flight because
#: it is picked again only ``subscribers / rate`` seconds later, longer than the request timeout.
LOAD = r"""
import asyncio, json, random, sys, time
import aiohttp
from enforcer.demo.billing import signed_request

async def main():
    url, secret_file, rate, seconds, subs, seed, out = sys.argv[1:8]
    rate, seconds, seed = float(rate), float(seconds), int(seed)
    subs = json.loads(subs)
    secret = open(secret_file).read().strip()
    rng = random.Random(seed)
    total = int(rate * seconds)
    timeout = aiohttp.ClientTimeout(total=min(10.0, len(subs) / rate / 2))
    sink = open(out, "w", buffering=1)
    # a new connection per event (force_close): the worker's descriptors then count its own
    # state, not how many idle keep-alive connections the client's pool happens to hold
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as session:
        async def one(seq, sid, addr, kind):
            now = time.time()
            if kind == "payment.received":
                body = {"type": kind, "timestamp": now, "data": {"subscriber": sid}}
            else:
                body = {"type": kind, "timestamp": now,
                        "data": {"subscriber": sid, "addresses": [addr], "reason": "overdue"}}
            r = signed_request(url, secret, body)
            started = time.perf_counter()
            try:
                async with session.post(url, data=r.data, headers=dict(r.header_items())) as response:
                    await response.read()
                    status = response.status
                    outcome = "applied" if status == 200 else "refused" if status < 500 else "ambiguous"
            except aiohttp.ClientConnectorError:
                status, outcome = 0, "unreachable"   # never reached the listener: not applied
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status, outcome = 0, "ambiguous"     # may or may not have been applied
            sink.write(json.dumps({"seq": seq, "sid": sid, "type": kind, "status": status, "outcome": outcome,
                                   "sent": now, "seconds": time.perf_counter() - started}) + "\n")
        tasks = []
        start = time.perf_counter()
        for seq in range(total):
            delay = start + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sid, addr = subs[seq % len(subs)]
            kind = rng.choice(("payment.received", "subscriber.restricted"))
            tasks.append(asyncio.create_task(one(seq, sid, addr, kind)))
            tasks = [t for t in tasks if not t.done()]
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

asyncio.run(main())
"""

#: A subscriber's browser: the portal page, the RFC 8908 API and an upstream page, every
#: ``interval`` seconds until ``seconds`` have passed; prints one JSON summary.
BROWSE = r"""
import http.client, json, sys, time
portal_host, portal_port, upstream = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seconds, interval = float(sys.argv[4]), float(sys.argv[5])
counts, worst = {}, 0.0
def get(kind, host, port, path):
    global worst
    started = time.perf_counter()
    try:
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", path, headers={"Accept-Language": "en"})
        r = c.getresponse(); body = r.read(); c.close()
        key = f"{kind}:{r.status}"
        if kind == "captive" and r.status == 200:
            key += ":captive" if json.loads(body).get("captive") else ":free"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        key = f"{kind}:error:{type(exc).__name__}"
    worst = max(worst, time.perf_counter() - started)
    counts[key] = counts.get(key, 0) + 1
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    get("page", portal_host, portal_port, "/")
    get("captive", portal_host, portal_port, "/api/captive")
    get("upstream", upstream, 80, "/")
    time.sleep(interval)
print(json.dumps({"counts": counts, "worst_seconds": round(worst, 3)}))
"""


@dataclass
class Sample:
    at: float
    name: str            # daemon | worker | portal
    pid: int
    started: float       # when this process (this life) was started, monotonic
    rss_kib: int
    fds: int


@dataclass
class Soak:
    args: argparse.Namespace
    topo: Topology
    lab: Lab
    rng: random.Random
    listed: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_list_id: int = 0
    samples: list[Sample] = field(default_factory=list)
    status_rows: list[tuple[float, int, int]] = field(default_factory=list)  # (at, tasks, failures)
    restarts: list[tuple[str, float]] = field(default_factory=list)          # (signal, seconds to answer)
    daemon_started: float = 0.0
    portal_started: float = 0.0
    list_writes: int = 0

    # -- the list --------------------------------------------------------------------------
    def new_entry(self) -> dict[str, Any]:
        i = self.next_list_id
        self.next_list_id += 1
        address = str(LIST_NET.network_address + 1 + i)
        mode = self.rng.choice(("walled-garden", "walled-garden", "notice", "throttle"))
        return {"id": f"L-{i}", "addresses": [address], "mode": mode, "reason": "overdue"}

    def pinned(self) -> dict[str, Any]:
        """The subscriber in namespace s1: always listed, so its browser meets the portal."""
        s1 = self.topo.subscribers[0]
        return {"id": "C-1001", "addresses": [s1.addr4, f"{ipaddress.ip_interface(s1.addr6 + '/64').network}"],
                "reason": "overdue"}

    def write_list(self) -> None:
        self.lab.write_list([self.pinned(), *self.listed.values()])
        self.list_writes += 1

    def churn(self) -> None:
        """Replace ~1 % of the entries and change the mode of ~1 % more."""
        count = max(1, len(self.listed) // 100)
        for sid in self.rng.sample(sorted(self.listed), count):
            del self.listed[sid]
        for _ in range(count):
            entry = self.new_entry()
            self.listed[entry["id"]] = entry
        for sid in self.rng.sample(sorted(self.listed), count):
            self.listed[sid]["mode"] = self.rng.choice(("walled-garden", "notice", "throttle"))
        self.write_list()

    # -- processes -------------------------------------------------------------------------
    def restart(self, kill: bool) -> None:
        started = time.monotonic()
        self.lab.stop_daemon(kill=kill, timeout=30.0)
        self.lab.start_daemon(timeout=60.0)
        self.daemon_started = time.monotonic()
        self.restarts.append(("SIGKILL" if kill else "SIGTERM", self.daemon_started - started))

    def pids(self) -> dict[str, tuple[int, float]]:
        out: dict[str, tuple[int, float]] = {}
        if self.lab.daemon is not None and self.lab.daemon.poll() is None:
            out["daemon"] = (self.lab.daemon.pid, self.daemon_started)
            worker = children(self.lab.daemon.pid)
            if worker:
                out["worker"] = (worker[0], self.daemon_started)
        if self.lab.portal is not None and self.lab.portal.poll() is None:
            out["portal"] = (self.lab.portal.pid, self.portal_started)
        return out

    def sample(self) -> None:
        now = time.monotonic()
        for name, (pid, started) in self.pids().items():
            try:
                rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration):
                continue  # it ended between the listing and the read: no sample this time
            self.samples.append(Sample(now, name, pid, started, rss, fds))
        status = self.lab.status()
        if status is not None:
            tasks = status.get("tasks", {})
            failures = sum(int(t.get("failures", 0)) for t in tasks.values())
            self.status_rows.append((now, len(tasks), failures))


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the daemon's webhook worker), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def kernel_members(lab: Lab) -> dict[str, set[str]]:
    """IPv4 /32 elements per restricting set, read from the kernel in the gateway namespace."""
    out: dict[str, set[str]] = {}
    for mode in (Mode.WALLED_GARDEN, Mode.NOTICE):
        out[mode.value] = set()
    out[Mode.THROTTLE.value] = set()
    sets = {Mode.WALLED_GARDEN.value: redirect_set(4, 32), Mode.NOTICE.value: redirect_set(4, 32, Mode.NOTICE),
            Mode.THROTTLE.value: throttle_set(4, 32)}
    for mode, name in sets.items():
        r = lab.topo.run(lab.topo.gateway.netns, "nft", "-j", "list", "set", "inet", lab.table, name, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"nft list set {name}: {r.stderr.strip()}")
        for item in json.loads(r.stdout)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                out[mode].add(element if isinstance(element, str) else json.dumps(element))
    return out


def check_answers(lab: Lab, results: list[dict[str, Any]], addresses: dict[str, str]) -> dict[str, Any]:
    """Every subscriber whose last possibly-applied event was a 200 payment is free (daemon and
    kernel); one whose last was a 200 restriction is restricted. Events answered 4xx or never
    delivered are not applied and are skipped over; an ambiguous one (timeout, reset, 5xx) ends the
    check for that subscriber, since it may have been applied."""
    by_sid: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: r["seq"]):
        by_sid.setdefault(r["sid"], []).append(r)
    kernel = kernel_members(lab)
    restricted_in_kernel = set().union(*kernel.values())
    report: dict[str, Any] = {"paid_checked": 0, "paid_lost": [], "restricted_checked": 0, "restricted_lost": [],
                              "ambiguous_last": 0}
    for sid, events in by_sid.items():
        last = next((e for e in reversed(events) if e["outcome"] in ("applied", "ambiguous")), None)
        if last is None:
            continue
        if last["outcome"] == "ambiguous":
            report["ambiguous_last"] += 1
            continue
        address = addresses[sid]
        daemon_says = lab.lookup(address)["restricted"]
        in_kernel = address in restricted_in_kernel
        if last["type"] == "payment.received":
            report["paid_checked"] += 1
            if daemon_says or in_kernel:
                report["paid_lost"].append({"subscriber": sid, "address": address, "daemon_restricted": daemon_says,
                                            "kernel_restricted": in_kernel, "event": last})
        else:
            report["restricted_checked"] += 1
            if not (daemon_says and in_kernel):
                report["restricted_lost"].append({"subscriber": sid, "address": address,
                                                  "daemon_restricted": daemon_says, "kernel_restricted": in_kernel,
                                                  "event": last})
    return report


def flat(values: list[float], tolerance: float, slack: float) -> tuple[float, float, bool]:
    """(first-quarter mean, last-quarter mean, within tolerance or slack)."""
    quarter = max(1, len(values) // 4)
    first = sum(values[:quarter]) / quarter
    last = sum(values[-quarter:]) / quarter
    return first, last, abs(last - first) <= max(tolerance * first, slack)


def summarise(soak: Soak, warmup: float) -> tuple[list[str], bool]:
    lines = [f"{'process':8} {'figure':10} {'min':>8} {'max':>8} {'first 1/4':>10} {'last 1/4':>10}  verdict"]
    ok = True
    for name in ("daemon", "worker", "portal"):
        rows = [s for s in soak.samples if s.name == name and s.at - s.started >= warmup]
        if len(rows) < 8:
            lines.append(f"{name:8} (only {len(rows)} samples after warm-up: no verdict)")
            continue
        for figure, values, slack in (("RSS MiB", [s.rss_kib / 1024 for s in rows], 0.0),
                                      ("open fds", [float(s.fds) for s in rows], 3.0)):
            first, last, good = flat(values, 0.10, slack)
            ok &= good
            lines.append(f"{name:8} {figure:10} {min(values):8.1f} {max(values):8.1f} {first:10.1f} {last:10.1f}  "
                         f"{'flat' if good else 'GROWING'}")
    if soak.status_rows:
        tasks = [t for _, t, _ in soak.status_rows]
        failures = soak.status_rows[-1][2]
        lines.append(f"daemon   supervised tasks {min(tasks)}..{max(tasks)}, task failures at the end {failures}")
        ok &= min(tasks) == max(tasks)
    return lines, ok


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="wg-soak-") as work, Topology(subscribers=2) as topo:
        topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80,))
        topo.serve_http(topo.garden, "GARDEN OK", ports=(80,))
        lab = Lab(topo, work)
        lab.config["gateway"]["subscriber_prefixes"] = ["100.64.0.0/10", "2001:db8:100::/48"]
        # The first list restricts thousands at once: the mass-change guard would hold it for
        # approval; the churn itself stays below the defaults.
        lab.config["subscribers"]["guard"] = {"max_restrict": 1_000_000, "max_lift": 1_000_000}
        lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
        soak = Soak(args, topo, lab, rng)
        for _ in range(args.list_size):
            entry = soak.new_entry()
            soak.listed[entry["id"]] = entry
        soak.write_list()
        lab.start_daemon(timeout=60.0)
        soak.daemon_started = time.monotonic()
        lab.start_portal(timeout=30.0)
        soak.portal_started = time.monotonic()

        event_subs = [(f"E-{i}", str(EVENT_NET.network_address + 256 + i))
                      for i in range(max(1, int(args.rate * 20)))]
        addresses = dict(event_subs)
        results_path = Path(work, "events.jsonl")
        # billing is upstream: the gateway's upstream-side address, as Lab.send_event uses
        url = f"http://198.51.100.1:{API_PORT}/v1/events"
        url = f"http://198.51.100.1:{API_PORT}/v1/events"
        with open(Path(work, "load.err"), "wb") as load_err:   # the child keeps its own copy of the file
            load = topo.popen(topo.upstream.netns, sys.executable, "-c", LOAD, url, str(lab.secret_path),
                              str(args.rate), str(seconds), json.dumps(event_subs), str(args.seed), str(results_path),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=load_err,
                              env={**os.environ, "PYTHONPATH": str(HERE.parents[2])})
        portal_host = topo.gateway_addr4(1)
        browsers = [topo.popen(host.netns, sys.executable, "-c", BROWSE, portal_host, "8080", topo.upstream.addr4,
                               str(seconds), "0.5", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
                    for host in topo.subscribers]

        began = time.monotonic()
        end = began + seconds
        next_churn = began + args.churn_every
        next_sample = began
        next_restart = began + args.restart_every if args.restart_every > 0 else float("inf")
        kill = False
        print(f"soak: {args.minutes:g} min, {args.list_size} listed, {args.rate:g} events/s over {len(event_subs)} "
              f"subscribers, churn every {args.churn_every:g} s, restart every {args.restart_every:g} s", flush=True)
        while time.monotonic() < end:   # bounded by ``end``; each step below is bounded by its own timeout
            now = time.monotonic()
            if now >= next_sample:
                soak.sample()
                next_sample = now + args.sample_every
                last = {s.name: s for s in soak.samples[-3:]}
                print(f"  t={now - began:5.0f}s " + "  ".join(f"{n} rss={s.rss_kib // 1024}MiB fds={s.fds}"
                                                           for n, s in last.items()), flush=True)
            if now >= next_churn:
                soak.churn()
                next_churn = now + args.churn_every
            if now >= next_restart and now + 10 >= end:
                next_restart = float("inf")  # too close to the end to see it answer again
            elif now >= next_restart:
                soak.restart(kill)
                print(f"  restart ({soak.restarts[-1][0]}): answering again after {soak.restarts[-1][1]:.1f} s",
                      flush=True)
                kill = not kill
                next_restart = time.monotonic() + args.restart_every
            time.sleep(max(0.0, min(next_sample, next_churn, next_restart, end) - time.monotonic()))

        load.wait(timeout=60)
        browsed = [json.loads(b.communicate(timeout=30)[0].strip().splitlines()[-1]) for b in browsers]
        time.sleep(2)  # the last list write is read and applied
        results = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
        answers = check_answers(lab, results, addresses)
        status = lab.status() or {}

        outcomes: dict[str, int] = {}
        for r in results:
            outcomes[f"{r['outcome']}:{r['status']}"] = outcomes.get(f"{r['outcome']}:{r['status']}", 0) + 1
        applied = sorted(r["seconds"] for r in results if r["outcome"] == "applied")
        print(f"\n# soak, {args.minutes:g} min: {len(results)} events {dict(sorted(outcomes.items()))}; "
              f"200 answered in p50 {applied[len(applied) // 2] * 1000:.0f} ms, "
              f"p99 {applied[int(len(applied) * 0.99)] * 1000:.0f} ms" if applied else "no event applied")
        source = status.get("source", {})
        in_force = (source.get("list_in_force") or {}).get("entries")
        list_ok = in_force == len(soak.listed) + 1 and not source.get("last_error")
        print(f"list rewritten {soak.list_writes} times ({args.list_size} entries, ~1 % replaced + ~1 % re-moded "
              f"each); in force at the end: {in_force} entries, {source.get('list_age_seconds')} s old, "
              f"source error: {source.get('last_error')}; restricted by mode: {status.get('modes')}")
        for host, b in zip(("s1 (restricted)", "s2 (free)"), browsed, strict=True):
            print(f"browser {host}: {dict(sorted(b['counts'].items()))}, slowest {b['worst_seconds']} s")
        for kind, secs in soak.restarts:
            print(f"restart {kind}: answering again after {secs:.1f} s")
        lines, flat_ok = summarise(soak, args.warmup)
        print("\n" + "\n".join(lines))
        lost = len(answers["paid_lost"]) + len(answers["restricted_lost"])
        print(f"\nanswers: {answers['paid_checked']} subscribers whose last applied event was a 200 payment, "
              f"{len(answers['paid_lost'])} of them restricted; {answers['restricted_checked']} whose last was a 200 "
              f"restriction, {len(answers['restricted_lost'])} of them free; {answers['ambiguous_last']} skipped "
              "(last event ambiguous)")
        for item in (answers["paid_lost"] + answers["restricted_lost"])[:10]:
            print(f"  LOST {item}")
        browsers_ok = all(not any(":error:" in k or k.startswith("page:5") for k in b["counts"]) for b in browsed)
        failures = soak.status_rows[-1][2] if soak.status_rows else 0
        judged = flat_ok or args.quick  # --quick: figures shown, growth not judged
        verdict = judged and failures == 0 and lost == 0 and bool(applied) and list_ok
        growth = "not judged (--quick)" if args.quick else "flat" if flat_ok else "NOT flat"
        print(f"\nverdict: {'PASS' if verdict else 'FAIL'} (figures {growth}, {failures} task failures, "
              f"{lost} answers lost, last list {'in force' if list_ok else 'NOT in force'}, "
              f"portal errors: {'none' if browsers_ok else 'some, see above'})")
        if not verdict:
            print(lab.log()[-3000:])
        return 0 if verdict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="60-second smoke: restarts every 20 s, samples every 5 s")
    parser.add_argument("--rate", type=float, default=20.0, help="signed events per second")
    parser.add_argument("--list-size", type=int, default=2000)
    parser.add_argument("--churn-every", type=float, default=10.0)
    parser.add_argument("--restart-every", type=float, default=120.0, help="0: never restart")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds after a (re)start before samples count")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.quick:  # a smoke: too short for a growth verdict (a fresh daemon's RSS settles over minutes)
        args.minutes, args.restart_every, args.sample_every, args.warmup = 1.0, 15.0, 5.0, 5.0
    if not 0 < args.minutes <= 24 * 60 or args.rate <= 0 or args.list_size < 0:
        parser.error("--minutes in (0, 1440], --rate > 0, --list-size >= 0")
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # Topology and the work directory clean up
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
