"""A child the daemon depends on is started again when it ends, with a backoff that neither spins
nor gives up, and not at all once the daemon stops."""

from __future__ import annotations

import asyncio

import pytest

from enforcer import child_process


async def test_a_dying_child_is_restarted_with_doubling_delays_until_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_process, "RESTART_FIRST", 0.01)
    monkeypatch.setattr(child_process, "RESTART_MAX", 0.04)
    stop, runs, exits = asyncio.Event(), [], []

    async def run_once() -> int:
        runs.append(1)
        return 3

    def exited(code: int | None, delay: float) -> None:
        exits.append((code, delay))
        if len(exits) == 4:
            stop.set()

    await asyncio.wait_for(child_process.keep_running(run_once, stop, exited), 5)
    assert exits == [(3, 0.01), (3, 0.02), (3, 0.04), (3, 0.04)] and len(runs) == 4   # the first waits RESTART_FIRST


async def test_an_end_asked_for_is_no_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    stop, exits = asyncio.Event(), []

    async def run_once() -> None:
        stop.set()   # the daemon stops; the child ends with it

    await asyncio.wait_for(child_process.keep_running(run_once, stop, lambda code, delay: exits.append(code)), 5)
    assert exits == []
