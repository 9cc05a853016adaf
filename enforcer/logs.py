"""Log lines for journald: one line per event on stdout, ``key=value``, nothing multi-line.

journald adds the time, the unit and the priority is carried by ``level=``; a traceback is
folded into the same line (``\\n`` escaped) so one event never becomes several journal entries.
"""

from __future__ import annotations

import logging
import sys


class OneLineFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("level=%(levelname)s logger=%(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # appends exc_info / stack_info after a newline
        return text.replace("\r", "\\r").replace("\n", "\\n")


def setup_logging(level: int = logging.INFO) -> None:
    """Root logger → stdout, one line per event."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # no per-request lines, ever
