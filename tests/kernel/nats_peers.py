"""Real NATS JetStream servers for the fleet kernel tests (issue 15).

A fleet's gateways meet in one JetStream stream, so the tests run Debian's ``nats-server``, not a
stand-in: one server, or a 3-node cluster (``server_name`` and ``cluster { name, listen, routes }``
set, as JetStream clustering needs), every node with its own store directory and log file kept
for failure messages. Layout (``<tag>`` random per run)::

    gateway namespace A ─ <tag>fN 100.127.0.1/30 ══ 100.127.0.2/30 <tag>nN ─┐
    gateway namespace B ─ <tag>fN 100.127.0.5/30 ══ 100.127.0.6/30 <tag>nN ─┼─ <tag>-nats
    ...                                                                        │  n1 100.127.255.1:4222
                                                                               │  n2 100.127.255.2:4222
                                                                               │  n3 100.127.255.3:4222

All servers live in one namespace of their own (``<tag>-nats``), each on its own address (a /32
on the namespace's loopback), so killing a node is killing its process. Each linked namespace
gets a veth pair (a /30 of 100.127.0.0/16) and a route to the servers' 100.127.255.0/24 through
it; the NATS namespace has only those links, no default route: nothing leaves the machine.
``cut``/``heal`` take one link down and up (a gateway cut off from NATS while its peers are not).

Every wait is bounded; ``close`` (also ``__exit__`` and atexit) stops the servers and deletes the
namespaces this module created, also when starting failed halfway.

Run in a namespace, this file is also the tests' NATS client (nats-py): ``publish`` (create the
stream if missing, publish messages with ``Nats-Msg-Id`` headers, retrying until acked or a
deadline) and ``info`` (the stream's state, cluster leader and messages), JSON out.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

SERVER_NET = "100.127.255.0/24"
CLIENT_PORT, CLUSTER_PORT, MONITOR_PORT = 4222, 6222, 8222
CLUSTER_NAME = "wgfleet"
MAX_LINKS = 64                      # /30s from 100.127.0.0 on: 64 fit in 100.127.0.0/24

_CMD_TIMEOUT = 10.0                 # one ip/curl invocation
_READY_TIMEOUT = 20.0               # a server (or a cluster's meta leader) ready
_STOP_GRACE = 3.0                   # SIGTERM -> SIGKILL


def server_address(index: int) -> str:
    """Node ``index`` (1-based)'s address: its client, cluster and monitoring ports live there."""
    return f"100.127.255.{index}"


def _ip(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    result = subprocess.run(command, capture_output=True, text=True, timeout=_CMD_TIMEOUT,
                            stdin=subprocess.DEVNULL, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(command)}: {result.stderr.strip()}")
    return result


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("ip", "netns", "list").stdout.splitlines() if line.strip()}


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class NatsServer:
    """One ``nats-server`` process in the NATS namespace: its config, store and logs (one log file
    per start, ``<name>.<start>.log``, so a restart's readiness is judged on its own output)."""

    def __init__(self, netns: str, directory: Path, index: int, cluster: Sequence[int]) -> None:
        self.netns = netns
        self.index = index
        self.name = f"n{index}"
        self.address = server_address(index)
        self.url = f"nats://{self.address}:{CLIENT_PORT}"
        self.dir = directory / self.name
        self.store = self.dir / "store"
        self.config = self.dir / "nats-server.conf"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f'server_name: "{self.name}"', f'listen: "{self.address}:{CLIENT_PORT}"',
                 f'http: "{self.address}:{MONITOR_PORT}"',
                 f'jetstream {{ store_dir: "{self.store}", max_memory_store: 64MB, max_file_store: 256MB }}']
        if len(cluster) > 1:
            routes = ", ".join(f'"nats-route://{server_address(i)}:{CLUSTER_PORT}"' for i in cluster if i != index)
            lines.append(f'cluster {{ name: "{CLUSTER_NAME}", listen: "{self.address}:{CLUSTER_PORT}", '
                         f"routes: [{routes}] }}")
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.{self.starts}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (same store as before: a restart keeps what the node held); not waited for."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, "nats-server", "-c", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def healthy(self) -> bool:
        """``/healthz`` answers ok: listening, JetStream up and (clustered) a meta leader known and
        this node's streams current."""
        if not self.running:
            return False
        probe = _ip("curl", "-s", "--max-time", "1", f"http://{self.address}:{MONITOR_PORT}/healthz",
                    netns=self.netns, check=False)
        return '"ok"' in probe.stdout

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server (default SIGKILL: a crash, nothing flushed) and reap it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_GRACE)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)

    def stop(self) -> None:
        """A clean stop: SIGTERM, a bounded wait, then SIGKILL."""
        self.kill(signal.SIGTERM)


class FleetNet:
    """The NATS namespace, its servers (``nodes``: 1, or 3 for a cluster) and the links to the
    namespaces that reach it. A context manager: started in ``__enter__``, torn down in ``close``."""

    def __init__(self, directory: str | Path, nodes: int = 1, tag: str | None = None) -> None:
        if nodes not in (1, 3):
            raise ValueError(f"nodes must be 1 or 3, got {nodes!r}")
        self.tag = tag or "nf" + secrets.token_hex(3)[:5]
        if not (self.tag.isalnum() and self.tag.islower() and 2 <= len(self.tag) <= 8):
            raise ValueError(f"tag {self.tag!r}: want 2-8 lower-case letters or digits")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.netns = f"{self.tag}-nats"
        self._indexes = list(range(1, nodes + 1))
        self.servers = [NatsServer(self.netns, self.dir, i, self._indexes) for i in self._indexes]
        self._created: list[str] = []
        self._links: dict[str, tuple[str, str]] = {}    # linked namespace -> (its interface, ours)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FleetNet:
        if shutil.which("nats-server") is None:
            raise RuntimeError("nats-server is not installed (Debian package nats-server; bash .ci/install)")
        atexit.register(self.close)
        try:
            if self.netns in _namespaces():
                raise RuntimeError(f"namespace {self.netns} already exists (tag collision?)")
            _ip("ip", "netns", "add", self.netns)
            self._created.append(self.netns)
            _ip("ip", "link", "set", "lo", "up", netns=self.netns)
            for server in self.servers:
                _ip("ip", "addr", "add", f"{server.address}/32", "dev", "lo", netns=self.netns)
            for server in self.servers:
                server.start()
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the servers, delete our namespaces (their veths go with them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for server in self.servers:
            server.stop()
        from enforcer.demo.topology import kill_netns_pids
        for ns in reversed(self._created):
            for _ in range(5):
                kill_netns_pids(ns)
                _ip("ip", "netns", "del", ns, check=False)
                if ns not in _namespaces():
                    break
                time.sleep(0.1)
        self._created.clear()

    # -- links -------------------------------------------------------------------------------
    def link(self, netns: str) -> str:
        """Wire ``netns`` (a gateway's namespace) to the servers: a veth pair on a /30 of its own and
        a route to ``SERVER_NET``. Returns the address ``netns`` has on the link."""
        if netns in self._links:
            raise ValueError(f"{netns} is already linked")
        index = len(self._links)
        if index >= MAX_LINKS:
            raise ValueError(f"at most {MAX_LINKS} links")
        near, far = f"{self.tag}f{index}", f"{self.tag}n{index}"
        here, there = f"100.127.0.{4 * index + 1}", f"100.127.0.{4 * index + 2}"
        _ip("ip", "link", "add", near, "type", "veth", "peer", "name", far, "netns", self.netns, netns=netns)
        self._links[netns] = (near, far)
        _ip("ip", "addr", "add", f"{here}/30", "dev", near, netns=netns)
        _ip("ip", "addr", "add", f"{there}/30", "dev", far, netns=self.netns)
        _ip("ip", "link", "set", near, "up", netns=netns)
        _ip("ip", "link", "set", far, "up", netns=self.netns)
        _ip("ip", "route", "add", SERVER_NET, "via", there, netns=netns)
        self._wait_up(netns, near)
        return here

    def add_client(self, suffix: str) -> str:
        """A namespace of ours (``<tag>-<suffix>``), linked: a stand-in gateway for the peers' own test."""
        ns = f"{self.tag}-{suffix}"
        if ns in _namespaces():
            raise RuntimeError(f"namespace {ns} already exists")
        _ip("ip", "netns", "add", ns)
        self._created.append(ns)
        _ip("ip", "link", "set", "lo", "up", netns=ns)
        self.link(ns)
        return ns

    def cut(self, netns: str) -> None:
        """Take ``netns``'s link down on the NATS side: that namespace loses NATS, the rest keep it."""
        _ip("ip", "link", "set", self._links[netns][1], "down", netns=self.netns)

    def heal(self, netns: str) -> None:
        _ip("ip", "link", "set", self._links[netns][1], "up", netns=self.netns)
        self._wait_up(netns, self._links[netns][0])

    def _wait_up(self, netns: str, device: str) -> None:
        deadline = time.monotonic() + 5.0
        while " state UP " not in _ip("ip", "-o", "link", "show", "dev", device, netns=netns).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{device} in {netns} not up within 5s")
            time.sleep(0.05)

    # -- servers ------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def server(self, name: str) -> NatsServer:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no server {name!r} (have {[s.name for s in self.servers]})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.server(name).kill(sig)

    def restart(self, name: str, timeout: float = _READY_TIMEOUT) -> None:
        """Start a stopped node again on its own store and wait until it is healthy."""
        server = self.server(name)
        server.start()
        self.wait_healthy([server], timeout)

    def stop_all(self) -> None:
        """Every node down (SIGKILL): NATS is gone for every gateway."""
        for server in self.servers:
            server.kill()

    def start_all(self, timeout: float = _READY_TIMEOUT) -> None:
        """Every stopped node started again on its store; waited until all are healthy."""
        for server in self.servers:
            if not server.running:
                server.start()
        self.wait_healthy(timeout=timeout)

    def wait_healthy(self, servers: Sequence[NatsServer] | None = None, timeout: float = _READY_TIMEOUT) -> None:
        """Bounded: every server (default all) answers ``/healthz`` ok; else an error with the logs."""
        pending = list(self.servers if servers is None else servers)
        deadline = time.monotonic() + timeout
        while pending:
            dead = [s for s in pending if not s.running]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited ({dead[0].proc and dead[0].proc.returncode}):\n"
                                   f"{_tail(dead[0].log)}")
            pending = [s for s in pending if not s.healthy()]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy within {timeout}s: {[s.name for s in pending]}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self, size: int = 2500) -> str:
        """The tail of every node's current log, for a failure message."""
        return "\n".join(f"--- {s.name} ({s.log.name}) ---\n{_tail(s.log, size)}" for s in self.servers)


# ---------------------------------------------------------------------------- the test side client


def client(netns: str, command: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run this file's client in ``netns``; its JSON answer (a ``RuntimeError`` with its output if none)."""
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, str(HERE), command, *args],
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    try:
        return dict(json.loads(result.stdout))
    except ValueError:
        raise RuntimeError(f"NATS client {command} in {netns} failed ({result.returncode}): "
                           f"{result.stdout}{result.stderr}") from None


async def _connect(servers: str, timeout: float) -> Any:
    import nats
    return await nats.connect(servers=servers.split(","), connect_timeout=1, reconnect_time_wait=0.2,
                              max_reconnect_attempts=max(1, int(timeout / 0.2)), allow_reconnect=True)


async def _publish(args: argparse.Namespace) -> dict[str, Any]:
    """Create the stream (idempotent with the same config) and publish ``count`` messages, each
    retried until acked or the deadline passes; what each ack said."""
    from nats.errors import Error as NatsError
    from nats.js.api import StreamConfig
    from nats.js.errors import Error as JsError
    deadline = time.monotonic() + args.deadline
    nc = await _connect(args.servers, args.deadline)
    acks: list[dict[str, Any]] = []
    retries = 0
    errors: list[str] = []
    try:
        js = nc.jetstream(timeout=2.0)
        config = StreamConfig(name=args.stream, subjects=[f"{args.stream}.>"], num_replicas=args.replicas)
        while True:
            try:
                await js.add_stream(config)
                break
            except (TimeoutError, NatsError, JsError) as exc:
                errors.append(f"add_stream: {exc!r}")
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for i in range(args.count):
            msg_id = f"{args.prefix}-{i}"
            while True:
                try:
                    ack = await js.publish(f"{args.stream}.test", msg_id.encode(),
                                           headers={"Nats-Msg-Id": msg_id}, timeout=2.0)
                    acks.append({"id": msg_id, "seq": ack.seq, "duplicate": bool(ack.duplicate)})
                    break
                except (TimeoutError, NatsError, JsError) as exc:
                    retries += 1
                    errors.append(f"{msg_id}: {exc!r}")
                    if time.monotonic() > deadline:
                        return {"acks": acks, "retries": retries, "errors": errors[-20:], "gave_up": msg_id}
                    await asyncio.sleep(0.2)
        return {"acks": acks, "retries": retries, "errors": errors[-20:], "server": nc.connected_url.netloc
                if nc.connected_url else None}
    finally:
        await nc.close()


async def _info(args: argparse.Namespace) -> dict[str, Any]:
    """The stream's state, its cluster leader and replicas, and every message's data (at most 1000)."""
    nc = await _connect(args.servers, args.deadline)
    try:
        js = nc.jetstream(timeout=2.0)
        info = await js.stream_info(args.stream)
        cluster = info.cluster
        data = []
        for seq in range(info.state.first_seq, min(info.state.last_seq, info.state.first_seq + 999) + 1):
            if info.state.messages:
                data.append((await js.get_msg(args.stream, seq)).data.decode())
        return {"messages": info.state.messages, "first_seq": info.state.first_seq,
                "last_seq": info.state.last_seq, "replicas": info.config.num_replicas,
                "leader": cluster.leader if cluster else None,
                "peers": [r.name for r in (cluster.replicas or [])] if cluster else [], "data": data}
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the fleet tests' NATS client (run in a namespace)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("publish", "info"):
        command = sub.add_parser(name)
        command.add_argument("--servers", required=True, help="comma-separated nats:// URLs")
        command.add_argument("--stream", required=True)
        command.add_argument("--deadline", type=float, default=20.0, help="seconds before giving up")
        if name == "publish":
            command.add_argument("--replicas", type=int, default=1)
            command.add_argument("--count", type=int, default=1)
            command.add_argument("--prefix", default="m")
    args = parser.parse_args(argv)
    from nats.errors import Error as NatsError
    try:
        answer = asyncio.run(asyncio.wait_for(_publish(args) if args.command == "publish" else _info(args),
                                              args.deadline + 10.0))
    except (NatsError, OSError, TimeoutError) as exc:   # the test reads the JSON: what failed
        answer = {"error": repr(exc)}
    print(json.dumps(answer))
    return 0 if "error" not in answer and "gave_up" not in answer else 1


if __name__ == "__main__":
    sys.exit(main())
