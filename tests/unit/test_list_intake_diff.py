"""A changed list is applied as a diff of the changed subscribers only, with the same result
as a full pass; conflicts and new prefix lengths still go through the full pass."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import operator_change
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.transaction import ReplaceTable
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address


class CountingConntrack:
    def __init__(self) -> None:
        self.passes: list[set[Any]] = []

    async def flush(self, networks: Any, keep_mark: int = 0) -> int:
        self.passes.append(set(networks))
        return 0


def sub(i: int, mode: Mode = Mode.WALLED_GARDEN, extra: str = "") -> Subscriber:
    addresses = [parse_address(f"100.64.{i // 250}.{i % 250 + 1}")] + ([parse_address(extra)] if extra else [])
    return Subscriber(f"C-{i}", tuple(addresses), mode, "overdue")


@pytest.fixture
async def enforcer(tmp_path: Path) -> Any:
    text = (f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
            f"api: {{socket: {tmp_path}/c.sock}}\n")
    fake, conntrack = FakeDataplane(), CountingConntrack()
    daemon = Enforcer(parse_config(text), dataplane=fake, conntrack=conntrack)  # type: ignore[arg-type]
    await daemon.engine.restore()
    await daemon.lists.on_list(ListUpdate([sub(i) for i in range(200)], "l", "1"), approved_by="test")
    yield daemon, fake, conntrack
    await daemon.close()


def full_replaces(fake: FakeDataplane) -> int:
    return sum(1 for tx in fake.transactions if any(isinstance(op, ReplaceTable) for op in tx.operations))


async def test_churn_is_a_diff_of_the_changed_subscribers_and_matches_a_full_pass(enforcer: Any, monkeypatch: Any
                                                                                    ) -> None:
    daemon, fake, _conntrack = enforcer
    await operator_change(daemon, "root", "C-900", True, "fraud", addresses=["100.64.9.9"])   # an override, kept
    changed = [sub(i) for i in range(5, 200)] + [sub(i) for i in range(300, 305)]         # 5 out, 5 in
    changed[0] = sub(5, Mode.NOTICE)                                                        # 1 altered
    monkeypatch.setattr(daemon.engine.inputs, "decide_all", lambda *a, **k: pytest.fail("a churn re-decided everyone"))
    before = len(fake.transactions)
    await daemon.lists.on_list(ListUpdate(changed, "l", "2"))
    assert len(fake.transactions) == before + 1 and full_replaces(fake) == 1
    restricted = set(fake.view["mode4_32"])
    assert "100.64.0.1" not in restricted and "100.64.1.51" in restricted and "100.64.9.9" in restricted
    assert fake.view["mode4_32"]["100.64.0.6"] == "goto notice"
    assert daemon.engine.store.enforced()["C-5"]["mode"] == "notice" and "C-0" not in daemon.engine.store.enforced()
    monkeypatch.undo()
    result = await daemon.engine.sync_all()                      # the full pass finds nothing left to do
    assert result.elements == 0
    assert sum(daemon.engine.record.mode_counts.values()) == 201


async def test_an_address_claimed_twice_falls_back_to_the_full_pass(enforcer: Any, caplog: Any) -> None:
    daemon, _fake, _ = enforcer
    await operator_change(daemon, "root", "C-900", True, "fraud", addresses=["100.64.9.9"])
    newcomer = Subscriber("C-901", (parse_address("100.64.9.9"),), Mode.WALLED_GARDEN, "overdue")
    with caplog.at_level(logging.WARNING):
        await daemon.lists.on_list(ListUpdate([sub(i) for i in range(200)] + [newcomer], "l", "2"))
    assert "event=list_conflict" in caplog.text
    assert daemon.queries.lookup("100.64.9.9")["subscriber"] in ("C-900", "C-901")
    assert (await daemon.engine.sync_all()).elements == 0


async def test_a_new_prefix_length_takes_one_full_sync_and_one_flush(enforcer: Any) -> None:
    daemon, fake, conntrack = enforcer
    passes, replaces = len(conntrack.passes), full_replaces(fake)
    await daemon.lists.on_list(ListUpdate([sub(i) for i in range(199)] + [sub(199, extra="2001:db8:5::/48")], "l", "2"))
    await asyncio.sleep(0.05)                             # the flush runs in the background
    assert full_replaces(fake) == replaces + 1, "a new prefix length changes the layout"
    assert len(conntrack.passes) == passes + 1, "flushed once, not once per path"
    assert "2001:db8:5::" in fake.view["mode6_48"]
