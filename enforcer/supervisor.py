"""One supervisor for the enforcer's long-running tasks: no silent deaths (docs/reference.md, Safety rules 5).

The list source, the timers, the table check, the outbox, the webhook worker bridge, the
garden hostname resolver and the metrics listener each run forever until the daemon stops.
A task that ends any other way would silently stop graces expiring, lists being read or the
table being repaired, so each runs here under its name and:

- an unexpected exception is logged with its traceback (``event=task_failed``), counted in
  ``walled_garden_task_failures_total{task}``, shown by ``status`` (``Supervisor.status``), and
  the task is started again from its factory after a backoff (1 s, doubling to 60 s; back to
  1 s once a run has lasted a healthy minute), so a fault that repeats neither spins nor stops
  the task for good;
- a task that *returns* while the daemon is not stopping is the same failure (it must not end);
- cancellation (a reload replacing the task, shutdown) and the stop event end a task normally,
  counting nothing;
- a task that recovers from a failure itself without ending (``child_process.keep_running``: the
  webhook worker or the DNS forwarder process died, or hung and was killed, and is started again)
  reports it with ``report_failure``: counted and shown the same way under the task's name, so a
  child that keeps dying is as visible as a task that keeps failing (SPEC §8).

A task is given as a factory (a function returning a new coroutine), since a coroutine can
run only once and a restart needs a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the webhook worker process loads this module (child_process) but no metrics
    from prometheus_client import Counter

log = logging.getLogger("walled_garden.supervisor")

Factory = Callable[[], Awaitable[Any]]

#: First wait before a failed task is started again; doubles per failure up to ``MAX_DELAY``.
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
#: A run this long counts as healthy: the next failure waits ``FIRST_DELAY`` again.
HEALTHY_AFTER = 60.0


@dataclass
class TaskState:
    """What ``status`` shows of one task."""

    running: bool = False
    failures: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    restart_at: float | None = None     # wall-clock instant of the next start after a failure

    def to_json(self) -> dict[str, Any]:
        return {"running": self.running, "failures": self.failures, "last_error": self.last_error,
                "last_failure_at": self.last_failure_at, "restart_at": self.restart_at}


#: The supervised task the running coroutine belongs to (set by ``Supervisor._supervise`` in its
#: own task's context, so code several calls down, e.g. a child process's bridge, can report a
#: failure under the task's name without being handed the supervisor).
_current: ContextVar[tuple[Supervisor, str, TaskState] | None] = ContextVar("walled_garden_supervised_task",
                                                                            default=None)


def report_failure(error: str, restart_in: float) -> str | None:
    """Record a failure the running task recovered from itself (it restarts a child process in
    ``restart_in`` s): counted in ``walled_garden_task_failures_total{task}`` and shown by
    ``status`` (failures, last error and when, not running until ``report_running``), as a
    failure of the task would be. The caller has logged it with its own event. Returns the task's
    name; None outside a supervised task (a test driving a bridge by hand)."""
    current = _current.get()
    if current is None:
        return None
    supervisor, name, state = current
    supervisor._record(name, state, error, restart_in)
    state.running = False
    return name


def report_running() -> None:
    """The running task's work runs again after a ``report_failure`` (its child was restarted)."""
    current = _current.get()
    if current is not None:
        current[2].running, current[2].restart_at = True, None


class Supervisor:
    """Named tasks started from factories, restarted with backoff when they fail."""

    def __init__(self, stop: asyncio.Event, failures: Counter | None = None, *,
                 first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY,
                 healthy_after: float = HEALTHY_AFTER, clock: Callable[[], float] = time.time) -> None:
        """``failures``: the ``walled_garden_task_failures_total`` counter (label ``task``)."""
        self.stop = stop
        self.failures = failures
        self.first_delay, self.max_delay, self.healthy_after = first_delay, max_delay, healthy_after
        self.clock = clock
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.states: dict[str, TaskState] = {}

    def start(self, name: str, factory: Factory | None) -> None:
        """Run ``factory()`` as ``name``, cancelling the task of that name it replaces;
        ``None`` only cancels (the task is no longer wanted, e.g. after a reload)."""
        old = self.tasks.pop(name, None)
        if old is not None:
            old.cancel()
        if factory is None:
            self.states.pop(name, None)
            return
        state = self.states.setdefault(name, TaskState())
        if self.failures is not None:
            self.failures.labels(name)   # the series exists (at 0) before any failure: rate() sees the first
        self.tasks[name] = asyncio.create_task(self._supervise(name, factory, state), name=name)

    async def end(self, name: str) -> None:
        """Cancel the task ``name`` and wait until it has ended (its cleanup done: a child
        process reaped, a port released), so a successor can take what it held."""
        old = self.tasks.pop(name, None)
        self.states.pop(name, None)
        if old is not None:
            old.cancel()
            await asyncio.gather(old, return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: state.to_json() for name, state in sorted(self.states.items())}

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, name: str, factory: Factory, state: TaskState) -> None:
        _current.set((self, name, state))   # this task's own context: seen by what it awaits
        delay = self.first_delay
        while not self.stop.is_set():
            started = time.monotonic()
            state.running, state.restart_at = True, None
            error: BaseException | None = None
            try:
                await factory()
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:  # noqa: BLE001 (the point of this module: logged, counted, restarted)
                error = exc
            state.running = False
            if error is None and self.stop.is_set():
                return   # asked to stop: a normal end
            if time.monotonic() - started >= self.healthy_after:
                delay = self.first_delay
            self._failed(name, state, error, delay)
            if await self._stopped_within(delay):
                return
            delay = min(delay * 2, self.max_delay)

    def _failed(self, name: str, state: TaskState, error: BaseException | None, delay: float) -> None:
        text = f"{type(error).__name__}: {error}" if error is not None else "ended without being asked to stop"
        self._record(name, state, text, delay)
        stopping = self.stop.is_set()
        log.error("event=task_failed task=%s failures=%d error=%s restart_in=%s", name, state.failures, text,
                  "-" if stopping else f"{delay:.0f}s", exc_info=error)

    def _record(self, name: str, state: TaskState, text: str, delay: float) -> None:
        """Count one failure of ``name`` and keep it for ``status``; the next start in ``delay`` s."""
        state.failures += 1
        state.last_error = text
        state.last_failure_at = self.clock()
        state.restart_at = None if self.stop.is_set() else state.last_failure_at + delay
        if self.failures is not None:
            self.failures.labels(name).inc()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            return True
        except TimeoutError:
            return False
