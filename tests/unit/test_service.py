"""The running service: config reload on SIGHUP, the control socket's group,
the kernel-counter cache, lost-table detection, and metrics that promtool accepts and the
docs, alerts and dashboard describe truthfully."""

from __future__ import annotations

import asyncio
import base64
import grp
import json
import logging
import os
import re
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from prometheus_client import generate_latest

from captive_portal.metrics import PortalMetrics
from daemon_helpers import NoConntrack, acknowledge
from enforcer import metrics as metrics_module
from enforcer.api.control import control_app
from enforcer.api.listeners import start_unix_site
from enforcer.config import ConfigError, parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.transaction import ReplaceTable
from enforcer.service import Service
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address
from required import tool

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class TaggedFake(FakeDataplane):
    """A fake that also answers the cheap ``layout_tag`` and ``counters`` calls of the kernel backend."""

    def __init__(self) -> None:
        super().__init__()
        self.counter_values: dict[str, tuple[int, int]] = {"redirected": (5, 300)}
        self.counter_reads = 0
        self.counter_delay = 0.0

    def layout_tag(self) -> str | None:
        return self.state.layout_tag if self.state else None

    def counters(self) -> dict[str, tuple[int, int]]:
        import time
        self.counter_reads += 1
        time.sleep(self.counter_delay)
        return dict(self.counter_values)


def write_config(tmp_path: Path, **sections: Any) -> Path:
    (tmp_path / "webhook.secret").write_text(SECRET + "\n")
    (tmp_path / "l.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n")
    raw: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "subscribers": {"source": str(tmp_path / "l.yaml")},
        "walled_garden": {"allow": ["192.0.2.0/24"]},
        "api": {"socket": str(tmp_path / "control.sock"), "listen": None,
                "webhook_secret_file": str(tmp_path / "webhook.secret")},
        "metrics": {"listen": None, "portal_listen": None},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
async def running(tmp_path: Path) -> Any:
    path = write_config(tmp_path)
    config = parse_config(path.read_text(), str(path))
    fake = TaggedFake()
    enforcer = Enforcer(config, dataplane=fake, conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    subscriber = Subscriber("C-1", (parse_address("100.64.0.10"),), reason="overdue")
    await enforcer.lists.on_list(ListUpdate([subscriber], "l.yaml", "1"))
    stop = asyncio.Event()
    service = Service(config, enforcer, stop)
    service.verifier.webhook = object()  # type: ignore[assignment]  # "a working secret is in force"
    yield enforcer, fake, service, path
    stop.set()
    await service.close()
    await enforcer.close()


def restricted_in_kernel(fake: FakeDataplane) -> bool:
    assert fake.state is not None
    return fake.view["mode4_32"].get("100.64.0.10") == "goto garden"


# -- reload -----------------------------------------------------------------------------------
async def test_reload_of_the_garden_replaces_the_table_atomically_and_keeps_enforcing(running: Any,
                                                                                      tmp_path: Path) -> None:
    enforcer, fake, service, _ = running
    old_tag = fake.state.layout_tag
    write_config(tmp_path, walled_garden={"allow": ["192.0.2.0/24", "198.51.100.7/32"]},
                 policy={"payment_grace": "2h"})
    before = len(fake.transactions)
    assert await service.reload()
    (tx,) = fake.transactions[before:]
    assert isinstance(tx.operations[0], ReplaceTable), "one atomic transaction: table and elements together"
    assert "198.51.100.7" in tx.render() and fake.state.layout_tag != old_tag
    assert restricted_in_kernel(fake)
    assert enforcer.engine.config.policy.payment_grace == 7200
    assert enforcer.metrics.reloads.labels("applied")._value.get() == 1


async def test_reload_without_layout_changes_touches_nothing_in_the_kernel(running: Any, tmp_path: Path) -> None:
    enforcer, fake, service, _ = running
    write_config(tmp_path, subscribers={"guard": {"max_restrict": 7}})
    before = len(fake.transactions)
    assert await service.reload()
    assert len(fake.transactions) == before
    assert enforcer.engine.config.subscribers.guard.max_restrict == 7


async def test_an_invalid_config_is_logged_and_changes_nothing(running: Any, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    enforcer, fake, service, path = running
    old = enforcer.engine.config
    path.write_text(path.read_text().replace("192.0.2.0/24", "192.0.2.0/33") + "surprise: 1\n")
    before = len(fake.transactions)
    with caplog.at_level(logging.ERROR):
        assert not await service.reload()
    assert enforcer.engine.config is old and len(fake.transactions) == before and restricted_in_kernel(fake)
    assert "event=reload_rejected" in caplog.text
    assert "walled_garden.allow[0]" in caplog.text and "surprise" in caplog.text  # every problem, by key
    assert enforcer.metrics.reloads.labels("rejected")._value.get() == 1


async def test_a_broken_secret_never_replaces_a_working_one(running: Any, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    enforcer, _, service, _ = running
    working = service.verifier.webhook
    write_config(tmp_path, walled_garden={"allow": ["203.0.113.0/24"]})
    (tmp_path / "webhook.secret").write_text("not a secret\n")
    with caplog.at_level(logging.ERROR):
        assert not await service.reload()
    assert service.verifier.webhook is working
    assert enforcer.engine.config.walled_garden.allow_networks[0].compressed == "192.0.2.0/24"
    assert "not a secret" not in caplog.text, "secrets are never logged"


async def test_a_new_secret_is_taken_on_reload(running: Any, tmp_path: Path) -> None:
    _, _, service, _ = running
    working = service.verifier.webhook
    (tmp_path / "webhook.secret").write_text("whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode())
    assert await service.reload()
    assert service.verifier.webhook is not working and service.verifier.webhook is not None


async def test_settings_bound_at_start_are_kept_and_named(running: Any, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    enforcer, _, service, _ = running
    write_config(tmp_path, state_dir=str(tmp_path / "elsewhere"), gateway={"table": "other"},
                 api={"socket": str(tmp_path / "other.sock")}, portal={"listen": "0.0.0.0:8081"})
    with caplog.at_level(logging.INFO):
        assert await service.reload()
    assert enforcer.engine.config.gateway.table == "walled_garden"
    assert enforcer.engine.config.state_dir == str(tmp_path / "state")
    assert enforcer.engine.config.portal.listen.port == 8080
    line = next(r.getMessage() for r in caplog.records if "event=reload_needs_restart" in r.getMessage())
    for key in ("state_dir", "gateway.table", "api.socket", "portal.listen"):
        assert key in line
    assert "event=reload_portal_settings_changed" in caplog.text


async def test_notice_acknowledgements_survive_a_table_replace(running: Any, tmp_path: Path) -> None:
    enforcer, fake, service, _ = running
    notice = Subscriber("C-2", (parse_address("100.64.0.20"),), mode=Mode.NOTICE)
    await enforcer.lists.on_list(ListUpdate([notice], "l.yaml", "2"), approved_by="test")
    status, _ = await acknowledge(enforcer, "100.64.0.20")
    assert status == 200
    write_config(tmp_path, walled_garden={"allow": ["192.0.2.0/24", "198.51.100.0/24"]})
    assert await service.reload()
    assert "100.64.0.20" in fake.state.elements["noticeack4_32"]


# -- the lost table -----------------------------------------------------------------------------
async def test_a_table_removed_behind_our_back_is_detected_and_repaired(running: Any) -> None:
    enforcer, fake, _, _ = running
    assert await enforcer.health.verify()
    fake.state = None                                   # somebody ran "nft flush ruleset"
    assert not await enforcer.health.verify()
    assert enforcer.engine.reconciler.needs_full
    await enforcer.timers.tick()                              # what the repair loop runs
    assert restricted_in_kernel(fake) and not enforcer.engine.reconciler.needs_full


# -- control socket group -----------------------------------------------------------------------
async def test_control_socket_is_given_to_the_configured_group(running: Any, tmp_path: Path) -> None:
    enforcer = running[0]
    group = grp.getgrgid(os.getgid()).gr_name   # one we are a member of, as the unit arranges
    path = str(tmp_path / "run" / "control.sock")
    runner = await start_unix_site(control_app(enforcer), path, group)
    try:
        st = os.stat(path)
        assert st.st_gid == os.getgid() and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        await runner.cleanup()


def test_socket_group_must_exist(tmp_path: Path) -> None:
    path = write_config(tmp_path, api={"socket_group": "no-such-group-wg"})
    with pytest.raises(ConfigError) as err:
        parse_config(path.read_text(), str(path))
    assert "api.socket_group" in str(err.value) and "groupadd --system no-such-group-wg" in str(err.value)


# -- metrics -------------------------------------------------------------------------------------
async def test_kernel_counters_are_read_at_most_once_a_second(running: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    enforcer, fake, _, _ = running
    kernel = enforcer.metrics.kernel
    for _ in range(5):
        await kernel.refresh(enforcer.health.counters)
    assert fake.counter_reads == 1 and kernel.values == {"redirected": (5, 300)}
    monkeypatch.setattr(metrics_module, "COUNTER_MAX_AGE", 0.0)
    fake.counter_values = {"redirected": (6, 360)}
    fake.counter_delay = 0.5                               # the kernel thread is busy
    await kernel.refresh(enforcer.health.counters)
    assert kernel.values == {"redirected": (5, 300)}, "a slow read serves the last values, at once"
    await asyncio.sleep(0.6)
    await kernel.refresh(enforcer.health.counters)
    assert kernel.values == {"redirected": (6, 360)}
    text = generate_latest(enforcer.metrics.registry).decode()
    assert 'walled_garden_kernel_packets_total{counter="redirected"} 6.0' in text
    assert 'walled_garden_kernel_bytes_total{counter="redirected"} 360.0' in text


def promtool() -> str:
    return tool("promtool", "prometheus")


async def exposition(enforcer: Enforcer) -> tuple[str, str]:
    enforcer.metrics.events.labels("payment.received", "applied").inc()
    await enforcer.metrics.kernel.refresh(enforcer.health.counters)
    portal = PortalMetrics()
    return generate_latest(enforcer.metrics.registry).decode(), generate_latest(portal.registry).decode()


async def test_promtool_accepts_both_expositions(running: Any) -> None:
    tool = promtool()
    for text in await exposition(running[0]):
        result = await asyncio.to_thread(subprocess.run, [tool, "check", "metrics"], input=text,
                                         capture_output=True, text=True, check=False, timeout=30)
        assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
            result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules_and_their_tests() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(ROOT / "config" / "prometheus-alerts.yaml")],
                           capture_output=True, text=True, check=False, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([tool, "test", "rules", "prometheus-alerts.test.yaml"], cwd=Path(__file__).parent / "data",
                          capture_output=True, text=True, check=False, timeout=60)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def families(text: str) -> dict[str, str]:
    """Metric family → type, from an exposition (prometheus_client's ``*_created`` companions and its
    ``process_*``/``python_*`` collectors left out: docs/operations.md names those in prose)."""
    types = {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}
    return {name: kind for name, kind in types.items()
            if not (name.endswith("_created") and ({f"{name[:-8]}_total", name[:-8]} & set(types)))
            and not name.startswith(("process_", "python_"))}


def documented() -> dict[str, tuple[str, str]]:
    """The metrics table of docs/operations.md: name → (type, labels)."""
    out = {}
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`walled_garden_"):
            out[cells[0].strip("`")] = (cells[1], cells[2])
    return out


async def test_every_metric_is_documented_with_its_type_and_labels(running: Any) -> None:
    enforcer_text, portal_text = await exposition(running[0])
    exported = {**families(enforcer_text), **families(portal_text)}
    table = documented()
    for name, kind in exported.items():
        assert name in table, f"{name} ({kind}) is exported but not in the docs/operations.md metrics table"
        assert table[name][0] == kind, f"{name}: documented as {table[name][0]}, exported as {kind}"
    names = set(exported)
    assert not set(table) - names, f"documented but not exported: {set(table) - names}"
    for spec in ("walled_garden_subscribers", "walled_garden_event_to_enforce_seconds", "walled_garden_sync_seconds",
                 "walled_garden_sync_failures_total", "walled_garden_last_sync_timestamp_seconds",
                 "walled_garden_source_last_success_timestamp_seconds", "walled_garden_events_total",
                 "walled_garden_portal_requests_total"):
        assert spec in names, f"contract metric {spec} (docs/reference.md, Metrics) missing"


def test_alerts_and_dashboard_use_only_metrics_that_exist() -> None:
    table = documented()
    known = set(table)
    known |= {f"{n}_bucket" for n, (kind, _) in table.items() if kind == "histogram"}
    used = set(re.findall(r"walled_garden_[a-z_]+", (ROOT / "config" / "prometheus-alerts.yaml").read_text()))
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used |= {m for e in exprs for m in re.findall(r"walled_garden_[a-z_]+", e)}
    assert used and not used - known, f"unknown metrics referenced: {used - known}"


def test_config_example_documents_the_socket_group() -> None:
    text = (ROOT / "config" / "config.example.yaml").read_text()
    assert "socket_group: walled-garden" in text
    config = parse_config(text.replace("socket_group: walled-garden", "socket_group: root"),
                          str(ROOT / "config" / "config.example.yaml"))
    assert replace(config.api, socket_group="").socket.endswith("control.sock")


class FakeForwarderBridge:
    """Stands in for the DNS forwarder's process: records the settings it was started with."""

    started: ClassVar[list[Any]] = []

    def __init__(self, settings: Any, metrics: Any) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.ready.set()
        FakeForwarderBridge.started.append(settings)

    def status(self) -> dict[str, Any]:
        return {"running": True, "ready": True, "listen": [f"port {self.settings.port}"]}

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


async def test_reload_to_dns_gateway_and_back_starts_and_stops_the_forwarder(
        running: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.service as service_module

    monkeypatch.setattr(service_module, "ForwarderBridge", FakeForwarderBridge)
    FakeForwarderBridge.started = []
    enforcer, fake, service, _ = running
    gateway = {"allow": ["192.0.2.0/24", "*.psp.example"], "dns": "gateway", "resolvers": ["198.51.100.53"]}
    write_config(tmp_path, walled_garden=gateway)
    assert await service.reload()
    (settings,) = FakeForwarderBridge.started
    assert settings.suffixes == ("psp.example",) and settings.table == enforcer.engine.config.gateway.table
    replaced = [op for tx in fake.transactions for op in tx.operations if isinstance(op, ReplaceTable)]
    assert replaced[-1].layout.dns_port == 5300, "the table redirects to the forwarder before it starts"
    assert enforcer.engine.reports["dns_forwarder"]()["running"] is True
    assert enforcer.metrics.dns_forwarder_enabled._value.get() == 1
    assert restricted_in_kernel(fake)

    write_config(tmp_path, walled_garden={**gateway, "dns_forwarder": {"port": 5301}})
    assert await service.reload()
    assert [s.port for s in FakeForwarderBridge.started] == [5300, 5301], "restarted with the new port"

    write_config(tmp_path, walled_garden={"allow": ["192.0.2.0/24"], "dns": "any"})
    assert await service.reload()
    assert "dns_forwarder" not in enforcer.engine.reports and "dns_forwarder" not in service.supervisor.tasks
    assert enforcer.metrics.dns_forwarder_enabled._value.get() == 0
    assert restricted_in_kernel(fake)
