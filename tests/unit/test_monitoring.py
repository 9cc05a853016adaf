"""Monitoring over many gateways (issue 17): both registries export build info and the process
collectors, every alert has a runbook in docs/operations.md and names its instance, and the
dashboard selects a gateway's enforcer and portal alike."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from captive_portal.metrics import PortalMetrics
from enforcer import process_metrics
from enforcer.metric_labels import Labelled
from enforcer.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
ALERT_TESTS = ROOT / "tests" / "unit" / "data" / "prometheus-alerts.test.yaml"
RUNBOOKS = "https://walled-garden.example/docs/operations.md#"
PROCESS_SERIES = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                  "process_start_time_seconds", "python_info")


# --- metrics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("registry", [lambda: Metrics().registry, lambda: PortalMetrics().registry],
                         ids=["enforcer", "portal"])
def test_both_registries_export_build_info_and_process_series(registry: Any) -> None:
    text = generate_latest(registry()).decode()
    info = [line for line in text.splitlines() if line.startswith("walled_garden_build_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), text
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info[0]))
    assert set(labels) == {"version", "python", "nftables"}
    assert labels["version"] == process_metrics.package_version() and labels["python"].count(".") == 2
    for name in PROCESS_SERIES:
        assert re.search(rf"^{name}(\{{| )", text, re.MULTILINE), f"{name} missing"


def test_build_info_and_process_series_carry_the_fleet_label() -> None:
    text = generate_latest(Labelled(Metrics().registry, {"gateway": "bng-1"})).decode()  # type: ignore[arg-type]
    assert re.search(r'^walled_garden_build_info\{.*gateway="bng-1"', text, re.MULTILINE)
    assert re.search(r'^process_cpu_seconds_total\{gateway="bng-1"\}', text, re.MULTILINE)


def test_nftables_version_is_parsed_or_unknown(tmp_path: Path) -> None:
    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'nftables v1.0.6 (Lester Gooch #5)'\n")
    fake.chmod(0o755)
    assert process_metrics.nftables_version(str(fake)) == "1.0.6"
    fake.write_text("#!/bin/sh\nexit 3\n")
    assert process_metrics.nftables_version(str(fake)) == "unknown"
    assert process_metrics.nftables_version(str(tmp_path / "absent")) == "unknown"


def test_build_info_is_read_at_the_first_scrape_not_at_start() -> None:
    info = process_metrics.BuildInfo()
    assert info._labels is None, "constructing a registry runs no nft"
    info = process_metrics.BuildInfo({"version": "9", "python": "3", "nftables": "1"})
    [family] = list(info.collect())
    assert family.samples[0].labels == {"version": "9", "python": "3", "nftables": "1"}


def test_the_docs_name_the_process_series_and_every_portal_kind() -> None:
    text = OPERATIONS.read_text()
    for name in PROCESS_SERIES:
        assert f"`{name}`" in text, f"{name} not named in docs/operations.md"
    row = next(line for line in text.splitlines() if line.startswith("| `walled_garden_portal_requests_total`"))
    from captive_portal.metrics import RequestKind
    for kind in RequestKind:
        assert f"`{kind.value}`" in row, f"kind={kind.value} missing from the metrics table"


# --- alerts ------------------------------------------------------------------------------------

def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def test_every_alert_links_its_own_runbook_heading() -> None:
    headings = set(re.findall(r"^#### (WalledGarden\w+)$", OPERATIONS.read_text(), re.MULTILINE))
    names = {rule["alert"] for rule in alerts()}
    for rule in alerts():
        assert rule["annotations"].get("runbook_url") == RUNBOOKS + rule["alert"].lower(), rule["alert"]
    assert names == headings, f"runbooks missing: {names - headings}, runbooks of no alert: {headings - names}"


def test_only_the_job_level_alert_uses_absent() -> None:
    """absent() keeps only the matchers' labels: an alert about a gateway must not be built on it."""
    for rule in alerts():
        if rule["alert"] != "WalledGardenNotScraped":
            assert "absent(" not in rule["expr"] and "absent_over_time(" not in rule["expr"], rule["alert"]


def test_alerts_about_a_gateway_name_its_instance_in_their_tests() -> None:
    tested: dict[str, int] = {}
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            for alert in case["exp_alerts"]:
                tested[case["alertname"]] = tested.get(case["alertname"], 0) + 1
                if case["alertname"] not in ("WalledGardenNotScraped", "WalledGardenFleetGatewayNotSeen"):
                    assert "instance" in alert["exp_labels"], case["alertname"]
    for name in ("WalledGardenDaemonDown", "WalledGardenPortalDown", "WalledGardenNotScraped",
                 "WalledGardenWebhooksUnauthorized", "WalledGardenWebhooksUnavailable", "WalledGardenPortalErrors"):
        assert tested.get(name), f"{name} has no promtool test that fires it"
