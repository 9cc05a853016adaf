"""The command line: check-config names every problem; render prints a valid transaction."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from enforcer.cli import main

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def _setup(tmp_path: Path, config_extra: str = "", listing: str | None = None) -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "secret").chmod(0o600)
    (tmp_path / "list.yaml").write_text(listing if listing is not None else
                                        "subscribers:\n  - {id: C-1, addresses: [100.64.0.10, '2001:db8:1::/56']}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path}/state\nsubscribers:\n  source: list.yaml\n"
                      f"api:\n  webhook_secret_file: {tmp_path}/secret\n{config_extra}")
    return config


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(_setup(tmp_path))]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_config_names_every_config_error_by_key_and_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "portal:\n  url: ftp://x\n  lisen: 1\ngateway:\n  table: 'bad name'\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"portal.url ({config}:7)" in err
    assert f"portal.lisen ({config}:8)" in err and "unknown key" in err
    assert f"gateway.table ({config}:10)" in err


def test_check_config_names_list_lines_and_secret_problems(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, listing="subscribers:\n  - id: C-1\n    addresses: [100.64.0.300]\n")
    (tmp_path / "secret").write_text("not-a-secret\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/list.yaml:2" in err and "100.64.0.300" in err
    assert "whsec_" in err


def test_check_config_caps_a_systematic_list_error_and_counts_the_rest(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"C-{i},100.64.{i // 250}.{i % 250 + 1},walled-garden,overdue,sometime\n" for i in range(500))
    (tmp_path / "list.csv").write_text(rows)
    config = _setup(tmp_path).read_text().replace("source: list.yaml", "source: list.csv")
    (tmp_path / "config.yaml").write_text(config)
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING: ")]
    assert err[0].endswith(": 500 error(s)")
    shown = [line for line in err if "list.csv:" in line]
    assert len(shown) == 20 and shown[0].startswith(f"  {tmp_path}/list.csv:1")
    assert err[-1] == "  ... and 480 more problem(s) in the subscriber list (500 in all; --json lists every one)"


def test_check_config_json_lists_every_problem_and_warning(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, listing="subscribers:\n  - id: C-1\n    addresses: [100.64.0.300]\n")
    (tmp_path / "secret").write_text("not-a-secret\n")
    assert main(["check-config", "--config", str(config), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["config"] == str(config) and out["listed"] is None
    assert len(out["errors"]) == 2 and any("100.64.0.300" in e for e in out["errors"])
    capsys.readouterr()
    assert main(["check-config", "--config", str(_setup(tmp_path)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["errors"] == [] and out["listed"] == 1
    assert any("subscriber_prefixes" in w for w in out["warnings"])


@pytest.mark.skipif(os.geteuid() != 0, reason="what root without CAP_DAC_OVERRIDE reads; checked only as root")
def test_check_config_refuses_a_list_only_full_root_can_read(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path)
    os.chown(tmp_path / "list.yaml", 65534, 65534)   # billing's user wrote it 0600
    (tmp_path / "list.yaml").chmod(0o600)
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/list.yaml: the daemon (root without CAP_DAC_OVERRIDE" in err and "mode 0600" in err
    os.chown(tmp_path / "list.yaml", 65534, 0)      # group root may read: the daemon can
    (tmp_path / "list.yaml").chmod(0o640)
    assert main(["check-config", "--config", str(config)]) == 0
    capsys.readouterr()
    # a symlink to a list in a directory only billing's user may enter: the target's path counts
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (tmp_path / "list.yaml").rename(private / "list.yaml")
    os.chown(private, 65534, 65534)
    (tmp_path / "list.yaml").symlink_to(private / "list.yaml")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{private} (the list " in err and "): the daemon (root without CAP_DAC_OVERRIDE" in err
    assert "cannot enter it" in err
    assert "g+x" in err


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WALLED_GARDEN_CONFIG", str(_setup(tmp_path)))
    assert main(["check-config"]) == 0


def test_render_prints_one_atomic_transaction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--config", str(_setup(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("add table inet walled_garden\ndelete table inet walled_garden\n")
    assert "add element inet walled_garden portal4_32 { 100.64.0.10 }" in out
    assert "add element inet walled_garden portal6_56 { 2001:db8:1:: }" in out
    assert "\t\tip saddr @portal4_32 goto garden\n" in out
    assert "vmap" not in out and "mode4_32" not in out, "the mode view is not part of the ruleset"
    assert not (tmp_path / "state").exists(), "render must touch nothing"


def test_check_config_reports_portal_text_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "portal:\n  texts:\n    cs:\n      heading_restriced: Pozor\n")
    assert main(["check-config", "--config", str(config)]) == 1
    assert "portal.texts.cs.heading_restriced" in capsys.readouterr().err


# -- file:line, never a traceback; secrets kept private; subscriber_prefixes ------------------

@pytest.mark.parametrize("listing, where, words", [
    ("subscribers:\n  - {id: C-1, addresses: [100.64.0.1], exempt_until: 9999-12-31}\n", "list.yaml:2", "exempt_until"),
    ("subscribers:\n  - {id: C-1, addresses: [127.0.0.1]}\n", "list.yaml:2", "loopback"),
    ("subscribers: " + "[" * 5000 + "]" * 5000 + "\n", "list.yaml:1", "nesting"),
    ("a: &a [x, x]\nsubscribers: [*a, *a]\n", "list.yaml:1", "aliases"),
])
def test_check_config_names_list_problems_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               listing: str, where: str, words: str) -> None:
    assert main(["check-config", "--config", str(_setup(tmp_path, listing=listing))]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/{where}" in err and words in err and "Traceback" not in err


def test_check_config_names_a_list_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path)
    (tmp_path / "list.yaml").write_bytes(b"subscribers:\n  - {id: C-\xff, addresses: [100.64.0.1]}\n")
    assert main(["check-config", "--config", str(config)]) == 1
    assert f"{tmp_path}/list.yaml:2" in capsys.readouterr().err


@pytest.mark.parametrize("mode, ok", [(0o600, True), (0o400, True), (0o640, True), (0o644, False),
                                      (0o666, False), (0o620, False), (0o604, False), (0o602, False)])
def test_check_config_refuses_a_webhook_secret_others_can_read_or_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, ok: bool) -> None:
    config = _setup(tmp_path)
    (tmp_path / "secret").chmod(mode)
    assert main(["check-config", "--config", str(config)]) == (0 if ok else 1)
    err = capsys.readouterr().err
    if not ok:
        assert f"{tmp_path}/secret: mode {mode:04o}" in err and "api.webhook_secret_file" in err


def test_check_config_checks_the_promise_secret_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    promise = tmp_path / "promise.secret"
    promise.write_text("whsec_" + base64.b64encode(b"p" * 32).decode() + "\n")
    promise.chmod(0o644)
    config = _setup(tmp_path, "policy:\n  promise_to_pay:\n    webhook_url: https://billing.example/h\n"
                              f"    webhook_secret_file: {promise}\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{promise}: mode 0644" in err and "policy.promise_to_pay.webhook_secret_file" in err


def test_check_config_warns_without_subscriber_prefixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(_setup(tmp_path))]) == 0
    err = capsys.readouterr().err
    assert "WARNING: gateway.subscriber_prefixes is not set" in err
    config = _setup(tmp_path, "gateway:\n  subscriber_prefixes: ['100.64.0.0/10', '2001:db8::/32']\n")
    assert main(["check-config", "--config", str(config)]) == 0
    assert "WARNING: gateway.subscriber_prefixes" not in capsys.readouterr().err


def test_check_config_refuses_list_entries_outside_the_subscriber_prefixes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "gateway:\n  subscriber_prefixes: ['100.64.0.0/10']\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/list.yaml:2" in err and "2001:db8:1::/56" in err and "outside" in err


@pytest.mark.parametrize("listing", [
    None, "subscribers:\n  - {id: C-1, addresses: [100.64.0.300]}\n",
    "subscribers:\n  - {id: C-1, addresses: [100.64.0.1], exempt_until: 9999-12-31}\n"])
def test_render_with_a_missing_or_invalid_list_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 listing: str | None) -> None:
    config = _setup(tmp_path, listing=listing)
    if listing is None:
        (tmp_path / "list.yaml").unlink()
    assert main(["render", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot render" in captured.err and "Traceback" not in captured.err
    assert f"{tmp_path}/list.yaml" in captured.err


def test_render_with_a_url_source_says_the_sets_are_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path)
    config.write_text(config.read_text().replace("source: list.yaml", "source: 'https://u:pw1@b.example/x?token=t1'"))
    assert main(["render", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "fetched at run time" in captured.err and "empty" in captured.err
    assert "pw1" not in captured.err and "t1" not in captured.err
    assert captured.out.startswith("add table inet walled_garden\n")


def test_check_config_prints_portal_url_hints_as_warnings(tmp_path: Path, capsys: Any) -> None:
    """A portal.url host that is an address not on this machine: a WARNING line, exit 0."""
    secret = tmp_path / "secret"
    secret.write_text("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n")
    secret.chmod(0o600)
    (tmp_path / "l.yaml").write_text("subscribers: []\n")
    (tmp_path / "c.yaml").write_text(
        f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
        "gateway: {subscriber_prefixes: ['100.64.0.0/10']}\n"
        "portal: {url: 'http://198.51.100.77/'}\n"
        f"api: {{socket: {tmp_path}/c.sock, webhook_secret_file: {secret}}}\n")
    assert main(["check-config", "--config", str(tmp_path / "c.yaml")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: portal.url: 198.51.100.77 is not an address of this machine" in err


def test_a_secret_readable_by_the_portals_group_is_refused(tmp_path: Path) -> None:
    import grp
    import os

    from enforcer.cli import secret_file_problem

    secret = tmp_path / "secret"
    secret.write_text("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n")
    secret.chmod(0o640)
    group = grp.getgrgid(os.stat(secret).st_gid).gr_name
    problem = secret_file_problem(str(secret), group)
    assert problem is not None and "let the portal read the webhook secret" in problem
    assert secret_file_problem(str(secret), "") is None


def test_check_config_names_every_problem_of_every_group_in_one_run(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A config key, a list line, a secret and the branding are all wrong: one run names all four."""
    config = _setup(tmp_path, "policy:\n  payment_grase: 3d\n"
                              "portal:\n  branding: {text_color: '#f4f6f8', background_color: '#f4f6f8'}\n",
                    listing="subscribers:\n  - {id: C-1, addresses: [100.64.0.300]}\n")
    (tmp_path / "secret").unlink()
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"policy.payment_grase ({config}:7)" in err and "unknown key" in err
    assert f"{tmp_path}/list.yaml:2" in err and "100.64.0.300" in err
    assert f"{tmp_path}/secret: cannot read webhook secret" in err
    assert "portal.branding.text_color: #f4f6f8 on background_color #f4f6f8" in err
    assert err.startswith(f"{config}: ") and err.count(" error(s)") == 1, "one report, one count"
    assert "Traceback" not in err


def test_check_config_does_not_check_a_default_standing_in_for_a_refused_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused value is named once; its default is not checked as if the operator had chosen it."""
    config = _setup(tmp_path, "portal:\n  branding: {text_color: white}\n")
    config.write_text(config.read_text().replace(f"webhook_secret_file: {tmp_path}/secret", "webhook_secret_file: 7"))
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"api.webhook_secret_file ({config}:5): expected a non-empty string" in err
    assert f"portal.branding.text_color ({config}:7)" in err and "not a colour" in err
    assert "/etc/walled-garden/webhook.secret" not in err and "contrast" not in err
    assert err.startswith(f"{config}: 2 error(s)")


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib
    from importlib import metadata

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    expected = f"walled-garden {pyproject['project']['version']}\n"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == expected

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == expected, "from pyproject.toml when not installed"


def test_check_config_checks_the_list_sources_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bearer token or client key others may read lets any local user fetch billing's whole
    restricted list (security audit: never mode-checked)."""
    token, key = tmp_path / "list.token", tmp_path / "client.key"
    token.write_text("t0ken\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    token.chmod(0o644)
    key.chmod(0o604)
    config = _setup(tmp_path)
    config.write_text(config.read_text().replace(
        "  source: list.yaml\n", f"  source: https://127.0.0.1:9/list.csv\n  bearer_token_file: {token}\n"
        f"  client_cert: {key}\n  client_key: {key}\n"))
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{token}: mode 0644 lets other users read or change the list source credential" in err, err
    assert f"{key}: mode 0604 lets other users read or change the list source credential" in err, err
    assert "subscribers.bearer_token_file" in err and "subscribers.client_key" in err, err
    token.chmod(0o600)
    key.chmod(0o600)
    main(["check-config", "--config", str(config)])   # the source itself is unreachable here
    assert "list source credential" not in capsys.readouterr().err


def test_check_config_checks_session_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    radius = tmp_path / "radius.secret"
    radius.write_text("s3cret\n")
    radius.chmod(0o644)
    sessions = (f"  sessions:\n    - {{kind: dnsmasq, path: {tmp_path}/absent/dnsmasq.leases}}\n"
                f"    - {{kind: radius, listen: '127.0.0.1:1813', secret_file: {radius}}}\n")
    config = _setup(tmp_path)
    config.write_text(config.read_text().replace("  source: list.yaml\n", "  source: list.yaml\n" + sessions))
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{radius}: mode 0644 lets other users read or change the RADIUS secret" in err
    assert "subscribers.sessions[1].secret_file" in err
    radius.chmod(0o600)
    assert main(["check-config", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "subscribers.sessions[0] (dnsmasq): the directory of" in err and "does not exist" in err
    assert "subscribers.sessions[1] (radius): no clients given" in err


async def test_plain_status_shows_a_quarantined_state_failed_tasks_and_address_conflicts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SPEC 8: a quarantined state database and a task's failures are shown by ``status``, not
    only by ``status --json`` (found by a SPEC audit); so is a subscriber held back by a clash."""
    import enforcer.cli as cli
    from daemon_helpers import NoConntrack
    from enforcer.config import parse_config
    from enforcer.daemon import Enforcer
    from enforcer.dataplane.fake import FakeDataplane

    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"not a database at all" * 100)
    config = parse_config(f"state_dir: {state}\nsubscribers: {{source: {tmp_path}/l.yaml}}\n", str(tmp_path / "c.yaml"))
    e = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    try:
        await e.engine.restore()
        e.engine.conflicts.note("C-6", "100.64.3.0/30 covers 100.64.3.3/32, held by subscriber C-5", "walled-garden",
                                0.0)
        e.engine.reports["tasks"] = lambda: {"policy_timer": {"running": True, "failures": 2, "last_error": "boom",
                                                              "last_failure_at": 1.0, "restart_at": None},
                                             "sessions": {"running": True, "failures": 0, "last_error": None,
                                                          "last_failure_at": None, "restart_at": None}}
        status = e.queries.status()
    finally:
        await e.close()
    monkeypatch.setattr(cli, "_ask", lambda *args, **kw: json.loads(json.dumps(status)))
    assert cli.cmd_status(cli.argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "STATE QUARANTINED" in out and ".corrupt-" in out, out
    assert "task policy_timer FAILED 2 time(s) since the start, last at 1970-01-01T00:00:01Z: boom; running again" \
        in out, out
    assert "sessions FAILED" not in out
    assert "C-6: wanted walled-garden; 100.64.3.0/30 covers 100.64.3.3/32, held by subscriber C-5" in out, out


def _serve(body: str, status: int = 200) -> tuple[str, Any]:
    """A list served on loopback by a thread: (url, server to shut down)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/restricted.csv", server


@pytest.mark.parametrize(("body", "status", "exit_code", "needle"), [
    ("id,addresses\nC-1,100.64.0.10\nC-2,100.64.0.11\n", 200, 0, "2 restricted subscriber(s) listed"),
    ("id,addresses\nC-1,100.64.0.10\nC-2,100.64.0.10\n", 200, 1, "restricted.csv:3"),
    ("id,addresses\nC-1,192.0.2.10\n", 200, 1, "restricted.csv:2"),
    ("gone", 404, 1, "HTTP 404"),
])
def test_check_config_fetches_a_url_source_once_and_validates_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, status: int, exit_code: int,
        needle: str) -> None:
    """SPEC 1: check-config validates the subscriber list, a URL source's too (as the daemon
    would fetch it: its timeout and credentials)."""
    url, server = _serve(body, status)
    try:
        config = _setup(tmp_path, "gateway: {subscriber_prefixes: [100.64.0.0/10]}\n")
        config.write_text(config.read_text().replace("source: list.yaml", f"source: {url}\n  timeout: 5s"))
        assert main(["check-config", "--config", str(config)]) == exit_code
        out = capsys.readouterr()
        assert needle in out.out + out.err
        if exit_code:
            assert "subscribers.source" in out.err
    finally:
        server.shutdown()
