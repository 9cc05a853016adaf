"""A hung DNS forwarder and a killed webhook worker, behind a real daemon (NOC audit, reproduced live).

With ``walled_garden.dns: gateway``, ``kill -STOP`` of the forwarder child left restricted
subscribers unable to resolve the payment page while ``walled_garden_dns_forwarder_up`` stayed 1
and ``status`` said "ready" for good; ``kill -KILL`` of the webhook worker (or the forwarder) was
restarted but counted nowhere. Here, in a topology of its own with Debian's dnsmasq as the
subscribers' resolver (tests/kernel/dns_peers.py): the forwarder, idle for longer than its
silence limit, is not called hung (its stats line every second is the heartbeat); stopped, it
is noticed within ``SILENT_LIMIT`` (+ ``RECHECK``), killed, restarted and answers again, and that
is a ``dns_forwarder`` task failure in the metrics and ``status``; the killed webhook worker is a
``webhooks`` failure; a reload that turns the forwarder off counts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dns_peers import PAY4, RESOLVER4, DnsPeers, query
from kernel_helpers import SUB1
from prometheus_client.parser import text_string_to_metric_families

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from enforcer.dns_garden.bridge import RECHECK, SILENT_LIMIT
from required import tool

FORWARDER_PORT = 5300


@dataclass
class Gateway:
    topo: Topology
    lab: Lab

    @property
    def restricted(self) -> str:
        return self.topo.subscribers[0].netns

    def metric(self, name: str, **labels: str) -> float | None:
        text = self.topo.run(self.topo.gateway.netns, "curl", "-sf", "--max-time", "3",
                             "http://127.0.0.1:9640/metrics").stdout
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def status(self) -> dict:
        status = self.lab.status()
        assert status is not None, self.lab.log()
        return status

    def status_text(self) -> str:
        done = subprocess.run([sys.executable, "-m", "enforcer.cli", "status", "--config", str(self.lab.config_path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def pay(self) -> dict:
        """The restricted subscriber asks its resolver (redirected to the forwarder) for the pay host."""
        return query(self.topo, self.restricted, RESOLVER4, "pay.psp.example", "A", timeout=1.5)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    tool("dnsmasq", "dnsmasq-base")
    with Topology(subscribers=1) as topo, DnsPeers(topo, tmp_path / "peers"):
        entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4], "reason": "overdue"}]
        lab = Lab(topo, tmp_path / "lab", entries, allow=["*.psp.example"],
                  garden={"dns": "gateway", "resolvers": [RESOLVER4], "dns_forwarder": {"port": FORWARDER_PORT}})
        lab.start_daemon()
        try:
            gw = Gateway(topo, lab)
            lab.wait_for(lambda: gw.metric("walled_garden_dns_forwarder_up") == 1, timeout=15,
                         what="walled_garden_dns_forwarder_up 1")
            yield gw
        finally:
            lab.stop_daemon()
            print(lab.log())


def full_log(lab: Lab) -> str:
    """The whole daemon log (``Lab.log`` is its tail)."""
    return (lab.work / "daemon.log").read_text(errors="replace")


def worker_pids(lab: Lab) -> list[int]:
    """The webhook worker of this lab's daemon (its command line names the lab's secret file)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"enforcer.webhook_worker" in argv and str(lab.secret_path).encode() in argv:
                found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_hung_forwarder_is_killed_and_restarted_and_child_deaths_are_counted(gateway: Gateway) -> None:
    gw, lab = gateway, gateway.lab
    answer = gw.pay()
    assert answer.get("addresses") and set(answer["addresses"]) <= set(PAY4), answer

    # Idle for longer than the silence limit: its heartbeat keeps it up.
    time.sleep(SILENT_LIMIT + RECHECK + 1.5)
    first = gw.status()["dns_forwarder"]
    assert first["ready"] and first["restarts"] == 0, first
    assert "event=dns_forwarder_unresponsive" not in full_log(lab)

    # Stopped: no answer; within the limit it is down, killed, restarted, and answers again.
    pid = first["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        assert "error" in gw.pay(), "a stopped forwarder answered"
        lab.wait_for(lambda: "event=dns_forwarder_unresponsive" in full_log(lab), timeout=SILENT_LIMIT + RECHECK + 5,
                     what="event=dns_forwarder_unresponsive")
        noticed = time.monotonic() - stopped
        lab.wait_for(lambda: gone(pid), timeout=5, what="the hung child to be killed")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)   # whatever happened above, nothing stays stopped
        except ProcessLookupError:
            pass
    assert noticed < SILENT_LIMIT + RECHECK + 3, noticed
    lab.wait_for(lambda: gw.status()["dns_forwarder"]["ready"] and gw.status()["dns_forwarder"]["pid"] != pid,
                 timeout=15, what="a new forwarder, ready")
    assert gw.metric("walled_garden_dns_forwarder_up") == 1
    after = gw.status()
    assert after["dns_forwarder"]["restarts"] == 1 and after["dns_forwarder"]["last_exit_code"] == -9, after
    task = after["tasks"]["dns_forwarder"]
    assert task["failures"] == 1 and task["running"], task
    assert task["last_error"].startswith("dns forwarder killed by SIGKILL: unresponsive: sent nothing for "), task
    assert gw.metric("walled_garden_task_failures_total", task="dns_forwarder") == 1
    answer = gw.pay()
    assert answer.get("addresses") and set(answer["addresses"]) <= set(PAY4), answer

    # The webhook worker killed: restarted, and a webhooks failure.
    (worker,) = worker_pids(lab)
    assert gw.metric("walled_garden_task_failures_total", task="webhooks") == 0
    os.kill(worker, signal.SIGKILL)
    lab.wait_for(lambda: gw.status()["tasks"]["webhooks"]["failures"] == 1, timeout=10, what="webhooks failure")
    lab.wait_for(lambda: len(worker_pids(lab)) == 1 and worker_pids(lab) != [worker]
                 and gw.status()["tasks"]["webhooks"]["running"], timeout=15, what="a new webhook worker")
    assert gw.metric("walled_garden_task_failures_total", task="webhooks") == 1
    text = gw.status_text()
    assert any(line.startswith("task webhooks FAILED 1 time(s)") and "webhook worker killed by SIGKILL" in line
               for line in text.splitlines()), text
    assert any(line.startswith("task dns_forwarder FAILED 1 time(s)") and "unresponsive" in line
               for line in text.splitlines()), text

    # A reload that turns the forwarder off stops it: asked for, not a failure.
    forwarder = gw.status()["dns_forwarder"]["pid"]
    config = yaml.safe_load(lab.config_path.read_text())
    config["walled_garden"] = {"allow": ["192.0.2.0/24"], "dns": "any"}   # a *.name needs dns: gateway
    lab.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert lab.daemon is not None
    os.kill(lab.daemon.pid, signal.SIGHUP)
    lab.wait_for(lambda: "dns_forwarder" not in gw.status(), timeout=15, what="the forwarder turned off")
    lab.wait_for(lambda: gone(forwarder), timeout=10, what="the forwarder to exit")
    time.sleep(1.5)   # a restart (1 s) would show by now
    assert gw.metric("walled_garden_task_failures_total", task="dns_forwarder") == 1
    assert gw.metric("walled_garden_dns_forwarder_up") == 0
    assert full_log(lab).count("event=dns_forwarder_exited") == 1, "only the hang's exit"
    print(json.dumps(gw.status().get("tasks"), indent=1))
