"""Batcher: a lone item goes at once; with ``min_interval`` rounds are spaced and gather more."""

from __future__ import annotations

import asyncio

from enforcer.batcher import Batcher


async def test_lone_item_is_not_delayed_and_rounds_are_spaced() -> None:
    loop = asyncio.get_running_loop()
    rounds: list[tuple[float, list[int]]] = []

    async def commit(batch: list[int]) -> None:
        rounds.append((loop.time(), batch))
        await asyncio.sleep(0.02)

    batcher = Batcher(commit, min_interval=0.1)
    started = loop.time()
    batcher.submit(1)
    await asyncio.sleep(0.005)
    assert rounds and rounds[0][1] == [1] and rounds[0][0] - started < 0.05, "a lone item waits for nothing"
    batcher.submit(2)                 # arrives while round 1 runs: load, so the next round is spaced
    await asyncio.sleep(0.03)
    for i in range(3, 12):            # and gathers what arrives meanwhile
        batcher.submit(i)
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    assert [batch for _, batch in rounds] == [[1], list(range(2, 12))]
    assert rounds[1][0] - rounds[0][0] >= 0.099
    await batcher.close()


async def test_a_sender_that_waits_for_each_answer_never_waits_for_the_interval() -> None:
    loop = asyncio.get_running_loop()
    done: list[float] = []

    async def commit(batch: list[asyncio.Future[None]]) -> None:
        await asyncio.sleep(0.01)
        for future in batch:
            future.set_result(None)

    batcher: Batcher[asyncio.Future[None]] = Batcher(commit, min_interval=0.1)
    started = loop.time()
    for _ in range(5):
        answer = loop.create_future()
        batcher.submit(answer)
        await answer
        done.append(loop.time() - started)
    assert done[-1] < 0.2, f"five sequential rounds of 10 ms took {done[-1]:.3f} s"
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
    assert [item for batch in rounds for item in batch] == list(range(5)) and len(rounds) >= 2
    await batcher.close()
