"""A real nats-server with JetStream for the tests that need one, on loopback, with its own port
and store directory, started and stopped by the test (never shared between tests)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from tests.required import tool


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    def __init__(self, workdir: Path, port: int | None = None, config: str = "") -> None:
        """``config``: extra nats-server configuration (e.g. a ``tls { ... }`` block)."""
        self.binary = tool("nats-server", "nats-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "nats.log", "ab")   # noqa: SIM115 - closed with the process
        extra = []
        if self.config:
            (self.workdir / "nats.conf").write_text(self.config)
            extra = ["-c", str(self.workdir / "nats.conf")]
        self.proc = subprocess.Popen([self.binary, *extra, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                      "-sd", str(self.workdir / "store"), "-l", str(self.workdir / "nats.log")],
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen within {timeout}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            return (self.workdir / "nats.log").read_text(errors="replace")
        except OSError:
            return ""


class _Started(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


G = TypeVar("G", bound=_Started)


@contextlib.asynccontextmanager
async def pair_on_nats(workdir: Path, make: Callable[[str, str], G]) -> AsyncIterator[tuple[NatsServer, G, G]]:
    """A nats-server of the test's own and gateways ``gw-a`` and ``gw-b`` on it (``make(name,
    url)``), started in that order; all stopped after, the server last, whatever failed."""
    server = NatsServer(workdir / "nats")
    server.start()
    a, b = make("gw-a", server.url), make("gw-b", server.url)
    try:
        await a.start()
        await b.start()
        yield server, a, b
    finally:
        try:
            await a.close()
        finally:
            try:
                await b.close()
            finally:
                server.stop()
