"""Benchmark: the portal's redirect path against a bare aiohttp app and nginx, on one core.

    sudo python tests/bench/bench_portal.py [--rounds 3] [--duration 10]

Every HTTP request of every restricted subscriber lands on the portal's redirect (a ``Host``
that is not the portal's gets ``302`` to ``portal.url``), so that path must cost little more
than aiohttp itself. Servers measured, each a subprocess pinned to CPU 0 with
``os.sched_setaffinity`` (the load generator is pinned to CPU 1):

* ``portal``: ``python -m enforcer.cli portal`` as deployed, answering ``Host: example.com``;
* ``bare``: an aiohttp app whose only handler returns the same 302 (status, ``Location``,
  ``Cache-Control``, the other headers, the body and ``Connection: close`` if the portal sends
  it, all copied from the portal's own answer), served the same way (no access log, backlog
  1024), so the ratio is the cost of the portal's middlewares and routing;
* ``bare-min``: only ``Location`` and ``Cache-Control``, empty body, connections kept open,
  to show what the body, the headers and closing every connection cost;
* ``nginx``: ``worker_processes 1`` pinned with ``worker_cpu_affinity 0001``,
  ``return 302 <portal.url>`` with the same headers (nginx's own small body) and the same
  keep-alive behaviour, for scale.

Load: ``wrk -t1 -c50 -d10s --latency -H 'Host: example.com'``. The servers run side by side
in the same run and are measured alternately (the order rotates every round, after a short
warm-up each), because the machine may be shared and noisy. Each run also records the
server's own CPU time (requests per server CPU-second changes least when other work shares the
machine) and how busy other processes kept CPU 0 and CPU 1. The table shows medians over
``--rounds``; the goal (portal/bare >= 0.9) is judged on the median of the per-round ratios,
and the exit status is 1 when it is missed. Loopback only. ``wrk`` and ``nginx`` are installed
with apt when missing (root). Servers are always stopped: ``finally`` and a SIGTERM/SIGHUP
handler.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
PORTAL_URL = "http://portal.isp.example/"
FOREIGN_HOST = "example.com"
SERVER_CPU = 0
LOAD_CPU = 1
START_TIMEOUT = 20.0
#: Headers every server sets itself, never copied from the portal's answer.
OWN_HEADERS = {"date", "server", "content-length", "content-type", "connection", "keep-alive",
               "transfer-encoding"}
GOAL = 0.9


# --- the bare aiohttp server (this file run with --serve-bare) -------------------------------

def serve_bare(port: int, spec_path: str) -> None:
    """One catch-all handler answering the 302 described in ``spec_path`` (JSON)."""
    import asyncio

    from aiohttp import web

    spec = json.loads(Path(spec_path).read_text())
    status, headers, body = spec["status"], spec["headers"], spec["body"].encode("latin-1")
    content_type, charset, close = spec["content_type"], spec["charset"], spec["close"]

    async def redirect(_request: web.Request) -> web.Response:
        if body:
            response = web.Response(status=status, body=body, content_type=content_type, charset=charset,
                                    headers=headers)
        else:
            response = web.Response(status=status, headers=headers)
        if close:
            response.force_close()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        # As the portal serves (captive_portal.server): no access log, backlog 1024.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


# --- process handling ------------------------------------------------------------------------

class Processes:
    """Every process this benchmark starts; ``stop_all`` is safe to call more than once."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cpu: int, log: Path, **kw: object) -> subprocess.Popen[bytes]:
        def pin() -> None:
            os.sched_setaffinity(0, {cpu})

        # preexec_fn, so the affinity holds before the first instruction of the new program (and
        # for every thread it makes); this process runs no threads, which makes it safe here.
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       preexec_fn=pin,
                                       start_new_session=True, **kw)  # type: ignore[call-overload]
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # helpers left in the group (nginx workers)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Redirect:
    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str

    @property
    def closes(self) -> bool:
        """``Connection: close``: the server ends the connection after this answer."""
        return self.headers.get("Connection", "").lower() == "close"


def fetch_redirect(port: int, host: str = FOREIGN_HOST) -> Redirect:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/some/page", headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        return Redirect(response.status, {k: v for k, v in response.getheaders()}, body,
                        response.getheader("Content-Type", ""))
    finally:
        conn.close()


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path, name: str) -> Redirect:
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return fetch_redirect(port)
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not answer on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s ({last})")


def check_redirect(name: str, answer: Redirect, want_location: str, want_cache: str) -> None:
    location = answer.headers.get("Location")
    cache = answer.headers.get("Cache-Control")
    if answer.status != 302 or location != want_location or cache != want_cache:
        raise RuntimeError(f"{name} answered {answer.status} Location={location!r} Cache-Control={cache!r}; "
                           f"expected 302 {want_location!r} {want_cache!r}")


# --- servers ---------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    note: str = ""


def start_portal(procs: Processes, tmp: Path) -> Server:
    port = free_port()
    config = {
        "state_dir": str(tmp / "state"),
        "subscribers": {"source": str(tmp / "restricted.yaml")},
        "portal": {"listen": f"127.0.0.1:{port}", "url": PORTAL_URL,
                   "provider": {"name": "Example ISP", "phone": "+1 555 0100", "email": "billing@isp.example",
                                "website": "https://pay.example.net/", "hours": "Mon-Fri 8:00-18:00"}},
        # The redirect path never asks the enforcer; a socket nobody serves proves it.
        "api": {"socket": str(tmp / "no-enforcer.sock"), "listen": None},
        "metrics": {"listen": None, "portal_listen": None},
    }
    (tmp / "portal.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = tmp / "portal.log"
    process = procs.start([sys.executable, "-m", "enforcer.cli", "portal", "--config", str(tmp / "portal.yaml")],
                          SERVER_CPU, log, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_ready(port, process, log, "portal")
    return Server("portal", port, process, "python -m enforcer.cli portal")


def start_bare(procs: Processes, tmp: Path, name: str, answer: Redirect, minimal: bool) -> Server:
    port = free_port()
    if minimal:
        spec = {"status": 302, "headers": {"Location": answer.headers["Location"],
                                           "Cache-Control": answer.headers["Cache-Control"]},
                "body": "", "content_type": "", "charset": None, "close": False}
    else:
        media, _, params = answer.content_type.partition(";")
        charset = params.strip().partition("=")[2] or None if params else None
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in OWN_HEADERS}
        spec = {"status": answer.status, "headers": headers, "body": answer.body.decode("latin-1"),
                "content_type": media.strip(), "charset": charset, "close": answer.closes}
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = tmp / f"{name}.log"
    process = procs.start([sys.executable, str(HERE), "--serve-bare", str(port), str(spec_path)],
                          SERVER_CPU, log, cwd=ROOT)
    wait_ready(port, process, log, name)
    if minimal:
        note = "only Location + Cache-Control, empty body, keep-alive"
    else:
        note = "same status, headers, body" + (", Connection: close" if answer.closes else ", keep-alive")
    return Server(name, port, process, note)


def _nginx_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_nginx(procs: Processes, tmp: Path, answer: Redirect) -> Server:
    port = free_port()
    root = tmp / "nginx"
    root.mkdir()
    adds = "\n".join(f"            add_header {name} {_nginx_quote(value)} always;"
                     for name, value in answer.headers.items()
                     if name.lower() not in OWN_HEADERS and name.lower() != "location")
    (root / "nginx.conf").write_text(f"""
worker_processes 1;
worker_cpu_affinity 0001;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server_tokens off;
    # As the portal: it either keeps connections open indefinitely or closes after each answer.
    keepalive_requests 1000000;
    keepalive_timeout {"0" if answer.closes else "75s"};
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} default_server backlog=1024;
        location / {{
{adds}
            return 302 {answer.headers["Location"]};
        }}
    }}
}}
""")
    log = tmp / "nginx.out"
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = procs.start([nginx, "-p", str(root), "-c", str(root / "nginx.conf")], SERVER_CPU, log)
    wait_ready(port, process, log, "nginx")
    closing = "Connection: close" if answer.closes else "keep-alive"
    return Server("nginx", port, process, f"same headers, nginx body, {closing}; 1 worker on CPU 0")


# --- load ------------------------------------------------------------------------------------

@dataclass
class Result:
    rps: float
    p99_ms: float
    errors: str = ""
    requests: int = 0
    server_cpu: float = 0.0     # seconds of CPU the server used during the run
    foreign: tuple[float, float] = (0.0, 0.0)  # share of CPU 0 / CPU 1 used by others

    @property
    def per_cpu_second(self) -> float:
        """Requests per second of server CPU: what the machine's other load disturbs least."""
        return self.requests / self.server_cpu if self.server_cpu else 0.0


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU of every live process in a process group (nginx: master and worker)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def cpu_busy_seconds() -> dict[int, float]:
    """Busy (not idle, not iowait) seconds per CPU since boot, from /proc/stat."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values]
                busy[int(name[3:])] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK
    return busy


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(output: str) -> Result:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b", output, re.MULTILINE)
    if not rps or not p99:
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = []
    for pattern in (r"Socket errors:.*", r"Non-2xx or 3xx responses:.*"):
        found = re.search(pattern, output)
        if found:
            errors.append(found.group(0).strip())
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    return Result(float(rps.group(1)), float(p99.group(1)) * _UNITS[p99.group(2)], "; ".join(errors),
                  int(total.group(1)) if total else 0)


def wrk_command(port: int, duration: int, connections: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Host: {FOREIGN_HOST}",
            f"http://127.0.0.1:{port}/"]


def run_wrk(procs: Processes, tmp: Path, server: Server, duration: int, connections: int) -> Result:
    """One wrk run against ``server``, with what the server and everything else used of the CPUs."""
    log = tmp / f"wrk-{server.port}.txt"
    log.write_bytes(b"")
    server_before, busy_before = group_cpu_seconds(server.process.pid), cpu_busy_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = procs.start(wrk_command(server.port, duration, connections), LOAD_CPU, log)
    try:
        process.wait(duration + 30)
    finally:
        procs.stop(process)
    elapsed = time.monotonic() - started
    server_cpu = group_cpu_seconds(server.process.pid) - server_before
    busy_after = cpu_busy_seconds()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only wrk was reaped meanwhile
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime
               - children_before.ru_utime - children_before.ru_stime)
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}:\n{output}")
    result = parse_wrk(output)
    result.server_cpu = server_cpu
    foreign0 = (busy_after[SERVER_CPU] - busy_before[SERVER_CPU] - server_cpu) / elapsed
    foreign1 = (busy_after[LOAD_CPU] - busy_before[LOAD_CPU] - wrk_cpu) / elapsed
    result.foreign = (max(0.0, foreign0), max(0.0, foreign1))
    return result


# --- set-up ----------------------------------------------------------------------------------

def ensure_tools() -> None:
    missing = [pkg for pkg, cmd in (("wrk", "wrk"), ("nginx", "nginx"))
               if shutil.which(cmd) is None and not Path(f"/usr/sbin/{cmd}").exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {', '.join(missing)}: run as root (they are installed with apt) or install them")
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)


def check_cpus() -> None:
    allowed = os.sched_getaffinity(0)
    if not {SERVER_CPU, LOAD_CPU} <= allowed:
        sys.exit(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}; this process may use {sorted(allowed)}")


class Terminated(Exception):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


# --- main ------------------------------------------------------------------------------------

@dataclass
class Series:
    server: Server
    results: list[Result] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.results)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.results)

    @property
    def per_cpu(self) -> float:
        return statistics.median(r.per_cpu_second for r in self.results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per server, alternating (default 3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each server's first run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
        return 0

    check_cpus()
    ensure_tools()
    procs = Processes()
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    tmp = Path(tempfile.mkdtemp(prefix="wg-bench-portal-"))
    try:
        portal = start_portal(procs, tmp)
        answer = fetch_redirect(portal.port)
        check_redirect("portal", answer, PORTAL_URL, "no-store")
        servers = [portal,
                   start_bare(procs, tmp, "bare", answer, minimal=False),
                   start_bare(procs, tmp, "bare-min", answer, minimal=True)]
        if not args.no_nginx:
            servers.append(start_nginx(procs, tmp, answer))
        for server in servers:
            check_redirect(server.name, fetch_redirect(server.port), PORTAL_URL, "no-store")
        series = {s.name: Series(s) for s in servers}

        print(f"servers on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU}; {args.rounds} round(s) of "
              f"{args.duration} s each; command:\n  {' '.join(wrk_command(0, args.duration, args.connections))}"
              .replace(":0/", ":<port>/"), flush=True)
        print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
        for server in servers:
            run_wrk(procs, tmp, server, args.warmup, args.connections)
        for round_no in range(args.rounds):
            shift = round_no % len(servers)
            for server in servers[shift:] + servers[:shift]:
                result = run_wrk(procs, tmp, server, args.duration, args.connections)
                series[server.name].results.append(result)
                print(f"  round {round_no + 1} {server.name:9s} {result.rps:8.0f} req/s  p99 {result.p99_ms:7.2f} ms"
                      f"  {result.per_cpu_second:7.0f} req/CPU-s  others on CPU0/1: "
                      f"{result.foreign[0]:4.0%}/{result.foreign[1]:4.0%}"
                      + (f"  ({result.errors})" if result.errors else ""), flush=True)
            if servers[0].process.poll() is not None:
                raise RuntimeError("portal died during the run")
        return 0 if print_table(series) >= GOAL else 1
    except Terminated as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        return 143
    finally:
        procs.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(series: dict[str, Series]) -> float:
    """The table; returns the ratio the goal is judged on (median of the per-round ratios)."""
    bare = series["bare"]
    print()
    print(f"{'server':9s} {'req/s':>7s} {'p99 ms':>7s} {'ratio':>6s} {'req/CPU-s':>9s} {'ratio':>6s}  what")
    for name, s in series.items():
        print(f"{name:9s} {s.rps:7.0f} {s.p99:7.2f} {s.rps / bare.rps:6.2f} {s.per_cpu:9.0f} "
              f"{s.per_cpu / bare.per_cpu:6.2f}  {s.server.note}")
    portal = series["portal"]
    paired = statistics.median(p.rps / b.rps for p, b in zip(portal.results, bare.results, strict=True))
    per_cpu = portal.per_cpu / bare.per_cpu
    verdict = "meets" if paired >= GOAL else "MISSES"
    print(f"\n(medians over {len(portal.results)} rounds; ratio = against bare; req/CPU-s = requests per second "
          f"of the server's own CPU time)")
    print(f"ratio portal/bare: {portal.rps / bare.rps:.2f} of median req/s, {paired:.2f} median of the per-round "
          f"ratios ({verdict} the goal >= {GOAL}), {per_cpu:.2f} per server CPU-second")
    return paired


if __name__ == "__main__":
    sys.exit(main())
