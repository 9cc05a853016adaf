"""One log line per event: a traceback is folded into the line it belongs to, so journald and
log shippers never split one event into many."""

from __future__ import annotations

import logging

from enforcer.logs import OneLineFormatter


def test_a_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        import sys
        record = logging.LogRecord("walled_garden.x", logging.ERROR, __file__, 1, "event=boom id=%s", ("7",),
                                   sys.exc_info())
    line = OneLineFormatter().format(record)
    assert "\n" not in line and line.startswith("level=ERROR logger=walled_garden.x event=boom id=7")
    assert "Traceback" in line and "ValueError" in line
