"""Monitoring over many gateways (issue 17): both registries export build info and the process
collectors, every alert has a runbook in docs/operations.md and names its instance, and the
dashboard selects a gateway's enforcer and portal alike. A fresh daemon's failure counters
exist at 0 before any failure (NOC audit: increase() and rate() never count a series' first
sample, so a first failure that created its series at 1 never alerted)."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from captive_portal.metrics import PortalMetrics
from daemon_helpers import NoConntrack
from enforcer import process_metrics
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.metric_labels import Labelled
from enforcer.metrics import FLEET_PUBLISHED, FLEET_SKIPPED, SOURCE_FAILURE_REASONS, SPAWNED_TASKS, Metrics
from enforcer.service import Service
from enforcer.sessions.source import PROBLEMS

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


# --- failure counters exist before the first failure -------------------------------------------

def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What /metrics serves (``api.scrape``): sample (name, labels) -> value."""
    registry = Labelled(metrics.registry, metrics.constant_labels) if metrics.constant_labels else metrics.registry
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> dict[frozenset[Any], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


@pytest.mark.parametrize("fleet", [False, True], ids=["alone", "fleet"])
async def test_a_fresh_daemons_failure_counters_are_at_zero_before_any_failure(tmp_path: Path, fleet: bool) -> None:
    """A started daemon (a list file, a dnsmasq lease source; in a fleet whose NATS does not
    answer, or alone) serves every failure series an alert watches at 0: the list source's
    reasons (http_<status> aside), every task's, each session source's kinds under the name its
    problems are counted under, and in a fleet the published and skipped results (alone: none)."""
    (tmp_path / "l.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n")
    (tmp_path / "dnsmasq.leases").write_text("")
    text = (f"state_dir: {tmp_path}/state\n"
            f"subscribers: {{source: {tmp_path}/l.yaml, sessions: [{{kind: dnsmasq, name: leases, "
            f"path: {tmp_path}/dnsmasq.leases}}]}}\n"
            f"api: {{socket: {tmp_path}/control.sock, listen: null}}\n"
            "metrics: {listen: null, portal_listen: null}\n")
    if fleet:   # the discard port: nothing listens, the start goes on with the local state
        text += "fleet: {gateway: bng-1, nats: {url: 'nats://127.0.0.1:9'}, stream: WG_TEST, catch_up_timeout: 1s}\n"
    config = parse_config(text, str(tmp_path / "config.yaml"))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    stop = asyncio.Event()
    service = Service(config, enforcer, stop)
    try:
        await enforcer.engine.restore()
        await asyncio.wait_for(service.start(), 30)
        samples = scrape(enforcer.metrics)
    finally:
        stop.set()
        await service.close()
        await enforcer.close()
    gateway = {("gateway", "bng-1")} if fleet else set()
    failures = series(samples, "walled_garden_source_failures_total")
    assert failures == {frozenset({("reason", r), *gateway}): 0.0 for r in SOURCE_FAILURE_REASONS}, failures
    tasks = {dict(labels)["task"]: n for labels, n in series(samples, "walled_garden_task_failures_total").items()}
    expected = {*SPAWNED_TASKS, "source", "sessions_leases", "timers", "table_check", *(["fleet"] if fleet else [])}
    assert set(tasks) == expected and not any(tasks.values()), tasks
    source = "bng-1/leases" if fleet else "leases"
    errors = series(samples, "walled_garden_session_source_errors_total")
    assert errors == {frozenset({("source", source), ("kind", k), *gateway}): 0.0 for k in PROBLEMS}, errors
    sessions = series(samples, "walled_garden_sessions")   # one gauge, under the name its sessions count under
    assert sessions == {frozenset({("source", source), *gateway}): 0.0}, sessions
    published = series(samples, "walled_garden_fleet_published_total")
    applied = series(samples, "walled_garden_fleet_applied_total")
    if fleet:
        assert published == {frozenset({("result", r), *gateway}): 0.0 for r in FLEET_PUBLISHED}, published
        assert applied == {frozenset({("kind", "-"), ("result", r), *gateway}): 0.0 for r in FLEET_SKIPPED}, applied
    else:
        assert published == {} and applied == {}, (published, applied)


def calls(method: str, pattern: str = "**/*.py") -> list[ast.Call]:
    """Every call of ``<something>.<method>(...)`` or ``<method>(...)`` in the enforcer package's
    modules that match ``pattern``."""
    found = []
    for path in sorted((ROOT / "enforcer").glob(pattern)):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and method in (getattr(node.func, "attr", None),
                                                         getattr(node.func, "id", None)):
                found.append(node)
    return found


def test_every_source_failure_reason_the_code_gives_is_created_at_start() -> None:
    """A reason added to the code without its series at 0 would be silent on its first failure
    again; only a URL's ``http_<status>`` cannot be known in advance (the alert catches it new)."""
    reasons: set[str] = set()
    for call in calls("SourceFailure") + calls("_fail", "sources.py"):   # UrlSource._fail(reason, message)
        reason = call.args[1] if call.args and getattr(call.func, "id", None) == "SourceFailure" else \
            call.args[0] if call.args else None
        if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
            reasons.add(reason.value)
        elif isinstance(reason, ast.JoinedStr):
            head = reason.values[0]
            assert isinstance(head, ast.Constant) and head.value == "http_", ast.unparse(reason)
    assert reasons and reasons <= set(SOURCE_FAILURE_REASONS), reasons - set(SOURCE_FAILURE_REASONS)
    assert {"unreadable", "invalid", "internal", "state", "timeout"} <= reasons, reasons


def test_every_one_off_task_name_is_created_at_start() -> None:
    """``Engine.spawn(coro, name)`` counts a failure under ``name`` (default ``flush``); the
    supervisor's tasks create theirs as they start."""
    names = set()
    for call in calls("spawn"):
        if len(call.args) == 1 and not call.keywords:
            names.add("flush")
        elif len(call.args) == 2:
            assert isinstance(call.args[1], ast.Constant), ast.unparse(call)
            names.add(call.args[1].value)
    assert names == set(SPAWNED_TASKS), names


def test_the_skipped_results_the_code_counts_are_the_ones_the_alert_watches() -> None:
    """Every ``fleet_applied`` result but applied and refused is a message skipped: the alert
    names each, and those of kind "-" exist at 0 in a fleet (``FLEET_SKIPPED``)."""
    results = set()
    for call in calls("labels", "fleet/*.py"):
        if ast.unparse(call.func).endswith("fleet_applied.labels"):   # ("-", "lost"), (kind, "refused" if ...)
            results |= {c.value for c in ast.walk(call.args[1]) if isinstance(c, ast.Constant)}
    [rule] = [r for r in alerts() if r["alert"] == "WalledGardenFleetInputsSkipped"]
    watched = set(re.findall(r'result=~"([^"]+)"', rule["expr"])[0].split("|"))
    assert results - {"applied", "refused"} == watched and set(FLEET_SKIPPED) <= watched, (results, watched)


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
