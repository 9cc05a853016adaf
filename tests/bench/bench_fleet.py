"""Fleet benchmark (issue 15): signed events per second through the fleet, and the time from
billing's post to every gateway's own kernel commit; 2 and 3 gateways side by side with one
gateway without a fleet, in the same run. Goal: >= 2,000 events/s at p99 <= 150 ms.

    sudo .venv/bin/python tests/bench/bench_fleet.py [--rates 500,1000,2000] [--seconds 10] [--rounds 2]
        [--subscribers 10000] [--connections 1024]

Everything runs in a private network namespace of its own (loopback only, removed on any exit):
one ``nats-server`` with JetStream (own port and store directory) and six real daemons
(``walled-garden run``, real nftables dataplane, webhook worker process), each with its own
table, state directory, control socket, API and metrics port, all listing the same
``--subscribers`` restricted subscribers (100.64.0.0/10): one gateway without ``fleet``, two
sharing one stream, three sharing another. All six run for the whole benchmark; the idle ones
only heartbeat.

Load is billing's: Standard Webhooks signed with the gateways' shared secret, pre-signed before
each step, distinct webhook-ids, payments and restrictions alternating over distinct
subscribers (a subscriber's next event is hundreds of events later, so every event changes the
kernel and the fleet's applier can batch them).

With ``--post one`` (the default; billing posts each event once, to any gateway of the fleet)
event n goes to gateway n mod gateways, and every ``--probe-every``-th event (default 20th)
also to every other gateway with the same webhook-id: the fleet publishes it once (JetStream
drops the repeats) and each gateway answers 200 only after its own kernel committed it, so the
probe's slowest answer minus its send is "all committed" (p50/p99 over the probes). "own" is
the posted-to gateway's answer for every event (publish, stream acknowledgement, its own
commit). With ``--post all`` every event goes to every gateway (the load of billing posting
everything everywhere). One sender process per gateway posts open loop at the step's rate over
keep-alive connections (all senders of a step share one start instant); "lag" is how late the
senders were against the schedule (a sender starved of CPU shows here, not as a better figure).
"strm50"/"strm99" are from the stream storing an input to its commit on the slowest gateway
(each gateway's ``walled_garden_fleet_commit_seconds`` histogram over the step, quantiles as
Prometheus' ``histogram_quantile``): publish -> everyone committed, without the HTTP queueing
and the conntrack flush that request -> 200 includes.

Each step is checked afterwards from the daemons' metrics: every gateway applied every event
exactly once (``walled_garden_events_total{result="applied"}``, and for fleet gateways
``walled_garden_fleet_applied_total{kind="event"}``), and the stream took each event once
(``walled_garden_fleet_published_total``: one "accepted" per event across the fleet, the other
gateways' posts "duplicate"). CPU per event is each daemon's (with its webhook worker), the
nats-server's and the senders' (per request), over the step.

Steps are rotated (the order of the three setups changes with the rate and the round) because
the machine is shared and noisy; the summary pools every round's events per setup and rate.

"cores" is how many CPU cores everything here kept busy during the step (all six daemons,
nats-server, the senders). All gateways share this one machine, while in a real fleet each has
its own: when "cores" nears the machine's count, the 2- and 3-gateway rows measure the
gateways competing for CPU more than the fleet. Each daemon's conntrack pass walks the whole
kernel table (~20 ms of CPU, at most every 50 ms) whatever the load, so at low rates the CPU
per event is mostly that.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))

from fleet_bench_helpers import ENV, Samples, run_in_private_netns, scrape, total, tree_cpu  # noqa: E402

from enforcer.control import ControlError, request  # noqa: E402
from enforcer.demo.billing import signed_request  # noqa: E402
from tests.nats_server import NatsServer, free_port  # noqa: E402

SETUPS = ((1, False), (2, True), (3, True))       # (gateways, fleet)
GOAL_RATE, GOAL_P99 = 2000.0, 0.150
ANSWER_TIMEOUT = 10.0                              # fleet.answer_timeout: a gateway's 503 after this
START_TIMEOUT = 120.0                              # one daemon's start (list load, catch-up), at most
SETTLE_TIMEOUT = ANSWER_TIMEOUT + 5.0              # after a step, for the counters to show every event
IDLE_SECONDS = 3.0                                 # at start: the idle daemons' CPU, measured this long
LATE = 0.050                                       # senders' lag p99 beyond this: the step does not count
PAID, RESTRICTED = "payment.received", "subscriber.restricted"


def address(index: int) -> str:
    """Subscriber ``index``'s address: one /32 each in 100.64.0.0/10 (shared space, routed nowhere)."""
    value = (100 << 24) + (64 << 16) + 1 + index
    return ".".join(str(value >> shift & 255) for shift in (24, 16, 8, 0))


def subscriber_id(index: int) -> str:
    return f"C-{index:07d}"


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else float("nan")


class Churn:
    """Which subscriber each event is about, so that every event changes the kernel: payments
    take the longest-restricted subscriber, restrictions the longest-free one once ``gap`` are
    free (before that, payments only), alternating. A subscriber's next event is then at least
    ``2 * gap`` events later: never in the same applier run (its runs split on a repeated
    subscriber) nor the same kernel batch."""

    def __init__(self, count: int) -> None:
        self.restricted: collections.deque[int] = collections.deque(range(count))
        self.free: collections.deque[int] = collections.deque()
        self.gap = max(1, min(600, count // 2))

    def next(self, i: int) -> tuple[str, int]:
        if self.free and (not self.restricted or (i % 2 == 1 and len(self.free) >= self.gap)):
            index = self.free.popleft()
            self.restricted.append(index)
            return RESTRICTED, index
        index = self.restricted.popleft()
        self.free.append(index)
        return PAID, index


@dataclass
class Daemon:
    """One ``walled-garden run`` with its own table, state, socket and ports."""

    name: str
    work: Path
    table: str
    fleet: dict[str, Any] | None
    api_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.work / "control.sock")

    def write_config(self, list_path: Path, secret_path: Path, subscribers: int) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "state_dir": str(self.work / "state"),
            "subscribers": {"source": str(list_path),
                            "guard": {"max_restrict": subscribers + 1, "max_lift": subscribers + 1}},
            "gateway": {"subscriber_interfaces": ["wgbench0"], "table": self.table},
            "walled_garden": {"allow": ["203.0.113.0/24"]},
            "api": {"socket": self.socket, "listen": f"127.0.0.1:{self.api_port}",
                    "webhook_secret_file": str(secret_path)},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}", "portal_listen": f"127.0.0.1:{free_port()}"},
        }
        if self.fleet is not None:
            config["fleet"] = self.fleet
        path = self.work / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, config_path: Path) -> None:
        with open(self.work / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "enforcer.cli", "run", "--config", str(config_path)],
                                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)

    def ready(self) -> bool:
        """Started (READY=1 is logged as "started": the list is applied, the worker listens) and,
        in a fleet, connected and caught up with the stream."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.log()}")
        if "event=started " not in self.log(None):
            return False
        try:
            status = request(self.socket, "GET", "/v1/status", timeout=2.0)
        except ControlError:
            return False
        if self.fleet is None:
            return True
        fleet = status.get("fleet") or {}
        return bool(fleet.get("connected") and fleet.get("caught_up"))

    def log(self, tail: int | None = 4000) -> str:
        try:
            text = (self.work / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def metrics(self) -> Samples:
        return scrape(self.metrics_port)

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid if self.proc is not None and self.proc.poll() is None else None)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {wait:.0f}s of {sig.name}", file=sys.stderr)
        # the webhook worker shares the process group; make sure nothing of it is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=30, check=False)


@dataclass
class Setup:
    gateways: int
    fleet: bool
    daemons: list[Daemon]
    churn: Churn

    @property
    def label(self) -> str:
        return f"{self.gateways} fleet" if self.fleet else f"{self.gateways} no fleet"


@dataclass
class Step:
    """One setup at one rate for one round: per-event figures and the checks."""

    setup: Setup
    rate: float
    count: int
    all_ok: list[float]             # slowest answer - earliest send, events answered 200 everywhere
    first: list[float]              # the posted-to gateway's answer - its send, when 200
    lag: list[float]                # earliest send - due
    achieved: float
    errors: int                     # events with at least one answer that is not 200
    statuses: collections.Counter[str]
    not_applied: collections.Counter[str]   # 200 answers whose result is not "applied"
    cpu_daemons: list[float]        # µs per event, per gateway
    cpu_nats: float                 # µs per event
    cpu_senders: float              # µs per request
    busy: float                     # cores busy over the step: all daemons, nats-server and senders
    problems: list[str]
    commit: list[dict[float, float]] = field(default_factory=list)   # per gateway: stream -> commit histogram


def histogram(samples: Samples) -> dict[float, float]:
    """``walled_garden_fleet_commit_seconds``'s cumulative buckets: upper bound -> count."""
    return {float(dict(labels)["le"]): value for (name, labels), value in samples.items()
            if name == "walled_garden_fleet_commit_seconds_bucket"}


def quantile(buckets: dict[float, float], q: float) -> float:
    """``q`` of a cumulative histogram, linear within the bucket (as Prometheus' histogram_quantile)."""
    bounds = sorted(buckets)
    total_count = buckets[bounds[-1]] if bounds else 0.0
    if total_count <= 0:
        return float("nan")
    rank, low, below = q * total_count, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return low
            inside = buckets[bound] - below
            return low + (bound - low) * ((rank - below) / inside if inside else 1.0)
        low, below = bound, buckets[bound]
    return low


def worst(commit: list[dict[float, float]], q: float) -> float:
    """The slowest gateway's ``q`` (a fleet has committed an input when its slowest gateway has)."""
    values = [quantile(c, q) for c in commit if c]
    return max(values) if values else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.tag = secrets.token_hex(3)
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.secret_path = work / "webhook.secret"
        self.list_path = work / "restricted.csv"
        self.nats = NatsServer(work / "nats")
        self.setups: list[Setup] = []
        self.senders: list[subprocess.Popen[bytes]] = []

    @property
    def nats_pid(self) -> int | None:
        return self.nats.proc.pid if self.nats.proc is not None else None

    # -- start and stop --------------------------------------------------------------------------
    def start(self) -> None:
        count = self.args.subscribers
        self.secret_path.write_text(self.secret + "\n")
        os.chmod(self.secret_path, 0o600)
        self.list_path.write_text("id,addresses,reason\n" + "".join(
            f"{subscriber_id(i)},{address(i)},overdue\n" for i in range(count)))
        self.nats.start()
        configs: list[tuple[Daemon, Path]] = []
        for gateways, fleet in SETUPS:
            stream = f"WGBENCH{gateways}_{self.tag}"
            daemons = []
            for i in range(1, gateways + 1):
                name = f"gw-{i}"
                section = {"gateway": name, "nats": {"url": self.nats.url}, "stream": stream,
                           "catch_up_timeout": "30s", "answer_timeout": f"{ANSWER_TIMEOUT:g}s"} if fleet else None
                daemon = Daemon(f"{name} of {gateways}", self.work / f"setup{gateways}" / name,
                                f"wgfb{self.tag}_{gateways}_{i}", section)
                configs.append((daemon, daemon.write_config(self.list_path, self.secret_path, count)))
                daemons.append(daemon)
            self.setups.append(Setup(gateways, fleet, daemons, Churn(count)))
        started = time.monotonic()
        for daemon, path in configs:   # one after another: six list loads at once only slow each other
            daemon.start(path)
            deadline = time.monotonic() + START_TIMEOUT
            while not daemon.ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{daemon.name} not ready within {START_TIMEOUT:.0f}s:\n{daemon.log()}")
                time.sleep(0.2)
        print(f"# nats-server and {len(configs)} daemons ready in {time.monotonic() - started:.1f} s, "
              f"{count} restricted subscribers each", flush=True)
        # What the daemons cost while idle: all six run through every step, five of them idle.
        time.sleep(2.0)
        daemons = [d for setup in self.setups for d in setup.daemons]
        before, nats_before, began = [d.cpu() for d in daemons], tree_cpu(self.nats_pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        spent = time.monotonic() - began
        idle = [(d.cpu() - b) / spent * 1e3 for d, b in zip(daemons, before, strict=True)]
        print(f"# idle CPU, ms per second: daemons {' '.join(f'{x:.0f}' for x in idle)} (setups 1, 2, 3), "
              f"nats-server {(tree_cpu(self.nats_pid) - nats_before) / spent * 1e3:.0f}", flush=True)

    def close(self) -> None:
        for proc in self.senders:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for setup in self.setups:
            for daemon in setup.daemons:
                try:
                    daemon.stop()
                except Exception as exc:  # noqa: BLE001 - stop the others whatever this one did
                    print(f"stopping {daemon.name}: {exc!r}", file=sys.stderr)
        self.nats.stop()

    # -- one step --------------------------------------------------------------------------------
    def requests(self, setup: Setup, count: int) -> bytes:
        """``count`` complete signed HTTP requests, NUL-separated, the same bytes for every gateway."""
        now, out, tag = time.time(), [], secrets.token_hex(4)
        for i in range(count):
            kind, index = setup.churn.next(i)
            data: dict[str, Any] = {"subscriber": subscriber_id(index)}
            if kind == RESTRICTED:
                data |= {"addresses": [address(index)], "reason": "overdue"}
            body = {"type": kind, "timestamp": now + i * 1e-6, "data": data}
            signed = signed_request("http://127.0.0.1/v1/events", self.secret, body, f"msg_bench_{tag}_{i}")
            payload = signed.data if isinstance(signed.data, bytes) else b""
            headers = "".join(f"{k}: {v}\r\n" for k, v in signed.header_items())
            out.append(f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
                       f"{headers}\r\n".encode() + payload + b"\0")
        return b"".join(out)

    def sends(self, setup: Setup, gateway: int, n: int) -> bool:
        """Whether gateway ``gateway`` is posted event ``n``: with ``--post all`` every event; with
        ``--post one`` (billing posting each event once, to any gateway) event n goes to gateway
        n mod gateways, and every ``--probe-every``-th also to all the others (same webhook-id: its
        slowest answer is when every gateway has committed it)."""
        if self.args.post == "all" or setup.gateways == 1:
            return True
        return n % setup.gateways == gateway or self.probe(n)

    def probe(self, n: int) -> bool:
        return self.args.post == "all" or n % self.args.probe_every == 0

    def counters(self, setup: Setup) -> list[dict[str, float]]:
        out = []
        for daemon in setup.daemons:
            samples = daemon.metrics()
            out.append({
                "applied": total(samples, "walled_garden_events_total", result="applied"),
                "events": sum(v for (n, labels), v in samples.items() if n == "walled_garden_events_total"
                              and ("result", "applied") not in labels and ("result", "duplicate") not in labels),
                "fleet_applied": total(samples, "walled_garden_fleet_applied_total", kind="event", result="applied"),
                "fleet_event": total(samples, "walled_garden_fleet_applied_total", kind="event"),
                "accepted": total(samples, "walled_garden_fleet_published_total", result="accepted"),
                "duplicate": total(samples, "walled_garden_fleet_published_total", result="duplicate"),
                "unavailable": total(samples, "walled_garden_fleet_published_total", result="unavailable"),
                "commit": histogram(samples),
            })
        return out

    def step(self, setup: Setup, rate: float, seconds: float) -> Step:
        count = max(1, int(rate * seconds))
        step_dir = Path(tempfile.mkdtemp(prefix="step-", dir=self.work))
        requests_path = step_dir / "requests.bin"
        requests_path.write_bytes(self.requests(setup, count))
        before = self.counters(setup)
        everyone = [d for s in self.setups for d in s.daemons]
        nats_pid = self.nats_pid
        cpu_began = time.monotonic()
        cpu_before = [d.cpu() for d in everyone]
        nats_before = tree_cpu(nats_pid)
        start_at = time.monotonic() + 1.5   # the senders read their requests and start Python meanwhile
        outs = []
        self.senders = []
        for i, daemon in enumerate(setup.daemons):
            spec = {"port": daemon.api_port, "requests": str(requests_path), "rate": rate, "start_at": start_at,
                    "timeout": ANSWER_TIMEOUT + 5.0, "connections": self.args.connections,
                    "out": str(step_dir / f"out{i}.json"),
                    "indices": [n for n in range(count) if self.sends(setup, i, n)]}
            spec_path = step_dir / f"spec{i}.json"
            spec_path.write_text(json.dumps(spec))
            outs.append(Path(spec["out"]))
            self.senders.append(subprocess.Popen([sys.executable, str(HERE.parent / "fleet_bench_helpers.py"), "load",
                                                  str(spec_path)], cwd=REPO, stdin=subprocess.DEVNULL))
        limit = 1.5 + seconds + ANSWER_TIMEOUT + 30.0
        for proc in self.senders:
            code = proc.wait(max(start_at + limit - time.monotonic(), 1.0))
            if code != 0:
                raise RuntimeError(f"a sender exited with {code}")
        cpu_after = [d.cpu() for d in everyone]
        nats_after = tree_cpu(nats_pid)
        cpu_wall = time.monotonic() - cpu_began
        results = [json.loads(out.read_text()) for out in outs]
        after = self.settle(setup, before, count)
        spent = {d.name: a - b for d, a, b in zip(everyone, cpu_after, cpu_before, strict=True)}
        busy = (sum(spent.values()) + nats_after - nats_before + sum(float(r["cpu"]) for r in results)) / cpu_wall
        return self.judge(setup, rate, count, start_at, results, before, after,
                          [spent[d.name] / count * 1e6 for d in setup.daemons],
                          (nats_after - nats_before) / count * 1e6, busy)

    def settle(self, setup: Setup, before: list[dict[str, float]], count: int) -> list[dict[str, float]]:
        """The counters once every gateway shows the step's events applied (bounded wait)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            after = self.counters(setup)
            if all(a["applied"] - b["applied"] >= count for a, b in zip(after, before, strict=True)) \
                    or time.monotonic() > deadline:
                return after
            time.sleep(0.2)

    def judge(self, setup: Setup, rate: float, count: int, start_at: float, results: list[dict[str, Any]],
              before: list[dict[str, float]], after: list[dict[str, float]], cpu_daemons: list[float],
              cpu_nats: float, busy: float) -> Step:
        all_ok, first, lag = [], [], []
        errors, last = 0, start_at
        statuses: collections.Counter[str] = collections.Counter()
        not_applied: collections.Counter[str] = collections.Counter()
        probes = 0
        for i in range(count):
            posted = [r for g, r in enumerate(results) if self.sends(setup, g, i)]
            owner = results[i % len(results)]   # the gateway billing posted it to
            sent = min(r["sent"][i] for r in posted)
            lag.append(sent - (start_at + i / rate))
            codes = [r["status"][i] for r in posted]
            for r in posted:
                code = r["status"][i]
                if code != 200:
                    statuses[f"{code} {r['result'][i][:120]}"] += 1
                elif r["result"][i] != "applied":
                    not_applied[r["result"][i]] += 1
            if owner["status"][i] == 200:
                first.append(owner["answered"][i] - owner["sent"][i])
                last = max(last, owner["answered"][i])
            else:
                errors += 1
            if len(posted) == len(results) and (setup.gateways == 1 or self.probe(i)):
                probes += 1
                if all(code == 200 for code in codes):
                    all_ok.append(max(r["answered"][i] for r in posted) - sent)
        achieved = len(first) / (last - start_at) if last > start_at else 0.0
        problems = []
        for daemon, b, a in zip(setup.daemons, before, after, strict=True):
            applied = a["applied"] - b["applied"]
            if applied != count:
                problems.append(f"{daemon.name} applied {applied:.0f} of {count}")
            other = a["events"] - b["events"]
            if other:
                problems.append(f"{daemon.name} counted {other:.0f} events neither applied nor duplicate")
            if setup.fleet and (a["fleet_event"] - b["fleet_event"] != count
                                or a["fleet_applied"] - b["fleet_applied"] != count):
                problems.append(f"{daemon.name} applied {a['fleet_applied'] - b['fleet_applied']:.0f} of {count} "
                                f"stream events ({a['fleet_event'] - b['fleet_event']:.0f} read)")
        if setup.fleet:
            accepted = sum(a["accepted"] - b["accepted"] for a, b in zip(after, before, strict=True))
            duplicate = sum(a["duplicate"] - b["duplicate"] for a, b in zip(after, before, strict=True))
            unavailable = sum(a["unavailable"] - b["unavailable"] for a, b in zip(after, before, strict=True))
            repeats = probes * (setup.gateways - 1)
            if accepted != count or duplicate != repeats or unavailable:
                problems.append(f"stream took {accepted:.0f} (want {count}), duplicates {duplicate:.0f} "
                                f"(want {repeats}), unavailable {unavailable:.0f}")
        if pct(lag, 99) > LATE:
            problems.append(f"the senders fell behind (lag p99 {pct(lag, 99) * 1e3:.0f} ms: CPU, or all --connections "
                            "busy); latencies start at the actual send, so they understate what billing would see")
        sender_cpu = sum(float(r["cpu"]) for r in results) / (count * len(results)) * 1e6
        commit = [{le: a["commit"].get(le, 0.0) - b["commit"].get(le, 0.0) for le in a["commit"]} if setup.fleet else {}
                  for a, b in zip(after, before, strict=True)]
        return Step(setup, rate, count, all_ok, first, lag, achieved, errors, statuses, not_applied, cpu_daemons,
                    cpu_nats, sender_cpu, busy, problems, commit)

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> list[Step]:
        steps: list[Step] = []
        print(HEADER, flush=True)
        for round_no in range(self.args.rounds):
            for k, rate in enumerate(self.args.rates):
                shift = (round_no + k) % len(self.setups)
                for setup in self.setups[shift:] + self.setups[:shift]:
                    step = self.step(setup, rate, self.args.seconds)
                    steps.append(step)
                    print(row(f"r{round_no + 1}", step.setup.label, rate, step.all_ok, step.first, step.lag,
                              step.achieved, step.errors, step.cpu_daemons, step.cpu_nats, step.cpu_senders,
                              step.busy, "ok" if not step.problems else "CHECK", step.commit), flush=True)
                    for problem in step.problems:
                        print(f"    ! {problem}", flush=True)
                    for what, n in (step.statuses + step.not_applied).most_common(5):
                        print(f"    ! {n} x {what}", flush=True)
                    time.sleep(1.0)
        return steps


HEADER = (f"{'round':>5} {'setup':>10} {'offered/s':>9} {'achieved/s':>10} {'strm50':>7} {'strm99':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'own p50':>7} {'own p99':>7} {'lag p99':>7} {'errors':>6}  "
          f"{'daemon us/event':>17} {'nats us/ev':>10} {'sender us/req':>13} {'cores':>5} check")


def row(round_label: str, label: str, rate: float, all_ok: list[float], first: list[float], lag: list[float],
        achieved: float, errors: int, cpu_daemons: list[float], cpu_nats: float, cpu_senders: float,
        busy: float, check: str, commit: list[dict[float, float]] | None = None) -> str:
    daemons = "/".join(f"{c:.0f}" for c in cpu_daemons)
    stream = (f"{worst(commit, 0.5) * 1e3:>7.1f} {worst(commit, 0.99) * 1e3:>7.1f} " if commit and any(commit)
              else f"{'-':>7} {'-':>7} ")
    return (f"{round_label:>5} {label:>10} {rate:>9.0f} {achieved:>10.0f} {stream}{pct(all_ok, 50) * 1e3:>7.1f} "
            f"{pct(all_ok, 99) * 1e3:>7.1f} {max(all_ok, default=float('nan')) * 1e3:>7.1f} "
            f"{pct(first, 50) * 1e3:>7.1f} {pct(first, 99) * 1e3:>7.1f} {pct(lag, 99) * 1e3:>7.1f} {errors:>6}  "
            f"{daemons:>17} {cpu_nats:>10.0f} {cpu_senders:>13.0f} {busy:>5.2f} {check}")


def summary(steps: list[Step], rates: list[float]) -> None:
    print(f"\n# all rounds pooled (p50/p99/max over every event; achieved and CPU: mean of the rounds)\n{HEADER}")
    for rate in rates:
        for gateways, _ in SETUPS:
            mine = [s for s in steps if s.rate == rate and s.setup.gateways == gateways]
            if not mine:
                continue
            cpu = [statistics.mean(s.cpu_daemons[i] for s in mine) for i in range(gateways)]
            pooled = [{le: sum(s.commit[i].get(le, 0.0) for s in mine) for le in mine[0].commit[i]}
                      for i in range(gateways)] if mine[0].commit and any(mine[0].commit) else []
            print(row("all", mine[0].setup.label, rate, [x for s in mine for x in s.all_ok],
                      [x for s in mine for x in s.first], [x for s in mine for x in s.lag],
                      statistics.mean(s.achieved for s in mine), sum(s.errors for s in mine), cpu,
                      statistics.mean(s.cpu_nats for s in mine), statistics.mean(s.cpu_senders for s in mine),
                      statistics.mean(s.busy for s in mine), "ok" if not any(s.problems for s in mine) else "CHECK",
                      pooled))
    print(f"\n# goal: >= {GOAL_RATE:.0f} events/s with all-committed p99 <= {GOAL_P99 * 1e3:.0f} ms")
    for gateways, fleet in SETUPS:
        if not fleet:
            continue
        mine = [s for s in steps if s.setup.gateways == gateways and s.rate >= GOAL_RATE]
        if not mine:
            print(f"{gateways} gateways: no step at >= {GOAL_RATE:.0f}/s (add it to --rates)")
            continue
        achieved = min(s.achieved for s in mine)
        p99 = pct([x for s in mine for x in s.all_ok], 99)
        stream = worst([{le: sum(s.commit[i].get(le, 0.0) for s in mine) for le in mine[0].commit[i]}
                        for i in range(gateways)], 0.99)
        met = achieved >= 0.98 * GOAL_RATE and p99 <= GOAL_P99 and not any(s.errors or s.problems for s in mine)
        print(f"{gateways} gateways: achieved >= {achieved:.0f}/s, all-committed p99 {p99 * 1e3:.1f} ms (request to "
              f"the slowest 200), stream -> slowest gateway's commit p99 {stream * 1e3:.1f} ms: "
              f"{'met' if met else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda text: [float(x) for x in text.split(",")],
                        default=[500.0, 1000.0, 2000.0], help="offered events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=10_000, help="restricted on every gateway")
    parser.add_argument("--post", choices=["one", "all"], default="one",
                        help="one: each event to one gateway (round robin), as billing does with a fleet, and every "
                             "--probe-every-th to all of them to time 'all committed'; all: every event to every "
                             "gateway (default one)")
    parser.add_argument("--probe-every", type=int, default=20, help="with --post one (default 20)")
    parser.add_argument("--connections", type=int, default=1024, help="at most, per sender (gateway)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (created; kept afterwards: the daemons' "
                        "logs, configs and state, nats-server's log) instead of a temporary directory")
    args = parser.parse_args()
    if not os.environ.get(ENV):
        if shutil.which("nats-server") is None:
            print("needs nats-server (Debian package nats-server; bash .ci/install installs it)", file=sys.stderr)
            return 1
        return run_in_private_netns(str(HERE), sys.argv[1:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # cleanup below runs on SIGTERM too
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = str(Path(args.keep).resolve())
            Path(work).mkdir(parents=True, exist_ok=True)
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="wg-fleet-bench-"))
        bench = Bench(args, Path(work))
        try:
            bench.start()
            steps = bench.run()
        except KeyboardInterrupt:
            print("interrupted; stopping the daemons and nats-server", file=sys.stderr)
            return 130
        except BaseException:
            for setup in bench.setups:
                for daemon in setup.daemons:
                    if daemon.proc is not None and "Traceback" in daemon.log(None):
                        print(f"===== {daemon.name} daemon.log =====\n{daemon.log()}", file=sys.stderr)
            raise
        finally:
            bench.close()
        summary(steps, args.rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
