"""Findings of an operator/CLI audit against SPEC §1 and §2, each against a real daemon on a
real control socket where the daemon is involved:

- a config edit the daemon refused at SIGHUP must not lock operators out of the running daemon;
- check-config names the key (and line) of a file it cannot use, not only the file;
- ``audit --since DATE`` starts at the start of that day; spans (``1h``) are accepted;
- ``explain`` takes a prefix as the list writes it;
- ``state_dir`` that cannot be a directory is named, never a traceback;
- a closed pipe (``status | head -1``) is quiet; approve/reject answer in sentences; a lift of
  someone never restricted says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import enforcer.cli as cli
from daemon_helpers import NoConntrack
from enforcer.api.control import control_app
from enforcer.api.listeners import start_unix_site
from enforcer.cli import main
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
REPO = Path(__file__).resolve().parents[2]


async def run_cli(*argv: str) -> tuple[int, str, str]:
    """The (blocking) CLI in a thread, so the daemon on this loop can answer: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        return main(list(argv))

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


def _subs(n: int, start: int = 1) -> list[Subscriber]:
    return [Subscriber(f"C-{i}", (parse_address(f"100.64.{i // 250}.{i % 250 + 1}"),), reason="overdue")
            for i in range(start, start + n)]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Enforcer, Path]]:
    """A daemon with C-11 (an address and an IPv6 prefix) listed, its control socket on disk,
    and the config file it was started with (``config.yaml``)."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"state_dir: {tmp_path}/state\nsubscribers:\n  source: {tmp_path}/l.yaml\n"
                           f"api: {{socket: {tmp_path}/control.sock}}\n")
    config = parse_config(config_path.read_text(), str(config_path))
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    await enforcer.lists.on_list(ListUpdate([Subscriber("C-11", (parse_address("100.64.0.11"),
                                                                 parse_address("2001:db8:10:100::/56")),
                                                        reason="overdue")], "l.yaml", "1"))
    runner = await start_unix_site(control_app(enforcer), config.api.socket)
    try:
        yield enforcer, config_path
    finally:
        await runner.cleanup()
        await enforcer.close()


# -- 1. a bad edit the daemon refused does not lock operators out -------------------------------

async def test_operator_commands_reach_the_daemon_while_the_config_has_a_typo(daemon: Any) -> None:
    """The file gets a typo'd key after the daemon started (SIGHUP would refuse it and keep the
    running config): every command that only talks to the daemon still works, with a one-line
    warning; ``run``, ``render`` and ``check-config`` stay strict."""
    _, config = daemon
    config.write_text(config.read_text().replace("  source:", "  poll_intervall: 30\n  source:"))
    for argv, needle in ((["status"], "walled-garden=1"),
                         (["explain", "C-11"], "C-11 ["),
                         (["lift", "C-11", "--reason", "paid at the counter"], "C-11: now free"),
                         (["restrict", "C-11"], "C-11: now walled-garden"),
                         (["exempt", "C-11", "--category", "dispute", "--until", "2d"], "C-11: now free"),
                         (["unexempt", "C-11"], "C-11: now walled-garden"),
                         (["audit", "C-11"], "C-11"),
                         (["status", "--json"], '"modes"')):
        code, out, err = await run_cli(*argv, "--config", str(config))
        assert code == 0, (argv, out, err)
        assert needle in out, (argv, out)
        warning = [line for line in err.splitlines() if line]
        assert warning == [f"walled-garden: warning: the config file {config} currently has 1 error(s) "
                           f"(walled-garden check-config names them); asking the daemon on "
                           f"{config.parent}/control.sock"], (argv, err)
    code, _, err = await run_cli("approve", "--config", str(config))
    assert code == 1 and "no change is held" in err, "the exit code is the daemon's answer"
    code, _, err = await run_cli("fleet", "status", "--config", str(config))
    assert code == 1 and "fleet is not configured" in err
    for strict in (["check-config"], ["render"]):
        code, _, err = await run_cli(*strict, "--config", str(config))
        assert code == 1 and "subscribers.poll_intervall" in err, strict


def test_run_stays_strict_about_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.service

    monkeypatch.setattr(enforcer.service, "run", lambda config: pytest.fail("the daemon must not start"))
    (tmp_path / "c.yaml").write_text(f"state_dir: {tmp_path}/s\nsubscribers: {{source: l.yaml, poll_intervall: 3}}\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 1
    assert "invalid configuration" in capsys.readouterr().err


@pytest.mark.parametrize("api", ["api: {socket: 7}\n", "api: [1]\n", "api: {sokcet: /x}\n"])
def test_a_socket_key_that_does_not_read_as_a_path_means_the_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], api: str) -> None:
    (tmp_path / "c.yaml").write_text(f"state_dir: {tmp_path}/s\nsubscribers: {{source: l.yaml}}\n{api}")
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"))
    assert cli._control_socket(args) == "/run/walled-garden/control.sock"
    assert cli._control_socket(args) == "/run/walled-garden/control.sock"
    err = capsys.readouterr().err
    assert err.count("warning: the config file") == 1, "warned once per command"


def test_a_config_file_that_is_not_yaml_still_lets_commands_ask_the_default_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text("api: {socket: [\n")
    assert cli._control_socket(argparse.Namespace(config=str(tmp_path / "c.yaml"))) == \
        "/run/walled-garden/control.sock"
    assert "currently has 1 error(s)" in capsys.readouterr().err


def test_a_good_config_gives_its_socket_without_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(f"state_dir: {tmp_path}/s\nsubscribers: {{source: l.yaml}}\n"
                                     f"api: {{socket: {tmp_path}/c.sock}}\n")
    assert cli._control_socket(argparse.Namespace(config=str(tmp_path / "c.yaml"))) == f"{tmp_path}/c.sock"
    assert capsys.readouterr().err == ""


# -- 2. check-config names the key of a file it cannot use --------------------------------------

def _setup(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "secret").chmod(0o600)
    (tmp_path / "list.yaml").write_text("subscribers:\n  - {id: C-1, addresses: [100.64.0.10]}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path}/state\nsubscribers:\n  source: list.yaml\n"
                      f"api:\n  webhook_secret_file: {tmp_path}/secret\n"
                      f"gateway: {{subscriber_prefixes: ['100.64.0.0/10']}}\n{extra}")
    return config


@pytest.mark.parametrize("content, words", [
    (None, "cannot read webhook secret"),
    ("not-a-secret\n", "must look like whsec_"),
    ("whsec_abcde\n", "not base64"),
    ("whsec_" + base64.b64encode(b"short").decode() + "\n", "too short"),
])
def test_check_config_names_the_key_and_line_of_a_webhook_secret_it_cannot_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, words: str) -> None:
    config = _setup(tmp_path)
    if content is None:
        (tmp_path / "secret").unlink()
    else:
        (tmp_path / "secret").write_text(content)
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"  api.webhook_secret_file ({config}:5): {tmp_path}/secret: " in err and words in err, err


def test_check_config_names_the_key_of_a_promise_secret_it_cannot_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path, "policy:\n  promise_to_pay:\n    webhook_url: https://billing.example/h\n"
                              f"    webhook_secret_file: {tmp_path}/absent\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"  policy.promise_to_pay.webhook_secret_file ({config}:10): {tmp_path}/absent: cannot read" in err


def test_check_config_names_the_key_and_line_of_a_list_file_it_cannot_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path)
    (tmp_path / "list.yaml").unlink()
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"  subscribers.source ({config}:3): {tmp_path}/list.yaml: cannot read the subscriber list: " in err
    assert main(["render", "--config", str(config)]) == 1
    assert f"subscribers.source ({config}:3): {tmp_path}/list.yaml: cannot read" in capsys.readouterr().err


def test_check_config_names_the_key_and_line_of_a_radius_secret_others_may_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    radius = tmp_path / "radius.secret"
    radius.write_text("s3cret\n")
    radius.chmod(0o644)
    config = _setup(tmp_path)
    config.write_text(config.read_text().replace(
        "  source: list.yaml\n", "  source: list.yaml\n  sessions:\n"
        f"    - {{kind: radius, listen: '127.0.0.1:1813', secret_file: {radius}, clients: [127.0.0.1]}}\n"))
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"  subscribers.sessions[0].secret_file ({config}:5): {radius}: mode 0644 lets other users read or " \
           "change the RADIUS secret" in err, err
    radius.unlink()
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"subscribers.sessions[0].secret_file ({config}:5): {radius}: not a readable file" in err, err


# -- 3. audit --since ---------------------------------------------------------------------------

NOW = datetime(2026, 12, 1, 15, 30, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("given, instant", [
    ("2026-12-01", "2026-12-01T00:00:00Z"),
    ("2026-12-01T08:00:00Z", "2026-12-01T08:00:00Z"),
    ("2026-12-01T08:00:00+01:00", "2026-12-01T07:00:00Z"),
    ("2026-12-01T08:00", "2026-12-01T08:00:00Z"),
    ("1h", "2026-12-01T14:30:00Z"),
    ("30m", "2026-12-01T15:00:00Z"),
    ("2d", "2026-11-29T15:30:00Z"),
    ("1w", "2026-11-24T15:30:00Z"),
    ("90s", "2026-12-01T15:28:30Z"),
])
def test_since_reads_a_date_as_its_start_a_time_as_given_and_a_span_back_from_now(given: str, instant: str) -> None:
    assert cli.since_argument(given, NOW) == cli.Since(given, instant)


@pytest.mark.parametrize("argv", [["--since", "yesterday"], ["--since", "1y"], ["--since", "2026-13-01"],
                                  ["--since", "99999999w"], ["--limit", "0"], ["--limit", "-5"], ["--limit", "x"]])
def test_audit_refuses_a_bad_since_or_limit_as_a_usage_error(argv: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["audit", *argv])
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


async def test_audit_since_today_and_since_an_hour_include_what_happened_today(daemon: Any) -> None:
    """The daemon reads a bare date as the *end* of that day (an exemption's meaning): sent as
    it was typed, ``--since <today>`` missed everything that happened today."""
    _, config = daemon
    code, _, _ = await run_cli("lift", "C-11", "--config", str(config), "--reason", "audit me")
    assert code == 0
    today = datetime.now(UTC).date()
    for since in (today.isoformat(), "1h", "30m"):
        code, out, err = await run_cli("audit", "C-11", "--since", since, "--config", str(config))
        assert code == 0 and "audit me" in out, (since, out, err)
    tomorrow = (today + timedelta(days=1)).isoformat()
    code, out, _ = await run_cli("audit", "C-11", "--since", tomorrow, "--config", str(config))
    assert code == 0 and out == f"no audit entries for C-11 since {tomorrow} ({tomorrow}T00:00:00Z)\n"


# -- 4. explain takes a prefix as the list writes it -------------------------------------------

@pytest.mark.parametrize("query", ["100.64.0.11/32", "2001:db8:10:100::/56", "2001:db8:10:100::/64",
                                   " 100.64.0.11 "])
async def test_explain_a_prefix_copied_from_the_list(daemon: Any, query: str) -> None:
    _, config = daemon
    code, out, err = await run_cli("explain", query, "--config", str(config))
    assert code == 0 and out.startswith("C-11 [") and "RESTRICTED (walled-garden)" in out, (out, err)


async def test_explain_a_prefix_no_one_holds_says_so_with_the_query_as_typed(daemon: Any) -> None:
    _, config = daemon
    code, out, _ = await run_cli("explain", "100.64.9.0/24", "--config", str(config))
    assert code == 0 and out == "100.64.9.0/24: not restricted (no restricted subscriber holds this address)\n"



# -- 5. a state_dir that cannot be a directory -------------------------------------------------

def test_check_config_and_run_name_a_state_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.service

    monkeypatch.setattr(enforcer.service, "run", lambda config: pytest.fail("the daemon must not start"))
    config = _setup(tmp_path)
    (tmp_path / "state").write_text("oops\n")
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"  state_dir ({config}:1): {tmp_path}/state: exists and is not a directory" in err
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"state_dir ({config}:1): {tmp_path}/state: exists and is not a directory" in err
    assert "Traceback" not in err and "FileExistsError" not in err


def test_run_names_a_state_dir_it_cannot_create(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory the start cannot make (here: /proc refuses; elsewhere a read-only file system
    or a directory the daemon may not write): one line naming state_dir, exit 1."""
    import enforcer.service

    monkeypatch.setattr(enforcer.service, "run", lambda config: pytest.fail("the daemon must not start"))
    config = _setup(tmp_path)
    config.write_text(config.read_text().replace(f"state_dir: {tmp_path}/state", "state_dir: /proc/wg-test-state"))
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"walled-garden: state_dir ({config}:1): /proc/wg-test-state: cannot create the state "
                          "directory: ") and err.count("\n") == 1, err


# -- 8. a closed pipe, approve/reject sentences, a lift of someone free ------------------------

def test_render_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    import subprocess

    config = _setup(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "enforcer.cli", "render", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()   # as `| head -1` does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == cli.BROKEN_PIPE
    assert err == "", err


async def test_status_piped_into_head_is_quiet(daemon: Any) -> None:
    _, config = daemon
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer.cli", "status", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.stdout is not None and proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert first.startswith(b"restricted: ")
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]  # head exits after one line
    err = await asyncio.wait_for(proc.stderr.read(), 60)
    code = await asyncio.wait_for(proc.wait(), 60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err and err == b"", err
    assert code in (0, cli.BROKEN_PIPE)


async def test_approve_and_reject_answer_in_a_sentence(daemon: Any) -> None:
    enforcer, config = daemon
    await enforcer.lists.on_list(ListUpdate(_subs(520, start=100), "l.yaml", "2"))   # held: too many at once
    code, out, err = await run_cli("approve", "--config", str(config), "--reason", "checked with billing")
    assert code == 0, err
    assert out == "approved: the held list from l.yaml is now in force; it restricted 520 and lifted 1 " \
                  "subscriber(s)\n", out
    await enforcer.lists.on_list(ListUpdate([], "l.yaml", "3"))
    code, out, err = await run_cli("reject", "--config", str(config), "--reason", "export bug")
    assert code == 0, err
    assert out == "rejected: the held list from l.yaml is dropped; the list in force stays; a new export is " \
                  "evaluated again\n", out


def test_verdict_text_for_a_list_this_gateway_does_not_hold() -> None:
    note = "this gateway does not hold that list; the verdict applies when it reads it"
    assert cli.verdict_text({"approved": True, "digest": "ab", "note": note}) == f"approved: {note}"
    rejected = cli.verdict_text({"rejected": True, "digest": "ab", "note": note})
    assert rejected == f"rejected: the held list is dropped; {note}"


async def test_lift_of_someone_never_restricted_says_so(daemon: Any) -> None:
    _, config = daemon
    code, out, err = await run_cli("lift", "C-404", "--config", str(config))
    assert code == 0, err
    assert out.startswith("C-404: was not restricted (not a subscriber id, address or reference code this gateway "
                          "knows); nothing to lift"), out
    code, out, _ = await run_cli("lift", "C-11", "--config", str(config))
    assert code == 0 and out.startswith("C-11: now free (operator "), out
    code, out, _ = await run_cli("lift", "C-11", "--config", str(config))
    assert code == 0 and out.startswith("C-11: was not restricted (operator "), "lifted already: free"


def test_a_daemon_answer_that_says_what_was_before_wins() -> None:
    assert cli._was_restricted({"found": False}, {"was": "walled-garden"}) == (True, "it was free")
    assert cli._was_restricted({"found": True, "restricted": True}, {"was": "free"}) == (False, "it was free")
    assert cli._was_restricted(None, {"mode": "free"}) == (True, "")
