"""One log line per event, in clean logfmt, with a journald priority when stdout is the journal:
a traceback is folded into the line it belongs to, values are quoted (never Python reprs), prose
goes into ``msg``, so journald, ``journalctl -p warning`` and log shippers read every line right."""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from enforcer import logs
from enforcer.logs import LogfmtFormatter, OneLineFormatter, quote, stream_is_journal

ROOT = Path(__file__).resolve().parents[2]
PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.\-]*)=("(?:[^"\\]|\\.)*"|[^\s"=]*)')


def parse(line: str) -> list[tuple[str, str]]:
    """A strict logfmt reader: ``key=value`` pairs separated by one space, quoted values unescaped."""
    pairs, at = [], 0
    while at < len(line):
        match = PAIR.match(line, at)
        assert match, f"not logfmt at {at}: {line[at:]!r} in {line!r}"
        key, value = match.groups()
        if value.startswith('"'):
            value = re.sub(r'\\(u[0-9a-f]{4}|.)', lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(
                m.group(1), chr(int(m.group(1)[1:], 16)) if m.group(1).startswith("u") else m.group(1)), value[1:-1])
        pairs.append((key, value))
        at = match.end()
        if at < len(line):
            assert line[at] == " ", f"no space after {key}= in {line!r}"
            at += 1
    return pairs


def record(msg: str, *args: Any, level: int = logging.WARNING, exc: Any = None) -> logging.LogRecord:
    return logging.LogRecord("walled_garden.x", level, __file__, 1, msg, args, exc)


def fields(msg: str, *args: Any, **kwargs: Any) -> dict[str, str]:
    return dict(parse(LogfmtFormatter().format(record(msg, *args, **kwargs))))


def test_a_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        rec = record("event=boom id=%s", "7", level=logging.ERROR, exc=sys.exc_info())
    line = OneLineFormatter().format(rec)
    assert "\n" not in line and line.startswith("level=ERROR logger=walled_garden.x event=boom id=7 ")
    parsed = dict(parse(line))
    assert parsed["traceback"].startswith("Traceback") and "ValueError: first\nsecond" in parsed["traceback"]


def test_values_are_quoted_and_escaped_as_logfmt_not_python_reprs() -> None:
    out = fields("event=reload_problem problem=%r path=%s n=%d", 'allow[0]: "x" is \\ bad\nnext', "/etc/a b", 3)
    assert out == {"level": "WARNING", "logger": "walled_garden.x", "event": "reload_problem",
                   "problem": 'allow[0]: "x" is \\ bad\nnext', "path": "/etc/a b", "n": "3"}
    line = LogfmtFormatter().format(record("event=x error=%r", "it's gone"))
    assert line.endswith(" error=\"it's gone\""), "%r gives the text, not 'it\\'s gone'"
    assert LogfmtFormatter().format(record("event=x error=%r", ValueError("bad"))).endswith(" error=bad")
    assert quote("") == '""' and quote("a=b") == '"a=b"' and quote("tab\t\x01") == '"tab\\t\\u0001"'
    assert quote("čeština") == "čeština", "UTF-8 stays as it is"


def test_prose_becomes_a_msg_field() -> None:
    out = fields("event=webhook_rejected peer=%s why=%r held_back=%d (at most one line per %.0fs; counted)",
                 "192.0.2.1", "bad signature", 2, 10.0)
    assert out["why"] == "bad signature" and out["held_back"] == "2"
    assert out["msg"] == "at most one line per 10s; counted"
    assert fields("DNS forwarder: answer to %s not sent: %s", "192.0.2.7", OSError("gone")) == {
        "level": "WARNING", "logger": "walled_garden.x", "msg": "DNS forwarder: answer to 192.0.2.7 not sent: gone"}
    assert fields("100%% sure")["msg"] == "100%% sure", "without arguments a message is not %-formatted"
    assert fields("event=x pct=%d%%", 5)["pct"] == "5%"


def test_a_value_never_becomes_fields_of_its_own() -> None:
    """Whatever a value holds (a peer's text), it is one quoted value: no forged fields."""
    assert fields("event=x peer=%s:%s", "192.0.2.1", " level=CRITICAL forged=1") == {
        "level": "WARNING", "logger": "walled_garden.x", "event": "x", "peer": "192.0.2.1: level=CRITICAL forged=1"}
    assert fields("event=x detail=%s", "a b=c")["detail"] == "a b=c", "a value with spaces is one value"


def test_an_exception_without_text_is_named_by_its_type() -> None:
    assert fields("event=x error=%r", TimeoutError())["error"] == "TimeoutError"
    assert fields("event=x error=%s", ConnectionResetError())["error"] == "ConnectionResetError"
    assert fields("event=x error=%r", OSError(2, "No such file"))["error"] == "[Errno 2] No such file"


def test_calls_that_do_not_fit_keep_what_they_said() -> None:
    assert fields("%(a)s and %(b)s", {"a": 1, "b": 2})["msg"] == "1 and 2"
    assert fields("event=x a=%s", 1, 2) == {"level": "WARNING", "logger": "walled_garden.x",
                                            "msg": "event=x a=%s", "args": "(1, 2)"}


@pytest.mark.parametrize(("level", "prefix"), [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"),
                                               (logging.WARNING, "<4>"), (logging.INFO, "<6>"),
                                               (logging.DEBUG, "<7>"), (5, "<7>")])
def test_journal_lines_start_with_the_sd_daemon_priority(level: int, prefix: str) -> None:
    line = LogfmtFormatter(journal=True).format(record("event=x", level=level))
    assert line.startswith(prefix + "level=") and line.count("<") == 1
    assert not LogfmtFormatter().format(record("event=x", level=level)).startswith("<")


def test_the_journal_is_recognised_by_the_streams_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "out").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(other, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}), "inherited, elsewhere"
        assert not stream_is_journal(stream, {})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"}), "no file descriptor"


def test_setup_logging_prefixes_priorities_only_on_the_journal(tmp_path: Path, monkeypatch: Any) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with (tmp_path / "journal").open("w+") as stream:
            st = os.fstat(stream.fileno())
            monkeypatch.setattr(sys, "stdout", stream)
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
            logs.setup_logging()
            logging.getLogger("walled_garden.t").warning("event=disk_full path=%s", "/var/lib/x y")
            monkeypatch.setenv("JOURNAL_STREAM", "0:0")
            logs.setup_logging()
            logging.getLogger("walled_garden.t").info("event=plain")
            stream.seek(0)
            lines = stream.read().splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert lines == ['<4>level=WARNING logger=walled_garden.t event=disk_full path="/var/lib/x y"',
                     "level=INFO logger=walled_garden.t event=plain"]


# --- every log call in the code renders as clean logfmt ---------------------------------------

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
SAMPLE = {"d": 12, "i": 12, "f": 1.5, "g": 1.5, "s": "two words", "r": "it's \"x\"\n", "x": 255}


def log_calls() -> list[tuple[str, str]]:
    """(file:line, format string) of every ``log.<level>("...", ...)`` in enforcer/ and captive_portal/."""
    out = []
    for path in sorted([*ROOT.glob("enforcer/**/*.py"), *ROOT.glob("captive_portal/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                    and isinstance(node.func.value, ast.Name) and "log" in node.func.value.id.lower()
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                out.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.args[0].value))
    return out


def test_every_log_call_renders_as_logfmt() -> None:
    calls = log_calls()
    assert len(calls) > 100
    for where, template in calls:
        kinds = re.findall(r"%[#0\- +]*\d*(?:\.\d+)?([diouxXeEfFgGcrsa%])", template)
        args = tuple(SAMPLE.get(kind, 1) for kind in kinds if kind != "%")
        line = LogfmtFormatter(journal=True).format(record(template, *args))
        assert "\n" not in line and line.startswith("<4>level=WARNING "), where
        parsed = dict(parse(line[3:]))
        if template.startswith("event="):
            assert "event" in parsed and "args" not in parsed, f"{where}: {line}"
