"""The ``fleet`` section (docs/reference.md, Fleet): absent, nothing changes; present, every bad
value is named by its key path and line; the fleet is bound at start (a reload keeps it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer.config import ConfigError, FleetConfig, NatsConfig, parse_config
from enforcer.config.reload import reloadable

BASE = "subscribers: {source: /tmp/restricted.yaml}\n"


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [str(issue) for issue in info.value.issues]


def test_without_fleet_a_gateway_runs_alone() -> None:
    assert parse_config(BASE).fleet is None


def test_a_fleet_with_defaults_and_a_cluster(tmp_path: Path) -> None:
    creds = tmp_path / "nats.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    config = parse_config(BASE + f"fleet:\n  gateway: bng-prague-1\n  nats:\n    url: [nats://192.0.2.5:4222, "
                          f"'tls://[2001:db8::5]:4222']\n    creds_file: {creds}\n  replicas: 3\n"
                          "  catch_up_timeout: 1m\n")
    assert config.fleet == FleetConfig("bng-prague-1", NatsConfig(("nats://192.0.2.5:4222", "tls://[2001:db8::5]:4222"),
                                                                   creds_file=str(creds)),
                                       replicas=3, catch_up_timeout=60.0)
    assert config.fleet.stream == "WALLED_GARDEN" and config.fleet.answer_timeout == 10.0


@pytest.mark.parametrize(("section", "expected"), [
    ("fleet: {nats: {url: 'nats://192.0.2.5:4222'}}", "fleet.gateway: required"),
    ("fleet: {gateway: a}", "fleet.nats: required"),
    ("fleet: {gateway: a, nats: {creds_file: /nonexistent}}", "fleet.nats.url: required"),
    ("fleet: {gateway: 'bng.1', nats: {url: 'nats://192.0.2.5:4222'}}", "fleet.gateway: 'bng.1' is not a name"),
    ("fleet: {gateway: a, stream: 'WG*', nats: {url: 'nats://192.0.2.5:4222'}}", "fleet.stream"),
    ("fleet: {gateway: a, nats: {url: 'http://192.0.2.5:4222'}}", "fleet.nats.url: 'http://192.0.2.5:4222'"),
    ("fleet: {gateway: a, nats: {url: 'nats://192.0.2.5'}}", "fleet.nats.url"),
    ("fleet: {gateway: a, nats: {url: 'nats://192.0.2.5:99999'}}", "fleet.nats.url"),
    ("fleet: {gateway: a, nats: {url: 'nats://192.0.2.5:4222', creds_file: /nonexistent}}",
     "fleet.nats.creds_file: /nonexistent: not a readable file"),
    ("fleet: {gateway: a, replicas: 7, nats: {url: 'nats://192.0.2.5:4222'}}", "fleet.replicas"),
    ("fleet: {gateway: a, answer_timeout: 0s, nats: {url: 'nats://192.0.2.5:4222'}}", "fleet.answer_timeout"),
    ("fleet: {gateway: a, nats: {url: 'nats://192.0.2.5:4222', servers: x}}", "fleet.nats.servers: unknown key"),
    ("fleet: {gateway: a, nats: {url: 'nats://192.0.2.5:4222'}, consumer: x}", "fleet.consumer: unknown key"),
    ("fleet: [a]", "fleet: expected a mapping"),
])
def test_bad_fleet_values_are_named(section: str, expected: str) -> None:
    found = issues(BASE + section + "\n")
    assert all("(config.yaml:2)" in issue for issue in found), found   # the line of the fleet key
    assert any(expected in issue.replace(" (config.yaml:2)", "") for issue in found), found


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    found = issues(BASE + f"fleet: {{gateway: a, nats: {{url: 'tls://192.0.2.5:4222', cert_file: {cert}}}}}\n")
    assert any(issue.startswith("fleet.nats.key_file") and "go together" in issue for issue in found), found


def test_a_reload_keeps_the_running_fleet() -> None:
    old = parse_config(BASE + "fleet: {gateway: a, nats: {url: 'nats://192.0.2.5:4222'}}\n")
    new = parse_config(BASE + "fleet: {gateway: b, nats: {url: 'nats://192.0.2.6:4222'}}\n")
    kept, restart = reloadable(old, new)
    assert kept.fleet == old.fleet and restart == ["fleet"]


def test_catch_up_is_bounded_below_systemds_start_timeout() -> None:
    found = issues(BASE + "fleet: {gateway: a, catch_up_timeout: 100s, nats: {url: 'nats://192.0.2.5:4222'}}\n")
    assert any(i.startswith("fleet.catch_up_timeout") and "90s" in i for i in found), found
