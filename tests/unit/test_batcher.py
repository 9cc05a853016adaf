"""Batcher: a lone item goes at once; with ``min_interval`` rounds are spaced and gather more."""

from __future__ import annotations

import asyncio

from enforcer.batcher import Batcher


async def test_lone_item_is_not_delayed_and_rounds_are_spaced() -> None:
    loop = asyncio.get_running_loop()
    rounds: list[tuple[float, list[int]]] = []

    async def commit(batch: list[int]) -> None:
        rounds.append((loop.time(), batch))
        await asyncio.sleep(0.005)

    batcher = Batcher(commit, min_interval=0.1)
    started = loop.time()
    batcher.submit(1)
    await asyncio.sleep(0.01)
    assert rounds and rounds[0][1] == [1] and rounds[0][0] - started < 0.05, "a lone item waits for nothing"
    for i in range(2, 12):            # a burst right after: one spaced round takes it all
        batcher.submit(i)
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    assert [batch for _, batch in rounds] == [[1], list(range(2, 12))]
    assert rounds[1][0] - rounds[0][0] >= 0.099
    await batcher.close()


async def test_without_interval_rounds_follow_each_other() -> None:
    rounds: list[list[int]] = []

    async def commit(batch: list[int]) -> None:
        rounds.append(batch)
        await asyncio.sleep(0.01)

    batcher = Batcher(commit)
    for i in range(5):
        batcher.submit(i)
        await asyncio.sleep(0.004)
    await asyncio.sleep(0.05)
    assert sum(rounds, []) == list(range(5)) and len(rounds) >= 2
    await batcher.close()
