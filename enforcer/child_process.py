"""Keeping a child process the daemon depends on running: the webhook worker, the DNS forwarder.

Each is started, served and reaped by its own bridge (``webhook_worker.WorkerBridge``,
``dns_garden.bridge.ForwarderBridge``: one run of the child is their ``run_once``); what they
share is what happens when the child ends while the daemon is not stopping: it is logged by the
bridge (``exited``) and started again after 1 s, doubling to 30 s while it keeps dying, back to
1 s once a run has lasted a healthy minute, so a child that cannot start neither spins nor is
given up on.

Such an end is a failure of the task that runs the child (SPEC §8: no background task dies
silently), although the task itself goes on: it is counted in
``walled_garden_task_failures_total{task}`` and shown by ``status`` under the task's name
(``supervisor.report_failure``), with what ``exited`` says happened. An end the daemon asked for
(the stop event: shutdown; a cancelled task: a reload that replaces or drops the child) is none.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from .supervisor import report_failure, report_running

#: First wait before a child that ended is started again; doubles per quick exit up to the most.
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
#: A run this long was healthy: the next exit waits ``RESTART_FIRST`` again.
HEALTHY_AFTER = 60.0


def describe_exit(code: int | None) -> str:
    """A child's exit code as an operator reads it: ``killed by SIGKILL`` rather than ``-9``."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


async def keep_running(run_once: Callable[[], Awaitable[int | None]], stop: asyncio.Event,
                       exited: Callable[[int | None, float], str]) -> None:
    """Run ``run_once`` (one life of the child, returning its exit code) again and again until
    ``stop``; after each unasked end, ``exited(code, seconds until the restart)`` logs it and
    returns what happened, one line, which the supervisor records as the task's failure."""
    delay = 0.0   # no exit yet: the first waits RESTART_FIRST
    while not stop.is_set():
        started = time.monotonic()
        report_running()
        code = await run_once()
        if stop.is_set():
            return
        healthy = time.monotonic() - started > HEALTHY_AFTER
        delay = RESTART_FIRST if healthy or not delay else min(delay * 2, RESTART_MAX)
        report_failure(exited(code, delay), delay)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
