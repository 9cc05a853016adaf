"""What the daemon-level unit tests share: a conntrack that does nothing, and the CLI run
in a thread so the daemon on the test's event loop can answer it."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

from enforcer.cli import main


class NoConntrack:
    """No kernel here: every flush succeeds and finds nothing."""

    async def flush(self, networks: Any, keep_mark: int = 0) -> int:
        return 0


async def cli(*argv: str) -> tuple[int, str]:
    """Run the (blocking) CLI in a thread; returns its exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await asyncio.to_thread(main, list(argv))
    return code, out.getvalue()
