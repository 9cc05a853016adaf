"""A running gateway in a ``Topology``: config, daemon, portal and billing, for demo and tests.

Everything it writes lives in one work directory; everything it starts runs inside the
topology's namespaces and dies with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..control import ControlError, request
from .topology import Topology

PORTAL_PORT = 8080
API_PORT = 8787


def _object(data: Any, what: str) -> dict[str, Any]:
    """``data`` when it is a JSON object; every answer the demo reads is one, so anything else
    is a broken daemon or sender and stops the demo with what was wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} is not a JSON object: {data!r}"[:300])
    return data


class Lab:
    def __init__(self, topo: Topology, workdir: str | Path, restricted: list[dict[str, Any]] | None = None,
                 payment_grace: str = "1h", allow: list[str] | None = None, source: str | None = None,
                 interfaces: list[str] | None = None, sessions: list[dict[str, Any]] | None = None,
                 garden: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
        """``interfaces`` are subscriber interfaces besides the topology's own (e.g. a DHCP
        segment's bridge); ``sessions`` becomes ``subscribers.sessions`` (e.g. a lease file);
        ``garden`` keys replace or add ``walled_garden`` keys (e.g. ``dns: gateway``); ``extra``
        keys replace or add top-level sections (e.g. ``fleet``), so a test can configure a
        section the lab knows nothing about."""
        self.topo = topo
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.list_path = self.work / "restricted.yaml"
        self.secret_path = self.work / "webhook.secret"
        self.config_path = self.work / "config.yaml"
        self.socket = str(self.work / "control.sock")
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.secret_path.write_text(self.secret + "\n")
        os.chmod(self.secret_path, 0o600)
        self.portal_url = f"http://{topo.gateway_addr4(1)}:{PORTAL_PORT}/"
        self.table = f"wg_{topo.tag}"
        self.config = {
            "state_dir": str(self.work / "state"),
            "subscribers": {"source": source or str(self.list_path), "poll_interval": 1, "timeout": 2,
                            **({"sessions": sessions} if sessions else {})},
            "gateway": {"subscriber_interfaces": [*topo.subscriber_interfaces, *(interfaces or [])],
                        "table": self.table},
            "walled_garden": {"allow": allow if allow is not None else ["203.0.113.0/24", "2001:db8:203::/64"],
                              "dns": "any", **(garden or {})},
            "portal": {"listen": f"0.0.0.0:{PORTAL_PORT}", "url": self.portal_url,
                       "provider": {"name": "Example Regional ISP", "phone": "+420 800 123 456",
                                    "email": "billing@isp.example", "website": "http://203.0.113.10/",
                                    "hours": "Mon-Fri 8:00-18:00"}},
            "api": {"socket": self.socket, "listen": f"0.0.0.0:{API_PORT}",
                    "webhook_secret_file": str(self.secret_path)},
            "metrics": {"listen": "127.0.0.1:9640", "portal_listen": "127.0.0.1:9641"},
            "policy": {"payment_grace": payment_grace},
            **(extra or {}),
        }
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.write_list(restricted or [])
        self.daemon: subprocess.Popen[Any] | None = None
        self.portal: subprocess.Popen[Any] | None = None

    # -- the list ---------------------------------------------------------------------------
    def write_list(self, entries: list[dict[str, Any]]) -> None:
        """Replace the list atomically, as a well-behaved billing export would."""
        tmp = self.list_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"subscribers": entries}, sort_keys=False))
        os.replace(tmp, self.list_path)

    # -- processes ------------------------------------------------------------------------
    def _start(self, command: str, log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        with open(self.work / log_name, "ab") as log:   # the child keeps its own copy of the descriptor
            return self.topo.popen(self.topo.gateway.netns, sys.executable, "-m", "enforcer.cli", command,
                                   "--config", str(self.config_path), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def start_daemon(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> None:
        """``env`` is added to the environment (e.g. a test's ``NOTIFY_SOCKET``)."""
        before = self._starts()
        self.daemon = self._start("run", "daemon.log", env)
        # "started" is logged with READY=1: the list is applied and the webhook worker listens
        self._wait(lambda: self._starts() > before and self.status() is not None, timeout,
                   "daemon", self.daemon, "daemon.log")

    def start_portal(self, timeout: float = 15.0, env: dict[str, str] | None = None) -> None:
        self.portal = self._start("portal", "portal.log", env)

        def ready() -> bool:
            probe = self.topo.run(self.topo.gateway.netns, "curl", "-s", "-o", "/dev/null", "--max-time", "1",
                                  f"http://127.0.0.1:{PORTAL_PORT}/")
            return probe.returncode == 0
        self._wait(ready, timeout, "portal", self.portal, "portal.log")

    def _wait(self, ready: Any, timeout: float, what: str, proc: subprocess.Popen[Any], log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.log(log)}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready within {timeout}s:\n{self.log(log)}")

    def stop_daemon(self, kill: bool = False, timeout: float = 10.0) -> None:
        if self.daemon is None:
            return
        try:
            os.killpg(self.daemon.pid, 9 if kill else 15)
        except ProcessLookupError:
            pass
        self.daemon.wait(timeout)
        self.daemon = None

    @contextlib.contextmanager
    def serving(self) -> Iterator[Lab]:
        """Daemon and portal running for the block; stopped after it, their logs printed (a
        failing test shows what they said)."""
        try:
            self.start_daemon()
            self.start_portal()
            yield self
        finally:
            self.stop_daemon()
            print(self.log())
            print(self.log("portal.log"))

    def _starts(self) -> int:
        try:
            return (self.work / "daemon.log").read_text(errors="replace").count("event=started ")
        except OSError:
            return 0

    def log(self, name: str = "daemon.log") -> str:
        try:
            return (self.work / name).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # -- talking to it ---------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        try:
            return _object(request(self.socket, "GET", "/v1/status", timeout=2.0), "status answer")
        except ControlError:
            return None

    def lookup(self, address: str) -> dict[str, Any]:
        return _object(request(self.socket, "GET", f"/v1/lookup?address={address}"), "lookup answer")

    def send_event(self, kind: str, subscriber: str, **data: Any) -> dict[str, Any]:
        """Sign and send from the upstream namespace, where billing would be."""
        url = f"http://198.51.100.1:{API_PORT}/v1/events"
        result = self.topo.run(self.topo.upstream.netns, sys.executable, "-m", "enforcer.demo.billing",
                               "--url", url, "--secret-file", str(self.secret_path), "--type", kind,
                               "--subscriber", subscriber, "--data", json.dumps(data), timeout=30.0)
        try:
            return _object(json.loads(result.stdout), "billing sender's output")
        except ValueError:
            raise RuntimeError(f"billing sender failed: {result.stdout}{result.stderr}") from None

    def wait_for(self, predicate: Any, timeout: float = 5.0, what: str = "condition") -> float:
        """Poll until true; returns seconds waited; raises naming ``what``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached within {timeout}s\n{self.log()}")
