"""Log lines for journald and log shippers: one line per event, clean logfmt, with a priority.

Every line is ``level=... logger=... key=value ... [msg="..."] [traceback="..."]``:

- **logfmt**: a value with a space, ``=``, ``"``, ``\\`` or a control character is quoted
  (``key="a b"``, ``"`` and ``\\`` escaped, newlines as ``\\n``), so one event is always one line
  and any logfmt parser (Loki, Vector, ``hl``, ``lnav``) reads it back.
- **Existing calls stay as they are**: ``LogfmtFormatter`` re-renders a record from its template
  (``"event=x error=%r retry_in=%.0fs (prose)"``) and arguments, not from the finished string: each
  ``key=<template>`` becomes a field whose value is formatted and quoted, ``%r`` gives the value's
  text (``str``), not a Python repr, and prose (trailing ``(...)`` or a message that is not
  ``key=value`` at all, as third-party libraries log) becomes one ``msg="..."`` field.
- **journald priority**: when stdout is the journal (systemd sets ``JOURNAL_STREAM`` to the
  device and inode of the stream it connected), each line starts with the sd-daemon prefix
  ``<N>`` (``<3>`` error, ``<4>`` warning, ``<6>`` info, ...) that journald strips and stores as
  ``PRIORITY`` (systemd.exec(5), ``SyslogLevelPrefix=``, on by default): ``journalctl -p warning``
  then shows warnings and worse. Elsewhere (a terminal, a pipe, a test) no prefix is written.

``level=`` stays in the line too: ``journalctl -o cat`` and shippers that drop ``PRIORITY`` keep it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

#: sd-daemon(3) priorities (syslog's): a Python level maps to the nearest at or above it.
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7

_CONVERSION = re.compile(r"%(?P<spec>[#0\- +]*(?:\d+)?(?:\.\d+)?[hlL]?)(?P<type>[diouxXeEfFgGcrsa%])")
_UNSUPPORTED = re.compile(r"%(?:\(|[#0\- +]*\*|[#0\- +]*\d*\.\*)")   # %(name)s and * widths: no re-render
_FIELD = re.compile(r"\s*(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>\S*)")
#: What a ``%s`` argument may append to a value's template: whole ``key=value`` fields of its own
#: (``"event=x%s", " suppressed=3"``), split off rather than glued into the value.
_NEEDS_QUOTES = re.compile(r'[\s="\\\x00-\x1f\x7f]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def priority(levelno: int) -> int:
    """The sd-daemon priority of a Python log level."""
    for level, value in PRIORITIES:
        if levelno >= level:
            return value
    return DEBUG_PRIORITY


def quote(value: str) -> str:
    """A logfmt value: bare when it can be, else in double quotes with ``"``, ``\\`` and controls escaped."""
    if value and not _NEEDS_QUOTES.search(value):
        return value
    out = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                  for c in value)
    return f'"{out}"'


@dataclass(frozen=True)
class _Template:
    """A log call's format string, split once: ``fields`` (key, value template, conversions used)
    and the prose left over (its template and conversions), or ``None`` when it cannot be split."""

    fields: tuple[tuple[str, str, int], ...]
    prose: str
    prose_args: int


def _conversions(template: str) -> int:
    return sum(1 for m in _CONVERSION.finditer(template) if m.group("type") != "%")


@functools.lru_cache(maxsize=1024)
def _parse(template: str) -> _Template | None:
    if _UNSUPPORTED.search(template):
        return None
    fields, at = [], 0
    while (match := _FIELD.match(template, at)) is not None:
        fields.append((match.group("key"), match.group("value"), _conversions(match.group("value"))))
        at = match.end()
    prose = template[at:].strip()
    if prose.startswith("(") and prose.endswith(")") and prose.count("(") == 1:
        prose = prose[1:-1].strip()   # the "(what it means)" tail most calls end with
    return _Template(tuple(fields), prose, _conversions(prose))


def _text(value: Any) -> str:
    """A value as a field's text: ``str``, but an exception with no text of its own
    (``TimeoutError()``, ``ConnectionResetError()``) by its type, so the line still says what failed."""
    text = str(value)
    if not text and isinstance(value, BaseException):
        return type(value).__name__
    return text


def _render(template: str, args: Sequence[Any], literal: bool = False) -> str:
    """``template % args`` with ``%r`` giving text, not a repr (``_text``). A value's text never
    becomes fields of its own, whatever it holds: it is quoted as one value.
    ``literal``: a record without arguments, whose message Python does not %-format either."""
    if literal:
        return template
    out, at, index = [], 0, 0
    for match in _CONVERSION.finditer(template):
        out.append(template[at:match.start()])
        at = match.end()
        kind = match.group("type")
        if kind == "%":
            out.append("%")
            continue
        value = args[index]
        index += 1
        out.append(_text(value) if kind in "rsa" else f"%{match.group('spec')}{kind}" % (value,))
    out.append(template[at:])
    return "".join(out)


def logfmt_fields(record: logging.LogRecord) -> list[tuple[str, str]]:
    """The record's own fields, in order (``msg`` last), from its template and arguments.

    A record whose template cannot be split (``%(name)s``, a dict of args, arguments that do not
    fit) keeps its whole message as ``msg``, as Python would have rendered it.
    """
    template = record.msg if isinstance(record.msg, str) else str(record.msg)
    args: Sequence[Any] = record.args if isinstance(record.args, tuple) else ()
    parsed = _parse(template) if isinstance(record.args, tuple) or not record.args else None
    literal = not record.args
    if parsed is not None and (literal or sum(n for _, _, n in parsed.fields) + parsed.prose_args == len(args)):
        try:
            fields: list[tuple[str, str]] = []
            used = 0
            for key, value, count in parsed.fields:
                fields.append((key, _render(value, args[used:used + count], literal)))
                used += count
            if parsed.prose:
                fields.append(("msg", _render(parsed.prose, args[used:], literal)))
            return fields
        except (TypeError, ValueError, IndexError):
            pass   # arguments that do not fit their conversions: say it as Python would
    try:
        return [("msg", record.getMessage())]
    except (TypeError, ValueError, KeyError):   # a broken call: keep what it said rather than lose the line
        return [("msg", template), ("args", str(record.args))]


class LogfmtFormatter(logging.Formatter):
    """``level=... logger=...`` then the record's fields (``logfmt_fields``), exception and stack
    as quoted ``traceback=``/``stack=`` fields; optionally the journald ``<N>`` priority prefix."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        parts = [("level", record.levelname), ("logger", record.name), *logfmt_fields(record)]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(("traceback", record.exc_text))
        if record.stack_info:
            parts.append(("stack", self.formatStack(record.stack_info)))
        line = " ".join(f"{key}={quote(value)}" for key, value in parts)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


#: The name earlier code and tests know it by.
OneLineFormatter = LogfmtFormatter


def stream_is_journal(stream: IO[str], environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:inode``).

    Compared with the stream's own device and inode, as systemd.exec(5) asks: a child that
    inherited the variable but writes elsewhere (a pipe, a file) gets no prefixes.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(inode) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):   # no fileno (pytest's capture), a bad variable
        return False


def setup_logging(level: int = logging.INFO) -> None:
    """Root logger → stdout, one logfmt line per event, journald priorities when stdout is the journal."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogfmtFormatter(journal=stream_is_journal(sys.stdout)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # no per-request lines, ever
