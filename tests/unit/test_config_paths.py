"""Paths and listeners in the config (docs/reference.md, Configuration), from an operator/CLI
audit: every relative path key resolves against the config file's directory (``state_dir``,
``api.socket`` and the secret files used to follow the current directory while
``subscribers.source`` did not); ``state_dir`` must be able to be a directory; two listeners
on one address:port are an error naming both keys."""

from __future__ import annotations

import base64
import os
import textwrap
from pathlib import Path

import pytest

from enforcer.cli import main
from enforcer.config import ConfigError, Reading, load_config, parse_config, read_config


def _files(directory: Path) -> None:
    """Every file a path key below may name, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + base64.b64encode(b"s" * 32).decode() + "\n"
    for name, text in (("webhook.secret", secret), ("promise.secret", secret.replace("c", "d")),
                       ("radius.secret", "s3cret\n"), ("token", "t\n"), ("cert.pem", "x\n"), ("key.pem", "x\n"),
                       ("ca.pem", "x\n"), ("holidays.txt", "2026-12-24\n"), ("logo.png", "png\n"),
                       ("nats.creds", "c\n"), ("list.yaml", "subscribers: []\n")):
        (directory / name).write_text(text)
        (directory / name).chmod(0o600)
    (directory / "templates").mkdir(exist_ok=True)


RELATIVE = textwrap.dedent("""\
    state_dir: state
    subscribers:
      source: list.yaml
      sessions:
        - {kind: dnsmasq, path: leases/dnsmasq.leases}
        - {kind: radius, listen: '127.0.0.1:1813', secret_file: radius.secret, clients: [127.0.0.1]}
    portal:
      tls: {listen: '0.0.0.0:8443', cert: cert.pem, key: key.pem}
      branding: {logo: logo.png}
      templates_dir: templates
    api:
      socket: run/control.sock
      webhook_secret_file: webhook.secret
    policy:
      windows: {holidays_file: holidays.txt}
      promise_to_pay: {webhook_url: 'https://billing.example/h', webhook_secret_file: promise.secret}
    fleet:
      gateway: gw1
      nats: {url: 'nats://127.0.0.1:4222', creds_file: nats.creds, ca_file: ca.pem, cert_file: cert.pem,
             key_file: key.pem}
    """)


def test_every_relative_path_key_resolves_against_the_config_files_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    _files(etc)
    (etc / "config.yaml").write_text(RELATIVE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # the operator's shell, or / under systemd
    config = load_config(str(etc / "config.yaml"))
    assert config.state_dir == f"{etc}/state"
    assert config.api.socket == f"{etc}/run/control.sock"
    assert config.api.webhook_secret_file == f"{etc}/webhook.secret"
    assert config.subscribers.source == f"{etc}/list.yaml"
    assert config.subscribers.sessions[0].path == f"{etc}/leases/dnsmasq.leases"
    assert config.subscribers.sessions[1].secret_file == f"{etc}/radius.secret"
    assert config.portal.tls is not None and (config.portal.tls.cert, config.portal.tls.key) == \
        (f"{etc}/cert.pem", f"{etc}/key.pem")
    assert config.portal.branding.logo == f"{etc}/logo.png"
    assert config.portal.templates_dir == f"{etc}/templates"
    assert config.policy.promise_to_pay.webhook_secret_file == f"{etc}/promise.secret"
    assert config.policy.windows.holidays, "the holidays file was found beside the config"
    assert config.fleet is not None
    nats = config.fleet.nats
    assert (nats.creds_file, nats.ca_file, nats.cert_file, nats.key_file) == \
        (f"{etc}/nats.creds", f"{etc}/ca.pem", f"{etc}/cert.pem", f"{etc}/key.pem")
    assert not list(elsewhere.iterdir()), "nothing was looked for in the current directory"


def test_url_source_bearer_files_resolve_against_the_config_files_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _files(tmp_path / "etc")
    (tmp_path / "etc" / "config.yaml").write_text(
        "subscribers: {source: 'https://billing.example/list.csv', bearer_token_file: token, ca_file: ca.pem,\n"
        "              client_cert: cert.pem, client_key: key.pem}\n")
    monkeypatch.chdir(tmp_path)
    source = load_config(str(tmp_path / "etc" / "config.yaml")).subscribers
    assert (source.bearer_token_file, source.ca_file, source.client_cert, source.client_key) == \
        tuple(f"{tmp_path}/etc/{name}" for name in ("token", "ca.pem", "cert.pem", "key.pem"))


def test_a_relative_path_that_is_missing_is_named_with_where_it_was_looked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "c.yaml").write_text("subscribers:\n  source: l.yaml\n  sessions:\n"
                                              "    - {kind: radius, listen: '127.0.0.1:1813', secret_file: r.secret}\n")
    (tmp_path / "r.secret").write_text("in the current directory, not beside the config\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config(str(tmp_path / "etc" / "c.yaml"))
    assert f"subscribers.sessions[0].secret_file ({tmp_path}/etc/c.yaml:4): {tmp_path}/etc/r.secret: not a readable " \
           "file" in str(error.value)


def test_check_config_from_another_directory_reads_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    etc = tmp_path / "etc"
    _files(etc)
    (etc / "config.yaml").write_text("state_dir: state\nsubscribers: {source: list.yaml}\n"
                                     "gateway: {subscriber_prefixes: ['100.64.0.0/10']}\n"
                                     "api: {socket: control.sock, webhook_secret_file: webhook.secret}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", "--config", "etc/config.yaml"]) == 0, capsys.readouterr().err
    assert read_config("etc/config.yaml").valid().api.socket == f"{etc}/control.sock"


def test_absolute_paths_stay_as_written(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}/s\nsubscribers: {{source: /srv/l.yaml}}\n"
                          "api: {socket: /run/x/c.sock, webhook_secret_file: /etc/x/w.secret}\n", "/etc/x/c.yaml")
    assert (config.state_dir, config.api.socket, config.api.webhook_secret_file) == \
        (f"{tmp_path}/s", "/run/x/c.sock", "/etc/x/w.secret")


# -- state_dir ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, state_dir, words", [
    ("file", "state", "{d}/state: exists and is not a directory"),
    ("file", "state/deeper/still", "{d}/state/deeper/still: cannot be created: {d}/state is not a directory"),
    ("dir", "state", None),
    ("none", "state/new/deeper", None),
    ("symlink", "state", None),
])
def test_state_dir_must_be_a_directory_or_one_that_can_be_made(tmp_path: Path, layout: str, state_dir: str,
                                                               words: str | None) -> None:
    if layout == "file":
        (tmp_path / "state").write_text("not a directory\n")
    elif layout == "dir":
        (tmp_path / "state").mkdir()
    elif layout == "symlink":
        (tmp_path / "real").mkdir()
        (tmp_path / "state").symlink_to(tmp_path / "real")
    text = f"subscribers: {{source: /srv/l.yaml}}\nstate_dir: {state_dir}\n"
    (tmp_path / "c.yaml").write_text(text)
    result = read_config(str(tmp_path / "c.yaml"))
    if words is None:
        assert not result.issues, result.issues
        assert not (tmp_path / "state" / "new").exists(), "reading the config creates nothing"
    else:
        assert [str(i) for i in result.issues] == [f"state_dir ({tmp_path}/c.yaml:2): {words.format(d=tmp_path)}"]


# -- listeners ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, other", [
    ("metrics: {portal_listen: '127.0.0.1:9640'}\n", "metrics.portal_listen", "metrics.listen"),
    ("metrics: {listen: '127.0.0.1:9641'}\n", "metrics.listen", "metrics.portal_listen"),
    ("portal: {listen: '0.0.0.0:9640'}\n", "portal.listen", "metrics.listen"),
    ("api: {listen: '[::]:8080'}\n", "api.listen", "portal.listen"),
    ("api: {listen: '192.0.2.1:8080'}\n", "api.listen", "portal.listen"),
    ("portal: {listen: '192.0.2.1:8443', tls: {listen: '0.0.0.0:8443', cert: C, key: C}}\n", "portal.tls.listen",
     "portal.listen"),
    ("portal: {tls: {listen: '0.0.0.0:8787', cert: C, key: C}}\n", "portal.tls.listen", "api.listen"),
    ("metrics: {listen: '127.0.0.1:7000', portal_listen: '127.0.0.1:7000'}\n", "metrics.portal_listen",
     "metrics.listen"),
    ("subscribers: {sessions: [{kind: radius, listen: '127.0.0.1:1813', secret_file: C},\n"
     "                         {kind: radius, name: r2, listen: '0.0.0.0:1813', secret_file: C}]}\n",
     "subscribers.sessions[1].listen", "subscribers.sessions[0].listen"),
])
def test_two_listeners_on_one_address_and_port_name_both_keys(tmp_path: Path, text: str, key: str,
                                                              other: str) -> None:
    (tmp_path / "cert.pem").write_text("x\n")
    text = text.replace(": C", f": {tmp_path}/cert.pem")
    if text.startswith("subscribers"):
        text = text.replace("subscribers: {", "subscribers: {source: /srv/l.yaml, ")
    else:
        text = "subscribers: {source: /srv/l.yaml}\n" + text
    reading = read_config_text(tmp_path, text)
    clashes = [str(i) for i in reading.issues]
    assert len(clashes) == 1, clashes
    assert clashes[0].startswith(f"{key} ({tmp_path}/c.yaml:") and f"is also {other}'s address" in clashes[0]


@pytest.mark.parametrize("text", [
    "metrics: {portal_listen: '127.0.0.1:9640', listen: ~}\n",          # the other one is off
    "api: {listen: '127.0.0.1:9641'}\nmetrics: {portal_listen: '127.0.0.2:9641'}\n",   # two addresses
    "portal: {listen: '192.0.2.1:8080'}\napi: {listen: '192.0.2.2:8080'}\n",
    "subscribers: {source: /srv/l.yaml, sessions: [{kind: radius, listen: '127.0.0.1:8080', secret_file: C}]}\n",
])
def test_listeners_on_distinct_sockets_pass(tmp_path: Path, text: str) -> None:
    (tmp_path / "cert.pem").write_text("x\n")
    text = text.replace(": C", f": {tmp_path}/cert.pem")
    if not text.startswith("subscribers"):
        text = "subscribers: {source: /srv/l.yaml}\n" + text
    assert not read_config_text(tmp_path, text).issues


def test_check_config_names_a_listener_clash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text("subscribers: {source: /srv/l.yaml}\nmetrics:\n  portal_listen: 127.0.0.1:9640\n")
    assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 1
    assert f"  metrics.portal_listen ({tmp_path}/c.yaml:3): 127.0.0.1:9640 is also metrics.listen's address" \
        in capsys.readouterr().err


def read_config_text(tmp_path: Path, text: str) -> Reading:
    (tmp_path / "c.yaml").write_text(text)
    return read_config(str(tmp_path / "c.yaml"))


def test_the_reader_never_changes_the_current_directory(tmp_path: Path) -> None:
    before = os.getcwd()
    read_config_text(tmp_path, RELATIVE)
    assert os.getcwd() == before
