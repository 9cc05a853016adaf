"""Monitoring over many gateways (issue 17): both registries export build info and the process
collectors, every alert has a runbook in docs/operations.md and names its instance, and the
dashboard selects a gateway's enforcer and portal alike."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from captive_portal.metrics import PortalMetrics
from enforcer import process_metrics
from enforcer.metric_labels import Labelled
from enforcer.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "config" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
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
