"""Scale: the daemon as shipped with N restricted subscribers: cold start, memory, restart after
``kill -9``, one payment's latency (issue 16).

    sudo .venv/bin/python tests/bench/bench_scale.py                              # 10k and 100k
    sudo .venv/bin/python tests/bench/bench_scale.py --sizes 10000 --restarts 2
    sudo .venv/bin/python tests/bench/bench_scale.py --sizes 1000000 --format csv # 1.25M addresses

Runs itself inside a private network namespace (``private_netns``), so it never touches the
machine's ruleset; the reference load goes into one more namespace, held by a process of
its own that dies with the benchmark. Subscriber i has
100.64.0.0 + 1 + i, every fourth also the /56 2001:db8:: + (i + 1) << 72 (as
``bench_dataplane.subscribers()``), so N subscribers are 1.25 N addresses, all walled-garden.

The daemon is ``walled-garden run --config <cfg>`` (the venv's entry point, the unit's
ExecStart), started as systemd starts it: its own process group, cwd /, a ``NOTIFY_SOCKET``
(``READY=1`` is stamped when it arrives), stdout read line by line and stamped (journald's role),
the webhook worker forked by the daemon itself. The config: state in a temporary directory, the
list file, one subscriber interface (a veth inside the namespace), ``subscriber_prefixes``, a signed-webhook
listener on 127.0.0.1, the mass-change guard opened (a first list of N would be held); no fleet,
sessions or DNS forwarder. Per size:

1. **Cold start**: empty state directory, no table. *daemon* is the time from exec until the
   daemon's status shows the list in force with N entries, N subscribers restricted,
   ``kernel_in_sync``, no rebuild and a sync done. The poll asks the control socket every 50 ms
   for ``GET /v1/status``, the exact request and answer of ``walled-garden status --json``
   (running the CLI itself costs ~0.15 s of CPU per call on this 2-vCPU machine, which would both
   coarsen the figure and slow the daemon); once reached, the CLI is run once and must show the
   same (``--poll-cli`` polls with the CLI instead). *nft -f* is the physical reference: the
   output of ``walled-garden render`` (same config, same list) loaded with ``nft -f`` into a fresh
   namespace, median of ``--ref-repeat`` loads (one before the daemon starts, the rest after it
   stopped). Goal: daemon ≤ 2 × nft -f. The daemon's own log lines are shown with their arrival
   time: where the start goes.
2. **Memory** ``--settle`` seconds after the cold start is in sync (and again after the last
   restart): VmRSS (/proc/PID/status) and PSS (/proc/PID/smaps_rollup; shared pages split among
   the processes sharing them) of the daemon and of its webhook worker, and the sums.
   Goal: RSS sum ≤ 100 MB (10^6 bytes; the figures are in MB too).
3. **Restart after kill -9**: SIGKILL to the daemon's process group (daemon and worker), then
   exec again; *webhook 200*: a signed ``payment.received`` for a restricted subscriber, retried
   every 20 ms with the same webhook id, until answered 200; *in sync*: status as in 1 (N entries,
   the restricted count less those paid). Goal: the later of the two ≤ 2 s, every restart.
4. **One payment**: with the daemon in sync, a signed ``payment.received`` for a restricted
   subscriber: *answered 200* from send to answer; *kernel* from send until ``get element`` of
   its IPv4 address in ``portal4_32`` answers "no such element", polled every ~0.5 ms from another
   thread (the request ``nft get element`` sends, made on a netlink socket here: nft 1.0.6 reloads
   every set's elements before answering once the table changed, ~0.3 s at 125k elements).
   ``--payments`` of them, one at a time; median and max. No goal here (docs/benchmarks.md has
   the payment-latency goal at 100k).

Each size prints its table and how long it took; the last lines are one summary per size with
each goal "met" or "NOT met" as measured. Every wait is bounded (timeouts grow with N); the
daemon (whole process group), the tables and the namespaces are removed on any exit, also on
SIGTERM/SIGHUP/Ctrl-C and when the wrapper dies (the daemon and the reference namespace's holder
get SIGKILL from the kernel when this process dies; a work directory left by a killed run is
removed by the next run). Exit code 1 when a measurement could not be
made (timeout, daemon died), 0 otherwise, whatever the goals say.

``WG_BENCH_PYSPY=<file>``: the daemon runs under ``py-spy record`` (raw collapsed stacks in
<file>, for ``WG_BENCH_PYSPY_SECONDS``, default 10, from the daemon's start), to see where a
cold start's time goes. py-spy ends the daemon when it stops, so the figures after the cold start
fail in such a run: use ``--restarts 0 --payments 1``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from private_netns import reexec_in_private_netns  # noqa: E402
from scale_helpers import (  # noqa: E402
    FORMATS,
    Daemon,
    ElementProbe,
    Memory,
    ScratchNetns,
    address4,
    address_count,
    cli_status,
    die_with_parent,
    in_sync,
    memory,
    payers,
    post_payment,
    problem,
    python_cli,
    status,
    subscriber_id,
    write_list,
)

from enforcer.dataplane.layout import redirect_set  # noqa: E402
from enforcer.dataplane.libnftables import Nftables, NftError  # noqa: E402

API_HOST, API_PORT = "127.0.0.1", 18787
IFACE = "wgscale0"
POLL = 0.05
GOAL_RATIO, GOAL_MB, GOAL_RESTART = 2.0, 100.0, 2.0
WORKDIR_PREFIX = "wg-scale-"


class Failed(Exception):
    """A measurement could not be made (timeout, the daemon died); the message says which."""


@dataclass
class Restart:
    webhook_s: float | None
    sync_s: float | None
    ready_s: float | None
    webhook_tries: int


@dataclass
class Result:
    n: int
    fmt: str
    list_mb: float = 0.0
    generate_s: float = 0.0
    render_s: float = 0.0
    ref_s: list[float] = field(default_factory=list)
    cold_s: float | None = None
    cold_ready_s: float | None = None
    cli_confirms: bool | None = None
    cold_log: list[tuple[float, str]] = field(default_factory=list)
    memory: dict[str, dict[str, Memory | None]] = field(default_factory=dict)  # when -> process -> figures
    restarts: list[Restart] = field(default_factory=list)
    restart_log: list[tuple[float, str]] = field(default_factory=list)
    payments: list[tuple[float, float | None]] = field(default_factory=list)  # (answered, kernel) seconds
    wall_s: float = 0.0
    error: str | None = None


def timeout_for(n: int) -> float:
    """Cold start and restart bound: generous at any size (the issue measured 6.6 s at 100k)."""
    return 60.0 + n * 3e-4


# -- the pieces ---------------------------------------------------------------------------------

def reference_load(nft: str, rendered: Path, table: str, n: int) -> float:
    """``nft -f`` of the rendered transaction into a fresh namespace, timed; the table deleted
    after, the namespace gone with its holder."""
    with ScratchNetns() as netns:
        started = time.perf_counter()
        result = netns.run([nft, "-f", str(rendered)], timeout_for(n))
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise Failed(f"nft -f of the rendered transaction failed: {result.stderr.strip()[:500]}")
        netns.run([nft, "delete", "table", "inet", table], timeout_for(n))
    return seconds


def wait_in_sync(daemon: Daemon, ask: Callable[[], dict[str, Any] | None], entries: int, restricted: set[int],
                 timeout: float) -> float:
    """Seconds from the daemon's exec until ``ask()`` shows it in sync; polls every ``POLL`` s."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if daemon.exited() is not None:
            raise Failed(f"daemon exited with {daemon.exited()}:\n{daemon.tail()}")
        answer = ask()
        at = time.monotonic() - daemon.started
        if in_sync(answer, entries, restricted):
            return at
        if (why := problem(answer)) is not None:
            raise Failed(why)
        last = answer or last
        time.sleep(POLL)
    brief = {k: (last or {}).get(k) for k in ("modes", "kernel_in_sync", "rebuilding_from_kernel", "last_sync")}
    raise Failed(f"not in sync within {timeout:.0f} s (last status {brief}):\n{daemon.tail()}")


def wait_ready(daemon: Daemon, timeout: float) -> float | None:
    """When ``READY=1`` arrived (s after exec); it may come after status is already in sync."""
    deadline = time.monotonic() + timeout
    while daemon.ready_at() is None and daemon.exited() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return daemon.ready_at()


def timeline(daemon: Daemon) -> list[tuple[float, str]]:
    """The daemon's log lines and sd_notify datagrams by arrival, shortened for the report."""
    lines = [(at, line.replace("level=INFO ", "").replace("logger=walled_garden.", "")) for at, line in daemon.lines]
    lines += [(at, "sd_notify " + text.replace("\n", " ")) for at, text in daemon.notices]
    return sorted(lines)


def sample_memory(daemon: Daemon) -> dict[str, Memory | None]:
    worker = daemon.worker()
    return {"daemon": memory(daemon.pid), "webhook worker": memory(worker) if worker else None}


def restart_once(daemon: Daemon, ask: Callable[[], dict[str, Any] | None], secret: str, n: int, payer: int,
                 paid_before: int) -> Restart:
    """kill -9 the group, exec again, time the first 200 to a payment and the return to sync."""
    daemon.stop(kill=True)
    sid = subscriber_id(payer)
    event_id = "msg_scale_" + secrets.token_hex(8)
    timeout = timeout_for(n)
    webhook: list[float] = []
    tries = [0]
    stop = threading.Event()

    def pay() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            tries[0] += 1
            code = post_payment(API_HOST, API_PORT, secret, sid, event_id, timeout=5.0)
            if code == 200:
                webhook.append(time.monotonic() - daemon.started)
                return
            time.sleep(0.02)

    daemon.start()
    payer_thread = threading.Thread(target=pay, daemon=True)
    payer_thread.start()
    try:
        sync_s: float | None = wait_in_sync(daemon, ask, n, {n - paid_before, n - paid_before - 1}, timeout)
    except Failed:
        stop.set()
        raise
    finally:
        payer_thread.join(timeout + 10)
    return Restart(webhook[0] if webhook else None, sync_s, wait_ready(daemon, timeout), tries[0])


def one_payment(probe: ElementProbe, secret: str, payer: int) -> tuple[float, float | None]:
    """(send → 200, send → the kernel's set no longer holds the address) in seconds."""
    address = address4(payer)
    if not probe.holds(address):
        raise Failed(f"{address} ({subscriber_id(payer)}) is not in {redirect_set(4, 32)} before its payment")
    gone: list[float] = []
    started = time.perf_counter()
    deadline = started + 30.0

    def watch() -> None:
        while time.perf_counter() < deadline:
            if not probe.holds(address):
                gone.append(time.perf_counter() - started)
                return
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = post_payment(API_HOST, API_PORT, secret, subscriber_id(payer), "msg_pay_" + secrets.token_hex(8), 30.0)
    answered = time.perf_counter() - started
    watcher.join(35.0)
    if code != 200:
        raise Failed(f"payment for {subscriber_id(payer)} answered {code}")
    return answered, gone[0] if gone else None


def delete_table(nft: Nftables, table: str) -> None:
    try:
        nft.run(f"delete table inet {table}")
    except NftError:
        pass   # there was none


# -- one size ------------------------------------------------------------------------------------

def run_size(n: int, args: argparse.Namespace, root: Path, nft_bin: str, nft: Nftables,
             cleanups: contextlib.ExitStack) -> Result:
    began = time.monotonic()
    result = Result(n, args.format)
    work = Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=root))
    table = f"wg_scale_{secrets.token_hex(3)}"
    list_path = work / f"restricted.{args.format}"
    secret_path = work / "webhook.secret"
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    secret_path.write_text(secret + "\n")
    os.chmod(secret_path, 0o600)
    config_path = work / "config.yaml"
    socket_path = str(work / "control.sock")
    config_path.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"),
        "subscribers": {"source": str(list_path), "guard": {"max_restrict": 100_000_000, "max_lift": 100_000_000}},
        "gateway": {"subscriber_interfaces": [IFACE], "table": table,
                    "subscriber_prefixes": ["100.64.0.0/10", "2001:db8::/32"]},
        "walled_garden": {"allow": ["203.0.113.0/24"], "dns": "any"},
        "api": {"socket": socket_path, "listen": f"{API_HOST}:{API_PORT}", "webhook_secret_file": str(secret_path)},
    }, sort_keys=False))
    cli = python_cli()

    started = time.perf_counter()
    result.list_mb = write_list(list_path, n, args.format) / 1e6
    result.generate_s = time.perf_counter() - started
    print(f"\n# {n:,} subscribers ({address_count(n):,} addresses), list {args.format} {result.list_mb:.1f} MB "
          f"written in {result.generate_s:.2f} s; table {table}", flush=True)

    rendered = work / "rendered.nft"
    started = time.perf_counter()
    with open(rendered, "w") as out:
        r = subprocess.run([*cli, "render", "--config", str(config_path)], stdout=out, stderr=subprocess.PIPE,
                           text=True, timeout=timeout_for(n))
    result.render_s = time.perf_counter() - started
    if r.returncode != 0:
        raise Failed(f"walled-garden render failed: {r.stderr.strip()[:500]}")
    result.ref_s.append(reference_load(nft_bin, rendered, table, n))
    print(f"  nft -f reference: {result.ref_s[-1]:.3f} s (render took {result.render_s:.1f} s)", flush=True)

    if args.poll_cli:
        def ask() -> dict[str, Any] | None:
            return cli_status(cli, config_path)
    else:
        def ask() -> dict[str, Any] | None:
            return status(socket_path)

    spy = os.environ.get("WG_BENCH_PYSPY")   # a file: the daemon's stacks sampled by py-spy (raw, collapsed)
    wrap = [str(Path(sys.executable).with_name("py-spy")), "record", "-r", "200", "-f", "raw", "-o", spy, "-d",
            os.environ.get("WG_BENCH_PYSPY_SECONDS", "10"), "--"] if spy else []
    daemon = Daemon([*wrap, *cli, "run", "--config", str(config_path)], work / "daemon.log", work / "notify.sock")
    cleanups.callback(delete_table, nft, table)
    cleanups.callback(daemon.stop)
    delete_table(nft, table)
    try:
        # 1. cold start
        daemon.start()
        result.cold_s = wait_in_sync(daemon, ask, n, {n}, timeout_for(n))
        result.cold_ready_s = wait_ready(daemon, timeout_for(n))
        result.cold_log = timeline(daemon)
        result.cli_confirms = in_sync(cli_status(cli, config_path), n, {n})
        print(f"  cold start: in sync after {result.cold_s:.2f} s", flush=True)

        # 2. memory, settled
        time.sleep(args.settle)
        result.memory["after cold start"] = sample_memory(daemon)

        # 3. restarts after kill -9; 4. payments: each pays a different subscriber
        chosen = iter(payers(n, args.restarts + args.payments))
        for i in range(args.restarts):   # restart i finds i subscribers paid before it
            restart = restart_once(daemon, ask, secret, n, next(chosen), i)
            result.restarts.append(restart)
            if i == 0:
                result.restart_log = timeline(daemon)
            print(f"  restart {i + 1}: webhook 200 after {fmt_s(restart.webhook_s)}, in sync after "
                  f"{fmt_s(restart.sync_s)}", flush=True)
        if args.restarts:
            time.sleep(args.settle)
            result.memory["after last restart"] = sample_memory(daemon)
        probe = ElementProbe(table, redirect_set(4, 32))
        try:
            for _ in range(args.payments):
                result.payments.append(one_payment(probe, secret, next(chosen)))
        finally:
            probe.close()
    except BaseException:
        daemon.stop(kill=True)   # interrupted: at once (the wrapper kills us 0.25 s after a Ctrl-C)
        raise
    finally:
        daemon.stop()
        delete_table(nft, table)
    for _ in range(args.ref_repeat - 1):
        result.ref_s.append(reference_load(nft_bin, rendered, table, n))
    shutil.rmtree(work, ignore_errors=True)
    result.wall_s = time.monotonic() - began
    return result


# -- the report ----------------------------------------------------------------------------------

def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "NOT met"


def mb(kib: int) -> float:
    return kib * 1024 / 1e6


def memory_sum(figures: dict[str, Memory | None]) -> tuple[float, float] | None:
    if any(m is None for m in figures.values()):
        return None
    return (sum(mb(m.rss_kib) for m in figures.values() if m), sum(mb(m.pss_kib) for m in figures.values() if m))


def restart_worst(result: Result) -> float | None:
    times = [max(r.webhook_s, r.sync_s) for r in result.restarts if r.webhook_s is not None and r.sync_s is not None]
    return max(times) if times and len(times) == len(result.restarts) else None


def report(result: Result) -> None:
    ref = statistics.median(result.ref_s) if result.ref_s else None
    n = result.n
    print(f"\n## {n:,} restricted subscribers ({address_count(n):,} addresses), list {result.fmt} "
          f"{result.list_mb:.1f} MB; this size took {result.wall_s:.0f} s")
    print(f"{'cold start':44} {'seconds':>9}")
    print(f"{'  daemon: exec -> status in sync':44} {fmt_s(result.cold_s):>9}   (READY=1 at "
          f"{fmt_s(result.cold_ready_s)}; CLI status --json confirms: {result.cli_confirms})")
    print(f"{'  nft -f of the rendered transaction':44} {fmt_s(ref):>9}   (median of "
          f"{', '.join(f'{s:.3f}' for s in result.ref_s)})")
    ratio = result.cold_s / ref if result.cold_s is not None and ref else None
    print(f"{'  ratio':44} {'-' if ratio is None else f'{ratio:.2f}x':>9}   goal <= {GOAL_RATIO:g}x: "
          f"{verdict(None if ratio is None else ratio <= GOAL_RATIO)}")
    if result.cold_log:
        print("  daemon log and sd_notify during the cold start (s after exec; first 14):")
        for at, line in result.cold_log[:14]:
            print(f"    {at:7.2f}  {line[:160]}")
    for when, figures in result.memory.items():
        print(f"{'memory ' + when:44} {'VmRSS MB':>9} {'PSS MB':>9}")
        for name, m in figures.items():
            print(f"  {name:42} {'-' if m is None else f'{mb(m.rss_kib):.1f}':>9} "
                  f"{'-' if m is None else f'{mb(m.pss_kib):.1f}':>9}")
        sums = memory_sum(figures)
        rss, pss = ("-", "-") if sums is None else (f"{sums[0]:.1f}", f"{sums[1]:.1f}")
        print(f"  {'sum':42} {rss:>9} {pss:>9}"
              f"   goal RSS sum <= {GOAL_MB:g} MB: {verdict(None if sums is None else sums[0] <= GOAL_MB)}")
    if result.restarts:
        print(f"{'restart after kill -9 (s after exec)':44} {'webhook 200':>11} {'in sync':>9} {'READY=1':>9}")
        for i, r in enumerate(result.restarts, 1):
            print(f"  {i:<42} {fmt_s(r.webhook_s):>11} {fmt_s(r.sync_s):>9} {fmt_s(r.ready_s):>9}"
                  f"   ({r.webhook_tries} webhook tries)")
        worst = restart_worst(result)
        print(f"  {'worst of both':42} {fmt_s(worst):>11}   goal <= {GOAL_RESTART:g} s: "
              f"{verdict(None if worst is None else worst <= GOAL_RESTART)}")
        if result.restart_log:
            print("  daemon log and sd_notify during restart 1 (s after exec; first 14):")
            for at, line in result.restart_log[:14]:
                print(f"    {at:7.2f}  {line[:160]}")
    if result.payments:
        answered = [a * 1000 for a, _ in result.payments]
        kernel = [k * 1000 for _, k in result.payments if k is not None]
        print(f"{f'one payment ({len(answered)}, one at a time)':44} {'median ms':>9} {'max ms':>9}")
        print(f"  {'sent -> answered 200':42} {statistics.median(answered):9.1f} {max(answered):9.1f}")
        if kernel:
            print(f"  {'sent -> kernel no longer holds the address':42} {statistics.median(kernel):9.1f} "
                  f"{max(kernel):9.1f}" + ("" if len(kernel) == len(answered) else
                                            f"   ({len(answered) - len(kernel)} never left the set)"))
    if result.error:
        print(f"  FAILED: {result.error}")


def summary(result: Result) -> str:
    ref = statistics.median(result.ref_s) if result.ref_s else None
    ratio = result.cold_s / ref if result.cold_s is not None and ref else None
    sums = memory_sum(result.memory.get("after cold start", {"daemon": None}))
    worst = restart_worst(result)
    answered = statistics.median(a for a, _ in result.payments) * 1000 if result.payments else None
    return (f"summary {result.n:,} ({result.fmt}): cold start {fmt_s(result.cold_s)} = "
            f"{'-' if ratio is None else f'{ratio:.1f}x'} nft -f {fmt_s(ref)} (<= {GOAL_RATIO:g}x "
            f"{verdict(None if ratio is None else ratio <= GOAL_RATIO)}); RSS daemon+worker "
            f"{'-' if sums is None else f'{sums[0]:.0f} MB'} (<= {GOAL_MB:g} MB "
            f"{verdict(None if sums is None else sums[0] <= GOAL_MB)}); restart worst {fmt_s(worst)} "
            f"(<= {GOAL_RESTART:g} s {verdict(None if worst is None else worst <= GOAL_RESTART)}); payment median "
            f"{'-' if answered is None else f'{answered:.0f} ms'}" + (" [FAILED]" if result.error else ""))


# -- main ----------------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> int:
    nft_bin = shutil.which("nft")
    if nft_bin is None:
        print("needs nft (Debian package nftables)", file=sys.stderr)
        return 1
    # the subscriber interface: one end of a veth pair inside this namespace (no dummy module here)
    subprocess.run(["ip", "link", "add", IFACE, "type", "veth", "peer", "name", IFACE + "p"], check=True, timeout=10)
    for dev in (IFACE, IFACE + "p"):
        subprocess.run(["ip", "link", "set", dev, "up"], check=True, timeout=10)
    nft = Nftables()
    print(f"nft: {subprocess.run([nft_bin, '--version'], capture_output=True, text=True).stdout.strip()}; kernel "
          f"{os.uname().release}; {os.cpu_count()} CPUs; netns {os.environ.get('WG_BENCH_NETNS')}; "
          f"daemon: {' '.join(python_cli())} run", flush=True)
    results: list[Result] = []
    remove_stale_workdirs()
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as root, \
            contextlib.ExitStack() as cleanups:
        for n in args.sizes:
            result = Result(n, args.format)
            began = time.monotonic()
            try:
                result = run_size(n, args, Path(root), nft_bin, nft, cleanups)
            except Failed as exc:
                result.error = str(exc)
                result.wall_s = time.monotonic() - began
            results.append(result)
            report(result)
    print()
    for result in results:
        print(summary(result))
    return 1 if any(r.error for r in results) else 0


def remove_stale_workdirs() -> None:
    """Work directories of earlier runs whose process is gone: a run killed outright (the wrapper
    SIGKILLs this process when it is itself interrupted) cannot remove its own."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = path.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def sizes(text: str) -> list[int]:
    values = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if not values or not all(1 <= v <= 4_000_000 for v in values):
        raise argparse.ArgumentTypeError("comma-separated sizes in 1..4,000,000")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes, default=sizes("10000,100000"))
    parser.add_argument("--format", choices=FORMATS, default="csv", help="list file format (default csv)")
    parser.add_argument("--restarts", type=int, default=3, help="kill -9 and restart this many times")
    parser.add_argument("--payments", type=int, default=5, help="single payments timed")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before memory is read")
    parser.add_argument("--ref-repeat", type=int, default=3, help="nft -f reference loads (median)")
    parser.add_argument("--poll-cli", action="store_true", help="poll `walled-garden status --json` itself")
    args = parser.parse_args()
    if not (0 <= args.restarts <= 50 and 0 <= args.payments <= 1000 and 0 <= args.settle <= 600
            and 1 <= args.ref_repeat <= 20):
        parser.error("--restarts 0..50, --payments 0..1000, --settle 0..600, --ref-repeat 1..20")
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    die_with_parent(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))   # finally blocks clean up
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
