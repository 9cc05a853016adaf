"""No input walls a neighbour: overlapping addresses are refused wherever they come from
(docs/reference.md, Safety rules)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from daemon_helpers import NoConntrack, handle_event, operator_change, submit_event
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import RESTRICTED, Event
from enforcer.policy import weight
from enforcer.sources import ListUpdate
from enforcer.subscribers import Mode, Subscriber, parse_address

NOW = 1_795_000_000.0


def sub(sid: str, *addresses: str, mode: Mode = Mode.WALLED_GARDEN) -> Subscriber:
    return Subscriber(sid, tuple(parse_address(a) for a in addresses), mode, "overdue")


@contextlib.asynccontextmanager
async def enforcer(tmp: Path, guard: str = "") -> AsyncIterator[tuple[Enforcer, FakeDataplane]]:
    fake = FakeDataplane()
    config = parse_config(f"state_dir: {tmp}/state\nsubscribers: {{source: {tmp}/l.yaml{guard}}}\n",
                          str(tmp / "c.yaml"))
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    await e.lists.on_list(ListUpdate([sub("C-1", "100.64.0.10", "2001:db8:10:100::/56")], "l.yaml", "1"))
    try:
        yield e, fake
    finally:
        await e.close()


async def test_a_broad_ipv4_prefix_event_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, fake):
        before = {name: dict(items) for name, items in fake.view.items()}
        status, answer = await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "100.64.0.0/16")), 0.0)
        assert status == 409
        assert "100.64.0.0/16 covers 100.64.0.10/32, held by subscriber C-1" in answer["error"]
        assert {name: dict(items) for name, items in fake.view.items()} == before


async def test_a_broad_ipv6_prefix_event_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        status, answer = await handle_event(e, Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "2001:db8::/32")), 0.0)
        assert status == 409 and "C-1" in answer["error"]


async def test_an_address_inside_anothers_prefix_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        status, answer = await handle_event(e,
            Event("r9", RESTRICTED, NOW, "C-9", sub("C-9", "2001:db8:10:100::5")), 0.0)
        assert status == 409 and "lies within 2001:db8:10:100::/56" in answer["error"]


async def test_an_operator_cannot_wall_a_neighbour_either(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, fake):
        status, _answer = await operator_change(e, "alice", "C-9", True, "test", addresses=["100.64.0.0/24"])
        assert status == 409
        assert "100.64.0.10" in fake.view["mode4_32"] and fake.view["mode4_32"]["100.64.0.10"] == "goto garden"


async def test_in_one_batch_the_second_claim_of_an_address_is_refused(tmp_path: Path) -> None:
    async with enforcer(tmp_path) as (e, _):
        first = submit_event(e, Event("a", RESTRICTED, NOW, "C-7", sub("C-7", "100.64.1.0/24")), 0.0)
        second = submit_event(e, Event("b", RESTRICTED, NOW, "C-8", sub("C-8", "100.64.1.9")), 0.0)
        assert (await first)[0] == 200
        assert (await second)[0] == 409


def test_the_guard_weighs_prefixes_by_the_space_they_cover() -> None:
    assert weight(sub("a", "100.64.0.10")) == 1
    assert weight(sub("a", "100.64.0.0/16")) == 65536
    assert weight(sub("a", "100.64.0.10", "2001:db8:10:100::/56")) == 1
    assert weight(sub("a", "2001:db8::/48")) == 256


async def test_one_broad_list_entry_is_held_by_the_guard(tmp_path: Path) -> None:
    async with enforcer(tmp_path, ", guard: {max_restrict: 100}") as (e, fake):
        await e.lists.on_list(ListUpdate(
            [sub("C-1", "100.64.0.10", "2001:db8:10:100::/56"), sub("C-2", "100.65.0.0/16")], "l.yaml", "2"))
        assert e.lists.held is not None and "65536" in e.lists.held.why
        assert "100.65.0.0" not in fake.view.get("mode4_16", {})


async def test_addresses_outside_the_subscriber_prefixes_are_refused(tmp_path: Path) -> None:
    fake = FakeDataplane()
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "gateway: {subscriber_prefixes: ['100.64.0.0/10', '2001:db8::/32']}\n",
                          str(tmp_path / "c.yaml"))
    e = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: NOW)  # type: ignore[arg-type]
    await e.engine.restore()
    try:
        status, answer = await handle_event(e, Event("r1", RESTRICTED, NOW, "C-1", sub("C-1", "198.51.100.7")), 0.0)
        assert status == 400 and "outside gateway.subscriber_prefixes" in answer["error"]
        status, answer = await operator_change(e, "alice", "C-1", True, "test", addresses=["2001:db9::1"])
        assert status == 400 and "2001:db9::1" in answer["error"]
        assert not fake.view.get("mode4_32") and not fake.view.get("mode6_128")
        assert (await handle_event(e, Event("r2", RESTRICTED, NOW, "C-1", sub("C-1", "100.64.0.7")), 0.0))[0] == 200
    finally:
        await e.close()
