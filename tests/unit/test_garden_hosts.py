"""Walled-garden hostnames: resolved into their own sets, last known addresses kept on failure."""

from __future__ import annotations

from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import Layout
from enforcer.garden_hosts import GardenHosts
from enforcer.reconciler import Reconciler


async def test_addresses_are_applied_and_kept_when_a_lookup_fails() -> None:
    answers: dict[str, object] = {"pay.example.net": {"192.0.2.80", "2001:db8::80"}, "bank.example": {"198.51.100.9"}}
    applied: list[set[str]] = []

    async def resolver(host: str) -> set[str]:
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    async def apply(addresses: set[str]) -> None:
        applied.append(addresses)

    hosts = GardenHosts(("pay.example.net", "bank.example"), apply, resolver)
    assert await hosts.refresh() == {"192.0.2.80", "2001:db8::80", "198.51.100.9"}
    answers["bank.example"] = TimeoutError()
    answers["pay.example.net"] = {"192.0.2.81"}
    assert await hosts.refresh() == {"192.0.2.81", "198.51.100.9"}, "failed name keeps its last addresses"
    assert len(applied) == 2


def test_reconciler_keeps_host_addresses_in_their_sets_and_across_full_syncs() -> None:
    fake = FakeDataplane("t")
    rec = Reconciler(fake, Layout("t", (), (), None, 8080))
    rec.set_host_allow({"192.0.2.80"})           # before the first sync: remembered
    rec.sync_all({})
    assert fake.state is not None and fake.state.elements["allowhost4"] == {"192.0.2.80": None}
    rec.set_host_allow({"192.0.2.81", "2001:db8::80"})
    assert fake.state.elements["allowhost4"] == {"192.0.2.81": None}
    assert fake.state.elements["allowhost6"] == {"2001:db8::80": None}
    rec.sync_all({})
    assert fake.state.elements["allowhost6"] == {"2001:db8::80": None}
