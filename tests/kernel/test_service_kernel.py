"""The service on the real kernel: live scrapes pass promtool and count redirects and refusals,
SIGHUP reloads without dropping enforcement, a table removed behind the daemon's back comes
back, and both processes speak systemd's notify protocol (READY, WATCHDOG, RELOADING)."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from kernel_helpers import SUB1, tcp_connect

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from required import tool

UPSTREAM = "http://198.51.100.10/"


def promtool() -> str:
    return tool("promtool", "prometheus")


def scrape(topo: Topology, port: int) -> str:
    result = topo.run(topo.gateway.netns, "curl", "-sf", "--max-time", "3", f"http://127.0.0.1:{port}/metrics")
    assert result.returncode == 0, result.stderr
    return result.stdout


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_live_scrapes_pass_promtool_and_count_redirects_and_refusals(topo: Topology, lab: Lab) -> None:
    tool = promtool()
    restricted = topo.subscribers[0].netns
    assert topo.curl(restricted, UPSTREAM)[0] == 302                       # redirected (nat counter)
    assert tcp_connect(topo, restricted, "198.51.100.10", 443)[0] == "ECONNREFUSED"   # refused_tcp
    deadline = time.monotonic() + 5
    while True:  # the counters are read at most once a second
        enforcer = scrape(topo, 9640)
        redirected = sample(enforcer, "walled_garden_kernel_packets_total", '{counter="redirected"}')
        refused = sample(enforcer, "walled_garden_kernel_packets_total", '{counter="refused_tcp"}')
        if (redirected >= 1 and refused >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert redirected >= 1 and refused >= 1, enforcer
    assert sample(enforcer, "walled_garden_kernel_bytes_total", '{counter="refused_tcp"}') > 0
    assert sample(enforcer, "walled_garden_kernel_in_sync") == 1
    assert sample(enforcer, "walled_garden_list_age_seconds") >= 0
    portal = scrape(topo, 9641)
    assert sample(portal, "walled_garden_portal_requests_total", '{kind="redirect"}') >= 1
    for text in (enforcer, portal):
        result = topo.run(topo.gateway.netns, "sh", "-c", f"{tool} check metrics <<'EOF'\n{text}EOF\n")
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def _config(lab: Lab) -> dict:
    return yaml.safe_load(lab.config_path.read_text())


def _write_config(lab: Lab, config: dict) -> None:
    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(lab.config_path)


def _hup_and_wait(lab: Lab, marker: str, count: int) -> None:
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGHUP)
    lab.wait_for(lambda: lab.log().count(marker) >= count, timeout=10, what=marker)


def _allow4(topo: Topology, lab: Lab) -> str:
    return topo.run(topo.gateway.netns, "nft", "list", "set", "inet", lab.table, "allow4", check=True).stdout


def test_sighup_reloads_the_config_without_dropping_enforcement(topo: Topology, lab: Lab) -> None:
    restricted, free = topo.subscribers[0].netns, topo.subscribers[1].netns
    config = _config(lab)
    config["walled_garden"]["allow"].append("198.51.100.77/32")
    config["policy"]["payment_grace"] = "2h"
    _write_config(lab, config)
    _hup_and_wait(lab, "event=reloaded", 1)
    assert "198.51.100.77" in _allow4(topo, lab)
    assert "event=layout_reloaded" in lab.log()
    assert lab.lookup(topo.subscribers[0].addr4)["restricted"]
    assert topo.curl(restricted, UPSTREAM)[0] == 302
    assert tcp_connect(topo, restricted, "198.51.100.10", 443)[0] == "ECONNREFUSED"
    assert topo.curl(free, UPSTREAM)[:2] == (200, "UPSTREAM OK")
    # A broken config: logged by key path, nothing changes, the daemon keeps running.
    config["walled_garden"]["allow"].append("not an address")
    config["typo_section"] = {}
    _write_config(lab, config)
    _hup_and_wait(lab, "event=reload_rejected", 1)
    assert lab.daemon is not None and lab.daemon.poll() is None
    assert "walled_garden.allow[3]" in lab.log() and "typo_section" in lab.log()
    assert "198.51.100.77" in _allow4(topo, lab)
    assert topo.curl(restricted, UPSTREAM)[0] == 302
    # A payment still applies (the webhook secret survived both reloads).
    result = lab.send_event("payment.received", SUB1)
    assert result["status"] == 200 and result["answer"]["result"] == "applied", result
    assert topo.curl(restricted, UPSTREAM)[:2] == (200, "UPSTREAM OK")
    assert lab.secret.split("_", 1)[1] not in lab.log(), "the webhook secret is never logged"


def test_a_table_removed_behind_the_daemons_back_is_put_back(topo: Topology, lab: Lab) -> None:
    restricted = topo.subscribers[0].netns
    topo.run(topo.gateway.netns, "nft", "delete", "table", "inet", lab.table, check=True)
    assert topo.curl(restricted, UPSTREAM)[:2] == (200, "UPSTREAM OK"), "the table is gone: nothing restricts"
    waited = lab.wait_for(lambda: topo.run(topo.gateway.netns, "nft", "list", "table", "inet", lab.table)
                          .returncode == 0, timeout=10, what="table restored")
    assert waited < 8, waited
    assert topo.curl(restricted, UPSTREAM)[0] == 302
    assert "event=table_lost" in lab.log()


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, wanted: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(wanted in m.split("\n") for m in self.messages):
                return
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"{wanted} not received within {timeout}s: {self.messages}")

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def count(self, wanted: str) -> int:
        return sum(wanted in m.split("\n") for m in self.messages)


def test_both_processes_notify_systemd_and_pet_the_watchdog(topo: Topology, tmp_path: Path) -> None:
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4]}]
    lab = Lab(topo, tmp_path, entries)
    daemon = NotifySocket(tmp_path / "daemon-notify.sock")
    portal = NotifySocket(tmp_path / "portal-notify.sock")
    watchdog = {"WATCHDOG_USEC": "1000000"}   # a pet every 0.5 s
    try:
        lab.start_daemon(env={"NOTIFY_SOCKET": daemon.path, **watchdog})
        daemon.wait_for("READY=1")
        assert any(m.startswith("READY=1\nSTATUS=enforcing: 1 subscriber") for m in daemon.messages), daemon.messages
        assert lab.lookup(topo.subscribers[0].addr4)["restricted"], "READY=1 only after the first sync"
        lab.start_portal(env={"NOTIFY_SOCKET": portal.path, **watchdog})
        portal.wait_for("READY=1")
        before = daemon.count("WATCHDOG=1"), portal.count("WATCHDOG=1")
        daemon.collect(1.6)
        portal.collect(0.1)   # queued meanwhile
        assert daemon.count("WATCHDOG=1") - before[0] >= 3, daemon.messages
        assert portal.count("WATCHDOG=1") - before[1] >= 3, portal.messages
        assert lab.daemon is not None
        os.kill(lab.daemon.pid, signal.SIGHUP)
        daemon.wait_for("RELOADING=1")
        ready = daemon.count("READY=1")
        deadline = time.monotonic() + 10
        while daemon.count("READY=1") == ready and time.monotonic() < deadline:
            daemon.collect(0.3)
        assert daemon.count("READY=1") > ready, "READY=1 again after the reload"
        assert "event=watchdog_enabled" in lab.log() and "event=watchdog_enabled" in lab.log("portal.log")
        lab.stop_daemon()
        daemon.wait_for("STOPPING=1", timeout=5)
    finally:
        lab.stop_daemon()
        if lab.portal is not None:
            os.killpg(lab.portal.pid, signal.SIGTERM)
            lab.portal.wait(10)


def test_the_socket_group_lets_an_unprivileged_user_in_and_nobody_else(topo: Topology) -> None:
    """What the portal unit relies on: a DynamicUser with SupplementaryGroups= reaches the socket."""
    setpriv = tool("setpriv", "util-linux")
    work = Path(tempfile.mkdtemp(prefix="wg-ops-"))
    try:
        work.chmod(0o755)
        lab = Lab(topo, work, [{"id": SUB1, "addresses": [topo.subscribers[0].addr4]}])
        config = _config(lab)
        lab.socket = config["api"]["socket"] = str(work / "run" / "control.sock")
        config["api"]["socket_group"] = "nogroup"
        _write_config(lab, config)
        lab.start_daemon()
        st = os.stat(lab.socket)
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid and stat.S_IMODE(st.st_mode) == 0o660
        url = f"http://enforcer/v1/lookup?address={topo.subscribers[0].addr4}"

        def as_user(*groups: int, target: str = url, post: str = "",
                    status: bool = False) -> subprocess.CompletedProcess[str]:
            """uid nobody with a primary group of its own (like a DynamicUser), plus ``groups``;
            with ``post`` or ``status`` the HTTP status is the output, else the body."""
            ids = ["--reuid=65534", f"--regid={grp.getgrnam('users').gr_gid}", "--inh-caps=-all"]
            ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
            data = ["-d", post] if post else []
            curl = ([setpriv, *ids, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *data,
                     "--max-time", "3", "--unix-socket", lab.socket, target] if post or status else
                    [setpriv, *ids, "curl", "-sf", "--max-time", "3", "--unix-socket", lab.socket, target])
            return subprocess.run(curl, capture_output=True, text=True, check=False, timeout=10)

        # The portal looks up only addresses the kernel saw connect to the portal:
        # before the subscriber does, the member gets through the socket and is answered 403.
        member = as_user(grp.getgrnam("nogroup").gr_gid, status=True)
        assert member.stdout == "403", member
        subscriber = topo.subscribers[0]
        tcp_connect(topo, subscriber.netns, topo.gateway_addr4(1), 80)   # a browser opening portal.url
        member = as_user(grp.getgrnam("nogroup").gr_gid)   # SupplementaryGroups=
        assert member.returncode == 0 and json.loads(member.stdout)["restricted"] is True, member.stderr
        # ... but only for what the portal needs: operator actions and subscriber details are refused
        lift = as_user(grp.getgrnam("nogroup").gr_gid, target="http://enforcer/v1/lift",
                       post=json.dumps({"subscriber": SUB1, "reason": "portal compromised"}))
        assert lift.stdout == "403", lift
        audit = as_user(grp.getgrnam("nogroup").gr_gid, target="http://enforcer/v1/audit", post="")
        assert audit.returncode != 0, "the audit log is for operators"
        stranger = as_user()
        assert stranger.returncode != 0, "a user outside the group must not reach the control socket"
        lab.stop_daemon()
    finally:
        shutil.rmtree(work, ignore_errors=True)
