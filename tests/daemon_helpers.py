"""What the daemon-level unit tests share: a conntrack that does nothing, and the CLI run
in a thread so the daemon on the test's event loop can answer it."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

from enforcer.api import http
from enforcer.cli import main
from enforcer.outcome import Outcome, Refusal, Refused


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


# -- the daemon's actions as (status, body), the way the control socket and billing see them --------
async def handle_event(e: Any, event: Any, received: float = 0.0) -> tuple[int, dict[str, Any]]:
    return http(await e.events.handle(event, received))


def submit_event(e: Any, event: Any, received: float = 0.0) -> asyncio.Future[tuple[int, dict[str, Any]]]:
    """The event's answer as (status, body); the same future for a retry of an id in flight."""
    return _mapped(e.events.submit(event, received))


_MAPPED: dict[int, tuple[Any, asyncio.Future[Any]]] = {}


def _mapped(future: asyncio.Future[Any]) -> asyncio.Future[tuple[int, dict[str, Any]]]:
    held = _MAPPED.get(id(future))
    if held is not None and held[0] is future:
        return held[1]
    mapped: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[Any]) -> None:
        if mapped.done():
            return
        if f.cancelled():
            mapped.cancel()
        elif f.exception() is not None:
            mapped.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            mapped.set_result(http(f.result()))

    future.add_done_callback(done)
    _MAPPED[id(future)] = (future, mapped)
    return mapped


async def promise(e: Any, address: str) -> tuple[int, dict[str, Any]]:
    return http(await e.portal.promise(address))


async def acknowledge(e: Any, address: str) -> tuple[int, dict[str, Any]]:
    return http(await e.portal.acknowledge(address))


async def portal_lookup(e: Any, address: str) -> tuple[int, dict[str, Any]]:
    return http(await e.portal.lookup(address))


async def operator_change(e: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    return http(await e.operator.change(*args, **kwargs))


async def exempt(e: Any, *args: Any) -> tuple[int, dict[str, Any]]:
    return http(await e.operator.exempt(*args))


async def unexempt(e: Any, *args: Any) -> tuple[int, dict[str, Any]]:
    return http(await e.operator.unexempt(*args))


async def approve(e: Any, *args: Any) -> tuple[int, dict[str, Any]]:
    return http(await e.lists.approve(*args))


async def reject(e: Any, *args: Any) -> tuple[int, dict[str, Any]]:
    return http(await e.lists.reject(*args))


def refusal(kind: Refused, status: int) -> Callable[[str], Refusal]:
    """A daemon refusal of ``kind`` for an event id, its message naming the status it must become."""
    return lambda eid: Refusal(kind, f"daemon says {status}", {"id": eid})


#: A daemon result per HTTP status billing must then see, with the same body.
RESULTS: dict[int, Callable[[str], Outcome | Refusal]] = {
    200: lambda eid: Outcome({"id": eid, "error": "daemon says 200"}),
    **{status: refusal(kind, status)
       for status, kind in [(400, Refused.INVALID), (403, Refused.FORBIDDEN), (404, Refused.NOT_FOUND),
                            (409, Refused.CONFLICT), (503, Refused.UNAVAILABLE)]}}


class SteppedClocks:
    """A wall clock that can be stepped, and the monotonic clock it is checked against (for the
    clock-step tests: ``pass_`` is time going by, ``step`` the wall clock set)."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def pass_(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += seconds


def grace_config(tmp: Any, grace: float) -> Any:
    """A daemon config in ``tmp`` with a list source and ``payment_grace`` seconds."""
    from enforcer.config import parse_config
    return parse_config(f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.yaml}}\n"
                        f"policy: {{payment_grace: {int(grace)}}}\n", str(tmp / "c.yaml"))


@contextlib.asynccontextmanager
async def clocked_enforcer(config: Any, clocks: SteppedClocks, fake: Any, listed: list[Any]) -> AsyncIterator[Any]:
    """An ``Enforcer`` on ``fake`` with ``clocks``, restored, given ``listed`` as its first list
    (none: no list), closed on the way out."""
    from enforcer.daemon import Enforcer
    from enforcer.sources import ListUpdate
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(),  # type: ignore[arg-type]
                 clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    await e.engine.restore()
    if listed:
        await e.lists.on_list(ListUpdate(listed, "l.yaml", "1"))
    try:
        yield e
    finally:
        await e.close()
