"""Monitoring over many gateways (issue 17): both registries export build info and the process
collectors, every alert has a runbook in docs/operations.md and names its instance, and the
dashboard selects a gateway's enforcer and portal alike."""

from __future__ import annotations

import json
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


# --- dashboard ---------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def js_regex(pattern: str) -> re.Pattern[str]:
    """A Grafana variable's ``/.../`` regex (the subset shared with Python's)."""
    assert pattern.startswith("/") and pattern.endswith("/"), pattern
    return re.compile(pattern[1:-1])


def test_one_host_selects_a_gateways_enforcer_and_portal_alike() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert "instance" not in variables, "$instance came from the enforcer's series only"
    host = variables["host"]
    assert "walled-garden|walled-garden-portal" in host["query"]["query"], "both jobs' targets"
    strip = js_regex(host["regex"])
    for enforcer, portal, name in (("gw1.isp.example:9640", "gw1.isp.example:9641", "gw1.isp.example"),
                                   ("[2001:db8::1]:9640", "[2001:db8::1]:9641", "[2001:db8::1]"),
                                   ("gw1", "gw1", "gw1")):
        assert strip.fullmatch(enforcer)[1] == strip.fullmatch(portal)[1] == name  # type: ignore[index]
    matcher = 'instance=~"$host(:[0-9]+)?"'
    for panel, target in targets():
        expr = target["expr"]
        assert "$instance" not in expr, panel["title"]
        if "instance=~" in expr:
            assert expr.count("instance=~") == expr.count(matcher), f"{panel['title']}: {expr}"
    # The matcher once Grafana has put host "gw1" in (a multi-value variable: "(gw1)"), anchored as Prometheus does:
    selected = re.compile(matcher.split('"')[1].replace("$host", "(gw1)"))
    assert selected.fullmatch("gw1:9641") and selected.fullmatch("gw1:9640") and not selected.fullmatch("gw10:9640")
    portal = [panel["title"] for panel, target in targets() if "walled_garden_portal_" in target["expr"]]
    assert portal and all(matcher in target["expr"] for panel, target in targets() if panel["title"] in portal)


def test_one_data_source_variable_and_no_unused_inputs() -> None:
    text = DASHBOARD.read_text()
    assert "DS_PROMETHEUS" not in text and "__inputs" not in dashboard()
    source = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == source, panel["title"]
    for panel, target in targets():
        assert target["datasource"] == source, panel["title"]


def test_a_panel_shows_one_unit() -> None:
    """Rates and seconds on one axis mislead: a panel has one unit, no per-series overrides."""
    for panel in dashboard()["panels"]:
        overrides = panel.get("fieldConfig", {}).get("overrides", [])
        units = [p for o in overrides for p in o.get("properties", []) if p["id"] == "unit"]
        assert not units, f"{panel['title']} mixes units"


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
