"""``subscribers.sessions``: session sources read strictly, each problem named by key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from enforcer.config import ConfigError, parse_config
from enforcer.config.reload import reloadable
from enforcer.config.schema import Listen


def _config(tmp_path: Path, sessions: str) -> str:
    return f"subscribers:\n  source: {tmp_path}/l.yaml\n  sessions:\n{sessions}"


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/wg/config.yaml")
    return [f"{i.where.split(' (')[0]}: {i.message}" for i in info.value.issues]


def test_every_kind_reads_into_its_source(tmp_path: Path) -> None:
    secret = tmp_path / "radius.secret"
    secret.write_text("s3cret\n")
    config = parse_config(_config(tmp_path, f"""\
    - {{kind: dnsmasq, path: /var/lib/misc/dnsmasq.leases}}
    - {{kind: kea, name: kea6, path: leases6.csv, poll_interval: 1s}}
    - {{kind: radius, listen: "127.0.0.1:1813", secret_file: {secret}, clients: [192.0.2.1, 198.51.100.0/24],
       session_timeout: 2h}}
"""), "/etc/wg/config.yaml")
    dnsmasq, kea, radius = config.subscribers.sessions
    assert (dnsmasq.kind, dnsmasq.name, dnsmasq.path, dnsmasq.poll_interval) == (
        "dnsmasq", "dnsmasq", "/var/lib/misc/dnsmasq.leases", 0.25)
    assert (kea.name, kea.path, kea.poll_interval) == ("kea6", "/etc/wg/leases6.csv", 1.0)
    assert radius.listen == Listen("127.0.0.1", 1813) and radius.secret_file == str(secret)
    assert [str(c) for c in radius.clients] == ["192.0.2.1/32", "198.51.100.0/24"]
    assert radius.session_timeout == 7200


def test_each_bad_source_is_named_by_its_key_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    found = _issues(_config(tmp_path, f"""\
    - {{kind: dhcpd, path: /x}}
    - {{kind: dnsmasq}}
    - {{kind: radius, listen: "localhost:1813", secret_file: {empty}}}
    - {{kind: kea, path: /a, listen: "127.0.0.1:1"}}
    - {{kind: dnsmasq, name: event, path: /b}}
"""))
    assert any(f.startswith("subscribers.sessions[0].kind: 'dhcpd' is not one of dnsmasq, kea, radius")
               for f in found), found
    assert any(f.startswith("subscribers.sessions[1].path: required") for f in found), found
    assert any(f.startswith("subscribers.sessions[2].listen:") for f in found), found
    assert any(f.startswith("subscribers.sessions[2].secret_file:") and "first line is empty" in f
               for f in found), found
    assert any(f.startswith("subscribers.sessions[3].listen: does not apply to a kea source") for f in found), found
    assert any(f.startswith("subscribers.sessions[4].name:") and "not event or cli" in f for f in found), found


def test_two_sources_of_one_name_are_refused(tmp_path: Path) -> None:
    found = _issues(_config(tmp_path, "    - {kind: dnsmasq, path: /a}\n    - {kind: dnsmasq, path: /b}\n"))
    assert any("two sources are named 'dnsmasq'" in f for f in found), found


def test_sessions_must_be_a_list(tmp_path: Path) -> None:
    found = _issues(f"subscribers:\n  source: {tmp_path}/l.yaml\n  sessions: {{kind: dnsmasq}}\n")
    assert any(f.startswith("subscribers.sessions: expected a list") for f in found), found


def test_a_reload_keeps_the_running_sources_and_says_a_restart_is_needed(tmp_path: Path) -> None:
    old = parse_config(_config(tmp_path, "    - {kind: dnsmasq, path: /a}\n"))
    new = parse_config(_config(tmp_path, "    - {kind: dnsmasq, path: /b}\n"))
    kept, restart = reloadable(old, new)
    assert restart == ["subscribers.sessions"] and kept.subscribers.sessions == old.subscribers.sessions
