"""Event benchmarks: sustained signed events per second with 100k restricted, and list churn.

    sudo .venv/bin/python tests/bench/bench_events.py [--subscribers 100000] [--rate 2000] [--seconds 10]
        [--client python|wrk] [--connections 64]

Runs in a private network namespace (created and removed here). The daemon side (webhook API,
batching, kernel, conntrack, SQLite) runs in this process; the load comes from a separate
process with pre-signed requests. ``--client python`` (default) sends open loop at ``--rate``,
so a slow daemon shows up as latency rather than as a politely slower client, but the Python
client itself needs most of a core at 2,000/s. ``--client wrk`` replays pre-signed requests
through wrk (C, ``--connections`` in flight, closed loop, as fast as the daemon answers), which
leaves the second core to the daemon and measures its ceiling. Every event changes kernel
state: payments lift and restrictions re-restrict alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))
sys.path.insert(0, str(HERE.parent))

from bench_dataplane import TABLE, subscribers  # noqa: E402
from private_netns import reexec_in_private_netns  # noqa: E402

from enforcer.api.listeners import start_tcp_site  # noqa: E402
from enforcer.api.webhooks import load_webhook_secret, webhook_app  # noqa: E402
from enforcer.config import parse_config  # noqa: E402
from enforcer.daemon import Enforcer  # noqa: E402
from enforcer.dataplane.kernel import KernelDataplane  # noqa: E402
from enforcer.dataplane.libnftables import Nftables, NftError  # noqa: E402
from enforcer.sources import ListUpdate  # noqa: E402
from enforcer.webhook_worker import WorkerBridge  # noqa: E402

PORT = 18788

LOAD = r"""
import asyncio, json, sys, time
import aiohttp
from enforcer.demo.billing import signed_request

async def main():
    url, secret, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    subs = json.loads(sys.stdin.read())
    total = int(rate * seconds)
    now = time.time()
    requests = []
    for i in range(total):
        sid, addr = subs[i // 2 % len(subs)]
        if i % 2 == 0:
            body = {"type": "payment.received", "timestamp": now + i * 1e-6, "data": {"subscriber": sid}}
        else:
            body = {"type": "subscriber.restricted", "timestamp": now + i * 1e-6,
                    "data": {"subscriber": sid, "addresses": [addr], "reason": "overdue"}}
        r = signed_request(url, secret, body)
        requests.append((r.data, dict(r.header_items())))
    latencies, errors = [], 0
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(data, headers, due):
            nonlocal errors
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            started = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)
        start = time.perf_counter() + 0.5
        await asyncio.gather(*(one(d, h, start + i / rate) for i, (d, h) in enumerate(requests)))
        elapsed = time.perf_counter() - start
    print(json.dumps({"sent": total, "errors": errors, "elapsed": elapsed, "latencies": latencies}))

asyncio.run(main())
"""


def presign(url: str, secret: str, targets: list[tuple[str, str]], count: int) -> bytes:
    """``count`` complete signed HTTP requests, NUL-separated, for presigned.lua."""
    from enforcer.demo.billing import signed_request
    host = url.split("/")[2]
    now = time.time()
    out = []
    for i in range(count):
        sid, addr = targets[i // 2 % len(targets)]
        if i % 2 == 0:
            body: dict[str, object] = {"type": "payment.received", "timestamp": now + i * 1e-6,
                                       "data": {"subscriber": sid}}
        else:
            body = {"type": "subscriber.restricted", "timestamp": now + i * 1e-6,
                    "data": {"subscriber": sid, "addresses": [addr], "reason": "overdue"}}
        r = signed_request(url, secret, body)
        data = r.data if isinstance(r.data, bytes) else b""
        headers = "".join(f"{k}: {v}\r\n" for k, v in r.header_items())
        out.append(f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n{headers}\r\n"
                   .encode() + data + b"\0")
    return b"".join(out)


async def run_wrk(args: argparse.Namespace, url: str, secret: str, targets: list[tuple[str, str]],
                  work: str) -> dict[str, float]:
    requests_file = Path(work, "requests.bin")
    wrk = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds:.0f}s", "--timeout", "10s",
        "-s", str(HERE.parent / "presigned.lua"), url, "--", str(requests_file),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await wrk.communicate()
    line = [x for x in out.decode().splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a running process (0 for none), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else float("nan")


async def run(args: argparse.Namespace, work: str) -> None:
    secret_file = Path(work, "secret")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    await asyncio.to_thread(secret_file.write_text, secret)
    config = parse_config(json.dumps({
        "state_dir": f"{work}/state", "subscribers": {"source": f"{work}/list.csv"},
        "gateway": {"subscriber_interfaces": ["eth1"], "table": TABLE},
        "walled_garden": {"allow": ["203.0.113.0/24"]},
        "api": {"socket": f"{work}/control.sock", "webhook_secret_file": str(secret_file)}}))
    nft = Nftables()
    try:
        nft.run(f"delete table inet {TABLE}")
    except NftError:   # no table left from an earlier run
        pass
    commits: list[float] = []
    enforcer = Enforcer(config, dataplane=KernelDataplane(TABLE, nft))
    observe = enforcer.metrics.event_to_enforce.observe

    def observe_and_keep(value: float, exemplar: dict[str, str] | None = None) -> None:
        commits.append(value)
        observe(value, exemplar)
    enforcer.metrics.event_to_enforce.observe = observe_and_keep  # type: ignore[method-assign, assignment]
    await enforcer.engine.restore()
    subs = subscribers(args.subscribers)
    started = time.perf_counter()
    await enforcer.lists.on_list(ListUpdate(subs, "bench", "1"), approved_by="benchmark")
    cold_s = time.perf_counter() - started
    cold_sync = enforcer.engine.last_sync["seconds"]

    # 1 % churn: 1 % of entries replaced by new subscribers (half restrict, half lift).
    churn = args.subscribers // 100
    changed = subs[churn:] + subscribers(args.subscribers + churn)[args.subscribers:]
    started = time.perf_counter()
    await enforcer.lists.on_list(ListUpdate(changed, "bench", "2"), approved_by="benchmark")
    churn_s = time.perf_counter() - started
    churn_sync = enforcer.engine.last_sync["seconds"]
    await enforcer.lists.on_list(ListUpdate(subs, "bench", "3"), approved_by="benchmark")
    await asyncio.sleep(1)  # let background flushes of the list loads finish

    if args.in_process:  # the pre-worker design, for comparison
        app = webhook_app(enforcer.events, load_webhook_secret(str(secret_file)))
        site = await start_tcp_site(app, "127.0.0.1", PORT)
        stop_worker, worker_task = None, None
    else:  # as `walled-garden run` does it: HTTP and signatures in the webhook worker process
        stop_worker = asyncio.Event()
        bridge = WorkerBridge(enforcer.events, "127.0.0.1", PORT, str(secret_file))
        worker_task = asyncio.create_task(bridge.run(stop_worker))
        await bridge.wait_ready()

    async def cleanup() -> None:
        if stop_worker is not None and worker_task is not None:
            stop_worker.set()
            await worker_task
        else:
            await site.cleanup()
    targets = [(s.id, str(s.addresses[0].network_address)) for s in subs[: max(1000, int(args.rate))]]
    if args.client == "wrk":
        url = f"http://127.0.0.1:{PORT}/v1/events"
        commits.clear()
        batches_before = enforcer.events.batcher.batches
        # Enough for 5,000/s: once wrk runs out it gets 404s, which are counted apart (below).
        requests = presign(url, secret, targets, int(max(args.rate, 5000) * args.seconds) + 1000)
        await asyncio.to_thread(Path(work, "requests.bin").write_bytes, requests)
        profile = None
        if os.environ.get("WG_BENCH_PROFILE_EVENTS"):  # the daemon side during the load only
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        worker_pid = None if args.in_process else bridge.process.pid  # type: ignore[union-attr]
        cpu_before, worker_before = time.process_time(), process_cpu(worker_pid)
        wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = await run_wrk(args, url, secret, targets, work)
        cpu, worker_cpu = time.process_time() - cpu_before, process_cpu(worker_pid) - worker_before
        wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        wrk_cpu = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
        if profile is not None:
            import pstats
            profile.disable()
            target = os.environ["WG_BENCH_PROFILE_EVENTS"]
            if target.endswith(".prof"):          # for pstats / snakeviz: callers, call graphs
                profile.dump_stats(target)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        batches = enforcer.events.batcher.batches - batches_before
        await cleanup()
        await enforcer.close()
        applied = int(result["statuses"].get("200", 0))
        if applied < result["requests"]:
            print(f"WARNING: {result['requests'] - applied} answers were not 200 (404 = the pre-signed requests "
                  "ran out); the rate below counts 200s only", file=sys.stderr)
        rate = applied / (result["duration_us"] / 1e6)
        print(f"\n# sustained signed events, {args.subscribers} restricted, wrk closed loop, "
              f"{args.connections} connections, {args.seconds:.0f} s")
        print(f"answered {result['requests']}, applied {applied} ({rate:.0f}/s), statuses {result['statuses']}, "
              f"socket errors {result['errors']}, {batches} kernel batches "
              f"({applied / max(batches, 1):.1f} per transaction)")
        per_event = 1e6 / max(applied, 1)
        in_it = ", webhooks in it" if args.in_process else ""
        print(f"CPU per event: daemon {cpu * per_event:.0f} us (all threads{in_it}), "
              f"webhook worker {worker_cpu * per_event:.0f} us, wrk {wrk_cpu * per_event:.0f} us "
              f"({(cpu + worker_cpu + wrk_cpu) / (result['duration_us'] / 1e6):.2f} of {os.cpu_count()} cores busy)")
        print(f"event received -> kernel commit: p50 {pct(commits, 50) * 1000:.1f} ms, "
              f"p99 {pct(commits, 99) * 1000:.1f} ms")
        print(f"request -> 200 (wrk, incl. conntrack flush): p50 {result['p50_us'] / 1000:.1f} ms, "
              f"p90 {result['p90_us'] / 1000:.1f} ms, p99 {result['p99_us'] / 1000:.1f} ms")
        return
    load = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOAD, f"http://127.0.0.1:{PORT}/v1/events", secret, str(args.rate),
        str(args.seconds), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[2])})
    commits.clear()
    batches_before = enforcer.events.batcher.batches
    out, _ = await load.communicate(json.dumps(targets).encode())
    result = json.loads(out)
    await cleanup()
    batches = enforcer.events.batcher.batches - batches_before
    await enforcer.close()
    try:
        nft.run(f"delete table inet {TABLE}")
    except NftError:   # already gone
        pass
    achieved = result["sent"] / result["elapsed"]
    lat = result["latencies"]
    print(f"\n# list churn with {args.subscribers} restricted (kernel sync only / whole on_list incl. state)")
    print(f"cold load:  sync {cold_sync:.3f} s, on_list {cold_s:.2f} s")
    print(f"1 % churn:  sync {churn_sync:.3f} s, on_list {churn_s:.2f} s  "
          f"(sync ratio {churn_sync / cold_sync:.3f} of cold)")
    print(f"\n# sustained signed events, {args.subscribers} restricted, "
          f"target {args.rate:.0f}/s for {args.seconds:.0f} s")
    print(f"sent {result['sent']}, errors {result['errors']}, achieved {achieved:.0f}/s, "
          f"{batches} kernel batches ({result['sent'] / max(batches, 1):.1f} events per transaction)")
    print(f"event received -> kernel commit: p50 {pct(commits, 50) * 1000:.1f} ms, "
          f"p99 {pct(commits, 99) * 1000:.1f} ms")
    print(f"request -> 200 (incl. conntrack flush): p50 {pct(lat, 50) * 1000:.1f} ms, "
          f"p99 {pct(lat, 99) * 1000:.1f} ms, mean {statistics.mean(lat) * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--client", choices=("python", "wrk"), default="python")
    parser.add_argument("--connections", type=int, default=64, help="requests in flight (wrk client)")
    parser.add_argument("--in-process", action="store_true",
                        help="serve webhooks in the daemon process (the design before the webhook worker)")
    args = parser.parse_args()
    code = reexec_in_private_netns(str(HERE))
    if code is not None:
        return code
    with tempfile.TemporaryDirectory() as work:
        if os.environ.get("WG_BENCH_PROFILE"):  # where the daemon side spends its time
            import cProfile
            import pstats
            profile = cProfile.Profile()
            profile.runcall(asyncio.run, run(args, work))
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        else:
            asyncio.run(run(args, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
