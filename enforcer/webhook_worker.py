"""Billing webhooks in a worker process: HTTP, signatures and parsing off the daemon's core.

Measured (docs/benchmarks.md): serving a webhook with aiohttp costs ~190 µs of CPU, verifying
and parsing ~50 µs, and the daemon's own work (policy, kernel transaction, state) ~300 µs.
In one process they would share one core and the GIL, which caps a 100k-subscriber gateway at
~1,300 events/s. So the enforcer runs the webhook server (``api.listen``) in a child process
that verifies and parses each request (``api.webhooks.webhook_app``, the same app one process
would serve) and hands the parsed event to the daemon over a socketpair; the daemon answers
once the kernel change is committed and flushed, and the child answers billing.

Wire format: one JSON object per line.
  child → daemon: ``{"n": seq, "event": {...}, "received": perf_counter}`` (CLOCK_MONOTONIC is
  shared by all processes, so latency is still measured from the request's arrival),
  ``{"count": [type, result], "by": k}`` for requests the child refused itself (summed over
  one loop turn, so a flood of unsigned requests costs the daemon one line per turn, not one
  per request), ``{"ready": true}``.
  daemon → child: ``{"n": seq, "result": {"outcome": {...}}}`` or ``{"n": seq, "result":
  {"refused": kind, "error": "...", "extra": {...}}}`` (``outcome.Result``), ``{"reload": secret_file}``.
The child exits when the daemon's end closes; the daemon restarts a child that dies.

The listener faces the network, so it is built to survive it (docs/security.md): ``api.listeners.start_tcp_site``
serves it through ``listener_guard`` (aiohttp has no header timeout or connection cap: a request
head within 10 s, its body within 10 s, at most ``listener_guard.open_files_cap`` connections, the
oldest idle one closed for a new one), bodies are capped at ``webhooks.MAX_EVENT_BYTES``, and
refused requests are logged at most once per ``listener_guard.REJECT_LOG_EVERY`` s. The daemon's
result reaches billing as the same HTTP answer it would have sent itself (``api.http``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import socket
import sys
from typing import Any

from .child_process import describe_exit, keep_running
from .event_sink import EventSink
from .events import Event, event_from_wire, event_to_wire
from .outcome import Outcome, Refusal, Refused, Result

log = logging.getLogger("walled_garden.webhooks")
#: Longest line either side accepts (an event is a few hundred bytes; bodies are capped at 64 KiB).
LINE_LIMIT = 1 << 20
#: How long ``WorkerBridge.start`` waits for the child to listen.
READY_TIMEOUT = 15.0


def result_to_wire(result: Result) -> dict[str, Any]:
    if isinstance(result, Outcome):
        return {"outcome": result.body}
    return {"refused": result.kind.value, "error": result.error, "extra": result.extra}


def result_from_wire(data: dict[str, Any]) -> Result:
    if "outcome" in data:
        return Outcome(data["outcome"])
    return Refusal(Refused(data["refused"]), str(data["error"]), dict(data.get("extra") or {}))


class LineWriter:
    """JSON lines to the other process, written once per event-loop turn (the daemon's answers).

    A batch's answers are all ready in the same turn; one write of them all costs one system
    call instead of one each (~18 µs apiece, measured). The child does not batch its events:
    one of its loop turns handles many requests (tens of ms under a flood), and an event held
    to the turn's end would wait that long before the daemon sees it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._lines: list[bytes] = []

    def send(self, message: dict[str, Any]) -> None:
        self._lines.append(json.dumps(message, separators=(",", ":")).encode())
        if len(self._lines) == 1:
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        data, self._lines = b"\n".join(self._lines) + b"\n", []
        if not self.writer.is_closing():
            self.writer.write(data)


# -- the child ----------------------------------------------------------------------------------
class Forwarder:
    """The child's ``EventSink``: events go to the daemon, results come back, counts are summed.

    Counts of requests the child refused itself are sent once per loop turn, so a flood of
    unsigned requests costs the daemon one line per turn, not one per request."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._seq = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Result]] = {}
        self._sums: dict[tuple[str, str], int] = {}

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def count(self, event_type: str, result: str, by: int = 1) -> None:
        if not self._sums:
            asyncio.get_running_loop().call_soon(self._send_counts)
        key = (event_type, result)
        self._sums[key] = self._sums.get(key, 0) + by

    def _send_counts(self) -> None:
        sums, self._sums = self._sums, {}
        for labels, amount in sums.items():
            self.send({"count": list(labels), "by": amount})

    def submit(self, event: Event, received: float, at: float | None = None) -> asyncio.Future[Result]:
        n = next(self._seq)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting[n] = future
        self.send({"n": n, "event": event_to_wire(event), "received": received})
        return future

    def answered(self, message: dict[str, Any]) -> None:
        future = self._waiting.pop(message["n"], None)
        if future is not None and not future.done():
            future.set_result(result_from_wire(message["result"]))

    def daemon_gone(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_result(Refusal(Refused.UNAVAILABLE, "the enforcer is restarting; retry later"))


async def child_main(fd: int, host: str, port: int, secret_file: str) -> int:
    from .api.listeners import start_tcp_site
    from .api.webhooks import SecretError, Verifier, load_webhook_secret, webhook_app

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
    forwarder = Forwarder(writer)
    verifier = Verifier(None)
    try:
        verifier.webhook = load_webhook_secret(secret_file)
    except SecretError as exc:
        log.error("event=webhook_disabled error=%r (events answer 503 until fixed)", str(exc))
    runner = await start_tcp_site(webhook_app(forwarder, verifier), host, port)
    forwarder.send({"ready": True})
    log.info("event=webhook_worker_started listen=%s:%d pid=%d", host, port, os.getpid())
    try:
        while line := await reader.readline():
            message = json.loads(line)
            if "n" in message:
                forwarder.answered(message)
            elif "reload" in message:
                try:
                    verifier.webhook = load_webhook_secret(message["reload"])
                    log.info("event=webhook_secret_reloaded")
                except SecretError as exc:  # keep a working secret rather than a broken one
                    log.error("event=webhook_secret_not_reloaded error=%r", str(exc))
    finally:
        forwarder.daemon_gone()
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_logging

    parser = argparse.ArgumentParser(description="walled-garden webhook worker (started by the enforcer)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    return asyncio.run(child_main(args.fd, args.host, args.port, args.secret_file))


def _answer(future: asyncio.Future[Result]) -> dict[str, Any]:
    if future.cancelled() or future.exception() is not None:
        why = f"internal error, retry later: {future.exception() or 'cancelled'}"
        return {"result": result_to_wire(Refusal(Refused.UNAVAILABLE, why))}
    return {"result": result_to_wire(future.result())}


# -- the daemon's side --------------------------------------------------------------------------
class WorkerBridge:
    """Starts and supervises the webhook worker; feeds its events to the daemon's ``EventSink``.

    The worker may be started before the daemon has restored its state (``spawn_early``): its
    interpreter and HTTP stack load on the other core meanwhile (~0.5 s), and billing's requests
    are accepted and wait. Events reach the sink only once one is ``attach``-ed (after the
    restore), in the order they came: none is answered before its change is durable and in the
    kernel, as always."""

    def __init__(self, sink: EventSink | None, host: str, port: int, secret_file: str) -> None:
        self.sink = sink
        self.host, self.port, self.secret_file = host, port, secret_file
        self.ready = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lines: LineWriter | None = None
        self._stop: asyncio.Event | None = None
        self._attached = asyncio.Event()
        if sink is not None:
            self._attached.set()
        self._early: tuple[asyncio.subprocess.Process, socket.socket] | None = None

    def attach(self, sink: EventSink) -> None:
        """Hand events to ``sink`` from now on (those waiting first)."""
        self.sink = sink
        self._attached.set()

    async def spawn_early(self) -> None:
        """Start the worker process now; ``run`` supervises this one first. A failure to start
        it is left to ``run``, which reports and retries it."""
        try:
            self._early = await self._spawn()
        except OSError as exc:
            log.warning("event=webhook_worker_early_start_failed error=%r (started with the other tasks)", str(exc))

    async def discard_early(self) -> None:
        """Stop a worker ``spawn_early`` started that ``run`` never took over (a stop during the
        restore)."""
        early, self._early = self._early, None
        if early is not None:
            process, ours = early
            ours.close()   # the child sees EOF and exits
            try:
                await asyncio.wait_for(process.wait(), 5.0)
            except TimeoutError:
                process.kill()

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, socket.socket]:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "enforcer.webhook_worker", "--fd", str(theirs.fileno()), "--host", self.host,
                "--port", str(self.port), "--secret-file", self.secret_file, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return process, ours

    async def run(self, stop: asyncio.Event) -> None:
        """Run the worker until ``stop``, started again when it dies; each death is logged and
        counted as a failure of the task running this (``webhooks``: ``child_process``)."""
        self._stop = stop

        def exited(code: int | None, delay: float) -> str:
            log.error("event=webhook_worker_exited code=%s restart_in=%.0fs", code, delay)
            return f"webhook worker {describe_exit(code)}"

        await keep_running(lambda: self._run_once(stop), stop, exited)

    async def _run_once(self, stop: asyncio.Event) -> int | None:
        early, self._early = self._early, None
        self.process, ours = early if early is not None else await self._spawn()
        process = self.process
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        self._lines = LineWriter(self._writer)
        serving = asyncio.create_task(self._serve(reader))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled: never leave the child behind
            stopping.cancel()
            serving.cancel()
            self.ready.clear()
            self._writer.close()          # the child sees EOF and exits
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                if process.returncode is None:
                    process.kill()
        return process.returncode

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            message = json.loads(line)
            if not message.get("ready"):
                await self._attached.wait()
            if "event" in message:
                self._submit(message)
            elif "count" in message:
                event_type, result = message["count"]
                assert self.sink is not None
                self.sink.count(str(event_type), str(result), by=int(message.get("by", 1)))
            elif message.get("ready"):
                self.ready.set()

    def _submit(self, message: dict[str, Any]) -> None:
        """Queue the event; its answer goes back when its future resolves (no task per event).

        The answer goes to the child that asked: if that one died meanwhile, it is dropped
        rather than sent to its successor, whose request numbers start again at 1."""
        n, lines, sink = message["n"], self._lines, self.sink
        assert lines is not None and sink is not None
        try:
            answer = sink.submit(event_from_wire(message["event"]), float(message["received"]))
        except Exception as exc:  # answer the request whatever happened
            log.exception("event=webhook_event_failed")
            lines.send({"n": n, "result": result_to_wire(Refusal(Refused.UNAVAILABLE,
                                                                  f"internal error, retry later: {exc}"))})
            return
        answer.add_done_callback(lambda future: lines.send({"n": n, **_answer(future)}))

    def _send(self, message: dict[str, Any]) -> None:
        if self._lines is not None:
            self._lines.send(message)

    def reload_secret(self, secret_file: str) -> None:
        self.secret_file = secret_file   # also for the next restart
        self._send({"reload": secret_file})

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Until the worker listens; gives up early when the daemon is being stopped."""
        waiters = {asyncio.ensure_future(self.ready.wait())}
        if self._stop is not None:
            waiters.add(asyncio.ensure_future(self._stop.wait()))
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not self.ready.is_set() and not (self._stop is not None and self._stop.is_set()):
            log.error("event=webhook_worker_not_ready timeout=%.0fs (events cannot be received yet)", timeout)
        return self.ready.is_set()


if __name__ == "__main__":
    sys.exit(main())
