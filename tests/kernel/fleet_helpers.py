"""Two gateways in a fleet for the kernel tests (issue 15): each its own ``Topology`` and ``Lab``
(daemon, optionally portal), both linked to the test's own ``nats-server`` (``nats_peers``), and
the doors the tests use: billing's signed webhooks with a chosen ``webhook-id`` (retried on 503
like billing), the CLI as an operator types it, real traffic from the subscribers' namespaces,
the kernel's sets, and systemd's notify socket.

Both gateways list the same subscriber ids, each with its own topology's addresses (the same
literals in two separate networks): what a BNG pair or a roaming subscriber looks like.

Run in a namespace, this file is also billing's sender (``post``: a batch of signed events, a few
at a time, each retried with its own ``webhook-id`` on 503 or a refused connection until a
deadline), JSON out; it imports nothing from the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats_peers import FleetNet

    from enforcer.demo.lab import Lab
    from enforcer.demo.topology import Topology

HERE = Path(__file__).resolve()
GATEWAY_A, GATEWAY_B = "bng-a", "bng-b"
STREAM = "WALLED_GARDEN"
UPSTREAM = "http://198.51.100.10/"
RECEIVER_PORT = 8099
RECEIVER_URL = f"http://198.51.100.10:{RECEIVER_PORT}/billing/hook"   # in each topology's upstream
SUBSCRIBERS = 4                                 # subscriber i of a topology is C-100i
CATCH_UP_TIMEOUT, ANSWER_TIMEOUT = 15.0, 5.0


def sid(i: int) -> str:
    """The subscriber id of a topology's subscriber ``i`` (1-based): the same on every gateway."""
    return f"C-{1000 + i}"


def stamp(at: float | None = None) -> str:
    """Billing's RFC 3339 ``timestamp`` (whole seconds) for ``at`` (default now)."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event(kind: str, subscriber: str, webhook_id: str, at: float | None = None, **data: Any) -> dict[str, Any]:
    """One billing event as ``post`` sends it: its ``webhook-id`` and body."""
    body = {"type": kind, "timestamp": stamp(at), "data": {"subscriber": subscriber, **data}}
    return {"id": webhook_id, "body": body}


@dataclass
class Gateway:
    """One gateway of the fleet: its fleet name, network and running lab."""

    name: str
    topo: Topology
    lab: Lab
    start_seq: int = 0

    @property
    def api_url(self) -> str:
        return "http://198.51.100.1:8787/v1/events"

    def sub(self, i: int) -> str:
        """Subscriber ``i``'s namespace."""
        return self.topo.subscribers[i - 1].netns

    def addr(self, i: int) -> str:
        return self.topo.subscribers[i - 1].addr4

    # -- traffic and kernel -------------------------------------------------------------------
    def reaches_upstream(self, i: int) -> bool:
        """Subscriber ``i``'s plain HTTP reaches the upstream host (free), rather than the portal."""
        return self.topo.curl(self.sub(i), UPSTREAM, timeout=2.0)[:2] == (200, "UPSTREAM OK")

    def redirected(self, i: int) -> bool:
        """Subscriber ``i``'s plain HTTP is redirected to the portal (walled in)."""
        status, _, headers, _ = self.topo.curl(self.sub(i), UPSTREAM, timeout=2.0)
        return status == 302 and headers.get("location") == self.lab.portal_url

    def kernel_set(self, name: str = "portal4_32") -> list[str]:
        """The elements of one of the table's sets (default: walled-garden IPv4 addresses), without
        the layout's sentinel element (``SENTINELS``: it tells a flushed set from an empty one)."""
        out = self.topo.run(self.topo.gateway.netns, "nft", "-j", "list", "set", "inet", self.lab.table, name,
                            check=True).stdout
        elements: list[str] = []
        for item in json.loads(out)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
                elements.append(value if isinstance(value, str) else json.dumps(value, sort_keys=True))
        from enforcer.dataplane.layout import SENTINELS
        return sorted(e for e in elements if e not in SENTINELS.values())

    # -- the operator's doors -----------------------------------------------------------------
    def cli(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``walled-garden ARGV --config <this gateway's config>`` as root on the gateway host."""
        return subprocess.run([sys.executable, "-m", "enforcer.cli", *argv, "--config", str(self.lab.config_path)],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)

    def cli_json(self, *argv: str) -> Any:
        result = self.cli(*argv, "--json")
        assert result.returncode == 0, f"walled-garden {' '.join(argv)}: {result.returncode} " \
                                       f"{result.stdout}{result.stderr}"
        return json.loads(result.stdout)

    def audit(self, subscriber: str | None = None, since_start: bool = False) -> list[dict[str, Any]]:
        """The audit log (oldest first), as ``walled-garden audit --json`` prints it; with
        ``since_start`` only the rows written after the fleet started (not the first list's)."""
        entries = self.cli_json("audit", *([subscriber] if subscriber else []), "--limit", "5000")["entries"]
        return [row for row in entries if not since_start or row["seq"] > self.start_seq]

    def fleet_status(self) -> dict[str, Any]:
        """What ``walled-garden status --json`` says under ``fleet``."""
        return dict(self.cli_json("status")["fleet"])

    def metrics(self) -> str:
        result = self.topo.run(self.topo.gateway.netns, "curl", "-sf", "--max-time", "3",
                               "http://127.0.0.1:9640/metrics")
        assert result.returncode == 0, result.stderr
        return result.stdout

    # -- billing ------------------------------------------------------------------------------
    def start_receiver(self) -> Path:
        """Billing's webhook endpoint (``RECEIVER_URL``) in this gateway's upstream namespace; the
        file it records each POST to (the topology stops it)."""
        record = self.lab.work / "billing-received.jsonl"
        record.touch()
        with open(self.lab.work / "receiver.log", "wb") as log:
            proc = self.topo.popen(self.topo.upstream.netns, sys.executable, str(HERE), "receive",
                                   self.topo.upstream.addr4, str(RECEIVER_PORT), str(record),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "READY" in (self.lab.work / "receiver.log").read_text() or proc.poll() is not None, 10,
                   "billing's receiver listening")
        assert proc.poll() is None, (self.lab.work / "receiver.log").read_text()
        return record

    def post(self, *events: dict[str, Any], retry: bool = False, deadline: float = 30.0,
             workers: int = 4) -> list[dict[str, Any]]:
        """Send ``events`` (from ``event``) to this gateway from its upstream namespace, where billing
        sits; ``retry``: a 503 or refused connection is sent again (same id) until ``deadline``.
        One result per event, in order: ``status``, ``answer``, ``attempts`` (statuses), ``id``."""
        proc = self.post_async(*events, retry=retry, deadline=deadline, workers=workers)
        return proc.result()

    def post_async(self, *events: dict[str, Any], retry: bool = False, deadline: float = 30.0,
                   workers: int = 4) -> Sending:
        """``post`` started in the background; ``.result()`` waits for it (bounded)."""
        spec = {"url": self.api_url, "secret": self.lab.secret, "events": list(events), "retry": retry,
                "deadline": deadline, "workers": workers, "timeout": ANSWER_TIMEOUT + 5.0}
        fd, path = tempfile.mkstemp(prefix="events-", suffix=".json", dir=self.lab.work)
        with os.fdopen(fd, "w") as handle:
            json.dump(spec, handle)
        proc = self.topo.popen(self.topo.upstream.netns, sys.executable, str(HERE), "post", path,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Sending(proc, deadline + ANSWER_TIMEOUT + 30.0, Path(path))


class Sending:
    """A background ``post``: its results once it is done."""

    def __init__(self, proc: subprocess.Popen[str], timeout: float, spec: Path) -> None:
        self.proc, self.timeout, self.spec = proc, timeout, spec

    def result(self) -> list[dict[str, Any]]:
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"billing sender still running after {self.timeout}s: {err[-2000:]}") from None
        finally:
            self.spec.unlink(missing_ok=True)
        try:
            return list(json.loads(out))
        except ValueError:
            raise AssertionError(f"billing sender failed ({self.proc.returncode}): "
                                 f"{out[-2000:]}{err[-2000:]}") from None


@dataclass
class Fleet:
    """The NATS peers and two gateways, A and B, both running."""

    nats: FleetNet
    a: Gateway
    b: Gateway

    @property
    def gateways(self) -> tuple[Gateway, Gateway]:
        return self.a, self.b

    def logs(self) -> str:
        return "\n".join(f"===== {gw.name} daemon.log =====\n{gw.lab.log()}" for gw in self.gateways) + \
            f"\n===== nats =====\n{self.nats.logs()}"


def fleet_section(name: str, urls: list[str], replicas: int = 1) -> dict[str, Any]:
    """The ``fleet`` config section of gateway ``name``."""
    return {"gateway": name, "nats": {"url": urls if len(urls) > 1 else urls[0]}, "stream": STREAM,
            "replicas": replicas, "catch_up_timeout": f"{CATCH_UP_TIMEOUT:g}s",
            "answer_timeout": f"{ANSWER_TIMEOUT:g}s"}


@contextlib.contextmanager
def running_fleet(directory: Path, entries: Callable[[Topology], list[dict[str, Any]]], *, nodes: int = 1,
                  adjust: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Fleet]:
    """NATS (``nodes`` servers) and two gateways, daemon and portal (it answers the redirect a
    walled-in subscriber meets), whose lists are ``entries(topology)``, each gateway's config
    changed by ``adjust`` (e.g. a policy) before it starts. Everything is stopped and deleted
    afterwards, the daemons' and servers' logs printed (a failure shows them). Each gateway's
    ``start_seq`` is the last audit row of its start (the list's own rows)."""
    import yaml
    from nats_peers import FleetNet

    from enforcer.demo.lab import Lab
    from enforcer.demo.topology import Topology
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(FleetNet(directory / "nats", nodes=nodes))
        gateways = []
        for name in (GATEWAY_A, GATEWAY_B):
            topo = stack.enter_context(Topology(subscribers=SUBSCRIBERS))
            topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80, 443))
            topo.serve_http(topo.garden, "GARDEN OK", ports=(80,))
            net.link(topo.gateway.netns)
            lab = Lab(topo, directory / name, entries(topo),
                      extra={"fleet": fleet_section(name, net.urls, replicas=3 if nodes == 3 else 1)})
            if adjust:
                adjust(lab.config)
                lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
            gateways.append(Gateway(name, topo, lab))
        fleet = Fleet(net, *gateways)
        stack.callback(_print_logs, fleet)
        for gateway in fleet.gateways:
            stack.callback(gateway.lab.stop_daemon)
            gateway.lab.start_daemon(timeout=CATCH_UP_TIMEOUT + 15.0)
            stack.callback(_stop_portal, gateway.lab)
            gateway.lab.start_portal()
            gateway.start_seq = max((row["seq"] for row in gateway.audit()), default=0)
        yield fleet


def _print_logs(fleet: Fleet) -> None:
    print(fleet.logs())


def _stop_portal(lab: Lab) -> None:
    if lab.portal is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lab.portal.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            lab.portal.wait(10)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               detail: Callable[[], str] | None = None) -> float:
    """Poll until ``predicate()`` is true, at most ``timeout`` seconds; the seconds it took.
    Raises naming ``what`` (and ``detail()``, e.g. the daemons' logs)."""
    started = time.monotonic()
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s" + (f"\n{detail()}" if detail else ""))


class NotifySocket:
    """systemd's notify socket for one daemon start, read by a thread of its own: each datagram is
    kept with the wall-clock time it arrived and, for ``READY=1``, a copy of the daemon's log read
    at once, so a test can tell what the daemon had done before it said it was ready."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path, self.log = str(path), log
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str, str | None]] = []    # (arrived, message, log at READY=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            message = data.decode(errors="replace")
            log = self.log.read_text(errors="replace") if "READY=1" in message.split("\n") else None
            self.messages.append((time.time(), message, log))

    def wait_for(self, wanted: str, timeout: float = 30.0) -> tuple[float, str | None]:
        """(when, the log then) of the first datagram with line ``wanted`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message, log in list(self.messages):
                if wanted in message.split("\n"):
                    return at, log
            time.sleep(0.02)
        raise AssertionError(f"{wanted} not received within {timeout}s: {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# ---------------------------------------------------------------------------- billing's sender


def _post_main(spec_path: str) -> int:
    """Send a batch of signed events; each is retried (with its id) on 503/refused when asked."""
    from concurrent.futures import ThreadPoolExecutor

    from enforcer.demo.billing import send
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    deadline = time.monotonic() + float(spec["deadline"])

    def one(item: dict[str, Any]) -> dict[str, Any]:
        attempts: list[int] = []
        while True:
            try:
                result = send(spec["url"], spec["secret"], item["body"], item["id"], timeout=float(spec["timeout"]))
            except OSError as exc:          # refused, reset, timed out: billing would retry
                result = {"status": 0, "answer": {"error": repr(exc)}, "id": item["id"]}
            attempts.append(int(result["status"]))
            retryable = result["status"] in (0, 503)
            if not (spec["retry"] and retryable) or time.monotonic() > deadline:
                return {"id": item["id"], "status": result["status"], "answer": result["answer"],
                        "attempts": attempts}
            time.sleep(0.25)

    with ThreadPoolExecutor(max_workers=int(spec["workers"])) as pool:
        results = list(pool.map(one, spec["events"]))
    print(json.dumps(results))
    return 0


def _receive_main(address: str, port: int, out: str) -> int:
    """Billing's webhook endpoint: each POST appended to ``out`` as one JSON line, answered 204.
    socketserver rather than http.server.HTTPServer: its server_bind would do a DNS lookup."""
    import socketserver
    from http.server import BaseHTTPRequestHandler

    class Hook(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:   # the name http.server calls
            body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 16))
            with open(out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"path": self.path, "body": body.decode("utf-8", "replace")}) + "\n")
            self.send_response(204)
            self.send_header("Connection", "close")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((address, port), Hook) as server:
        print("READY", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "post":
        sys.exit(_post_main(sys.argv[2]))
    if len(sys.argv) == 5 and sys.argv[1] == "receive":
        sys.exit(_receive_main(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    sys.exit("usage: fleet_helpers.py post SPEC.json | receive ADDRESS PORT FILE")
