"""The daemon's side of the DNS forwarder: starts the child, supervises it, turns its stats into metrics.

Modelled on ``webhook_worker.WorkerBridge``: the child (``process``) gets one end of a
socketpair and the settings as JSON on its command line; it sends ``{"ready": true}`` once it
listens and ``{"stats": ...}`` every second, idle or not, from the moment it connects (also while
it seeds its sets). When it exits it is started again after 1 s, doubling to 30 s while it keeps
failing (back to 1 s after a run of a minute); each such exit is logged and counted as a failure
of the ``dns_forwarder`` task (``child_process``, ``supervisor.report_failure``).

A child that stops talking is hung (stopped by a signal, a deadlock, a loop blocked for good):
it would hold its port and answer nobody while ``up`` stayed 1. So a silence of ``SILENT_LIMIT``
s (five missed stats lines; ``START_LIMIT`` before it is ready, while the interpreter starts) is
logged (``event=dns_forwarder_unresponsive``), sets up to 0, and the child is killed with
SIGKILL (a stopped process gets no SIGTERM until it is continued) and restarted as if it had
died.

On ``stop`` the daemon's end is closed (the child exits on EOF) and a child still there after
``STOP_GRACE`` s is killed, also when ``run`` is cancelled: the child is never left behind. Its
stderr is read line by line into the daemon's log, and the last line is kept for ``status()``
(why it failed to start).

Stats (``stats.Stats.drain``) are deltas: counts are added to the counters, gauges set, the
histogram's per-bucket deltas summed (``metrics.DeltaHistogram``). A name the daemon does not
know is logged once and dropped, so a newer child cannot break the daemon's metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..child_process import describe_exit, keep_running
from .process import STATS_EVERY
from .settings import ForwarderSettings
from .stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

    from ..metrics import Metrics

__all__ = ["ForwarderBridge"]

log = logging.getLogger("walled_garden.dns")
_M = TypeVar("_M")

#: Seconds the child gets to exit after the daemon's end closed (or SIGTERM) before SIGKILL.
STOP_GRACE = 5.0
#: Seconds without a line from a ready child before it is called hung and killed: five stats lines missed.
SILENT_LIMIT = 5 * STATS_EVERY
#: The same before it is ready: its interpreter starts and imports before the first line (well under
#: a second on an idle machine; generous for a loaded one, or a slow seed of full garden sets).
START_LIMIT = 30.0
#: One more look after a silence, before calling the child hung: the daemon's own loop may have been
#: busy past the limit with the child's lines waiting unread in the socket.
RECHECK = 1.0
#: Longest line from the child (a stats line with many resolvers is a few KiB).
LINE_LIMIT = 1 << 20
#: Counts that have no metric of their own, summed in ``walled_garden_dns_forwarder_events_total{event}``.
OTHER_EVENTS = ("admit_timeouts", "admit_failures", "garden_answers_unparsable", "tcp_clients_refused",
                "upstream_answers_dropped", "answers_dropped", "garden_addresses_refused")


class ForwarderBridge:
    """Runs ``python -m enforcer.dns_garden.process`` for as long as ``run`` runs."""

    def __init__(self, settings: ForwarderSettings, metrics: Metrics, *, command_prefix: Sequence[str] = ()) -> None:
        """``command_prefix`` runs the child under another command (tests: ``ip netns exec NS``)."""
        self.settings = settings
        self.metrics = metrics
        self.command_prefix = tuple(command_prefix)
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.last_error: str | None = None
        self._unknown: set[str] = set()
        metrics.dns_capacity.set(settings.max_addresses)
        metrics.dns_forwarder_up.set(0)

    def status(self) -> dict[str, Any]:
        """For ``walled-garden status`` (key ``dns_forwarder``)."""
        process = self.process
        running = process is not None and process.returncode is None
        return {"running": running, "ready": self.ready.is_set(),
                "pid": process.pid if running and process is not None else None,
                "restarts": self.restarts, "last_exit_code": self.last_exit_code, "last_error": self.last_error,
                "listen": [f"{host} port {self.settings.port}" for host in self.settings.listen]}

    async def run(self, stop: asyncio.Event) -> None:
        """Run the child until ``stop``, started again when it ends (``child_process``)."""
        def exited(code: int | None, delay: float) -> str:
            self.restarts += 1
            log.error("event=dns_forwarder_exited code=%s error=%s restart_in=%.0fs", code, self.last_error or "",
                      delay)
            return f"dns forwarder {describe_exit(code)}" + (f": {self.last_error}" if self.last_error else "")

        await keep_running(lambda: self._run_once(stop), stop, exited)

    async def _run_once(self, stop: asyncio.Event) -> int | None:
        ours, theirs = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command_prefix, sys.executable, "-m", "enforcer.dns_garden.process",
                "--fd", str(theirs.fileno()), "--settings", self.settings.to_json(),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        process = self.process
        log.info("event=dns_forwarder_spawned pid=%d", process.pid)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        serving = asyncio.create_task(self._serve(reader))
        stopping = asyncio.create_task(stop.wait())
        errors = asyncio.create_task(self._stderr(process))
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            silence = serving.result() if serving.done() and serving.exception() is None else None
            if silence is not None:
                self._hung(process, silence)
        finally:  # also when cancelled: never leave the child behind
            stopping.cancel()
            serving.cancel()
            self.ready.clear()
            self.metrics.dns_forwarder_up.set(0)
            writer.close()           # the child sees EOF and exits
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), STOP_GRACE)
            except (TimeoutError, asyncio.CancelledError):
                if process.returncode is None:
                    process.kill()
                    await asyncio.shield(process.wait())
            try:
                await asyncio.wait_for(asyncio.shield(errors), 1.0)
            except (TimeoutError, asyncio.CancelledError):
                errors.cancel()
        self.last_exit_code = process.returncode
        return process.returncode

    async def _stderr(self, process: asyncio.subprocess.Process) -> None:
        """The child's stderr into the daemon's log, one event per line; the last kept for status."""
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self.last_error = text[:1000]
                log.warning("event=dns_forwarder_stderr pid=%d line=%s", process.pid, text[:1000])

    def _hung(self, process: asyncio.subprocess.Process, silence: float) -> None:
        """The child sent nothing for ``silence`` s: down, and killed (SIGKILL, which also ends a
        stopped process) so that ``keep_running`` starts a fresh one."""
        self.ready.clear()
        self.metrics.dns_forwarder_up.set(0)
        self.last_error = f"unresponsive: sent nothing for {silence:.0f} s (it reports every {STATS_EVERY:g} s)"
        log.error("event=dns_forwarder_unresponsive pid=%d silent=%.0fs action=kill", process.pid, silence)
        if process.returncode is None:
            process.kill()

    async def _serve(self, reader: asyncio.StreamReader) -> float | None:
        """Read the child's lines until EOF (None) or a silence longer than allowed (its length:
        the child is hung)."""
        while True:
            limit = SILENT_LIMIT if self.ready.is_set() else START_LIMIT
            try:
                line = await asyncio.wait_for(reader.readline(), limit)
            except TimeoutError:
                try:   # a cancelled readline leaves what it had read in the buffer
                    line = await asyncio.wait_for(reader.readline(), RECHECK)
                except TimeoutError:
                    return limit + RECHECK
            if not line:
                return None
            try:
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("not a JSON object")
                if message.get("ready"):
                    self.ready.set()
                    self.last_error = None
                    self.metrics.dns_forwarder_up.set(1)
                    log.info("event=dns_forwarder_ready pid=%s", self.process.pid if self.process else None)
                if "stats" in message:
                    self.apply_stats(message["stats"])
            except (ValueError, TypeError, KeyError) as exc:   # a child's bug must not stop the supervision
                log.error("event=dns_forwarder_bad_line error=%s line=%s", exc, line[:300])

    def apply_stats(self, stats: dict[str, Any]) -> None:
        """One ``Stats.drain()`` from the child into the metrics. ValueError/TypeError on a bad shape."""
        if not isinstance(stats, dict):
            raise TypeError(f"stats: {type(stats).__name__} is not a JSON object")
        m = self.metrics
        for name, labels, n in stats.get("counts", ()):
            labels = tuple(str(label) for label in labels)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"count {name!r}: {n!r} is not a non-negative integer")
            counter = self._counter(str(name), len(labels))
            if counter is not None:
                (counter.labels(*labels) if labels else counter).inc(n)
            elif name in OTHER_EVENTS:
                m.dns_forwarder_events.labels(name).inc(n)
        for name, labels, value in stats.get("gauges", ()):
            labels = tuple(str(label) for label in labels)
            gauge = self._gauge(str(name), len(labels))
            if gauge is not None:
                (gauge.labels(*labels) if labels else gauge).set(float(value))
        added = stats.get("added")
        if added and added.get("count"):
            m.dns_added.add(LATENCY_BUCKETS, [int(n) for n in added["buckets"]], float(added["sum"]),
                            int(added["count"]))

    def _counter(self, name: str, arity: int) -> Counter | None:
        m = self.metrics
        known: dict[str, tuple[Counter, int]] = {
            "queries": (m.dns_queries, 2), "garden_answers": (m.dns_garden_answers, 0),
            "garden_addresses_added": (m.dns_addresses_added, 1), "garden_set_full": (m.dns_set_full, 1),
            "upstream_failures": (m.dns_upstream_failures, 2), "kernel_failures": (m.dns_kernel_failures, 0)}
        return self._known(name, arity, known, OTHER_EVENTS)

    def _gauge(self, name: str, arity: int) -> Gauge | None:
        m = self.metrics
        known: dict[str, tuple[Gauge, int]] = {"garden_addresses": (m.dns_addresses, 1),
                                               "garden_capacity": (m.dns_capacity, 0)}
        return self._known(name, arity, known, ())

    def _known(self, name: str, arity: int, known: dict[str, tuple[_M, int]], others: Sequence[str]) -> _M | None:
        found = known.get(name)
        if found is not None and found[1] == arity:
            return found[0]
        if name not in others and name not in self._unknown:
            self._unknown.add(name)
            # A newer child's metric, or a wrong arity: dropped.
            log.warning("event=dns_forwarder_unknown_stat name=%s labels=%d action=dropped", name, arity)
        return None
