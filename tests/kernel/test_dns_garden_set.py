"""The DNS garden's kernel writer against real nftables, in a network namespace of its own.

The writer's libnftables context and its netlink element writer are created on a thread that
entered the namespace (their netlink sockets stay there); the checks read the sets with ``nft``
in the same namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import Any

import pytest

from enforcer.dataplane.layout import DNS_GARDEN_SETS, SENTINELS
from enforcer.dataplane.libnftables import Nftables
from enforcer.dataplane.nfnetlink import BatchRefused, ElementWriter
from enforcer.dns_garden.garden_set import GardenSet, GardenSetError
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.dns_garden.stats import Stats

TABLE = "wg_dnsgarden_test"
CLONE_NEWNET = 0x40000000
A1, A2, A3, A4, A5 = (ip_address(f"192.0.2.{i}") for i in range(1, 6))
B1 = ip_address("2001:db8::1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingWriter(ElementWriter):
    """The real netlink writer, counting its transactions (to see batching and skips)."""

    runs = 0

    def write(self, changes: Any) -> None:
        self.runs += 1
        super().write(changes)


class Namespace:
    def __init__(self) -> None:
        self.name = f"wg-dg-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.nft = self._nft_inside()
        except BaseException:
            subprocess.run(["ip", "netns", "del", self.name], check=False)
            raise

    def _nft_inside(self) -> Nftables:
        return self.inside(Nftables)   # its netlink socket is opened there, in the namespace

    def writer_inside(self, kind: type[ElementWriter] = ElementWriter) -> ElementWriter:
        """A netlink element writer whose socket was opened in the namespace."""
        def opened() -> ElementWriter:
            made = kind(TABLE)
            made.open()
            return made
        return self.inside(opened)

    def inside(self, make: Callable[[], Any]) -> Any:
        """``make()`` run on a thread that entered the namespace."""
        box: dict[str, Any] = {}

        def enter() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                box["made"] = make()
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread, raised there)
                box["error"] = exc

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join(10)
        if "error" in box:
            raise box["error"]
        return box["made"]

    def sh(self, *argv: str) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise AssertionError(f"{argv}: {done.stderr}")
        return done.stdout

    def create_table(self, size: int) -> None:
        sets = "".join(f"set {name} {{ type ipv{family}_addr; size {size}; flags timeout; }}\n"
                       for family, name in DNS_GARDEN_SETS.items())
        self.sh("nft", f"add table inet {TABLE}\ntable inet {TABLE} {{\n{sets}}}")

    def elements(self, family: int) -> dict[str, int | None]:
        """Key → timeout (None: no timeout) of one set."""
        data = json.loads(self.sh("nft", "-j", "list", "set", "inet", TABLE, DNS_GARDEN_SETS[family]))
        found = next(o["set"] for o in data["nftables"] if "set" in o)
        out: dict[str, int | None] = {}
        for item in found.get("elem", []):
            if isinstance(item, str):
                out[item] = None
            else:
                out[item["elem"]["val"]] = item["elem"]["timeout"]
        return out

    def close(self) -> None:
        self.nft.close()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace()
    try:
        yield namespace
    finally:
        namespace.close()


def writer(ns: Namespace, max_addresses: int = 100, clock: Clock | None = None,
           elements: ElementWriter | None = None) -> tuple[GardenSet, Stats]:
    settings = ForwarderSettings(table=TABLE, port=5300, resolvers=(("198.51.100.53", 53),),
                                 max_addresses=max_addresses, ttl_margin=120)
    stats = Stats()
    return GardenSet(ns.nft, settings, stats, clock or Clock(), elements or ns.writer_inside()), stats


async def test_admit_adds_with_timeouts_and_markers(ns: Namespace) -> None:
    ns.create_table(1000)
    garden, stats = writer(ns)
    await garden.seed()
    await garden.admit([(A1, 300), (B1, 500)])
    assert ns.elements(4) == {SENTINELS[4]: None, "192.0.2.1": 300}
    assert ns.elements(6) == {SENTINELS[6]: None, "2001:db8::1": 500}
    assert stats.peek("garden_addresses_added", ("ipv4",)) == 1
    assert stats.peek("garden_addresses_added", ("ipv6",)) == 1
    gauges = {(name, tuple(labels)): value for name, labels, value in stats.drain()["gauges"]}
    assert gauges[("garden_addresses", ("ipv4",))] == 1
    assert gauges[("garden_capacity", ())] == 100


async def test_concurrent_admits_share_a_transaction_and_held_ones_are_skipped(ns: Namespace) -> None:
    ns.create_table(1000)
    counting = ns.writer_inside(CountingWriter)
    assert isinstance(counting, CountingWriter)
    clock = Clock()
    garden, stats = writer(ns, clock=clock, elements=counting)
    await garden.seed()
    await asyncio.gather(*(garden.admit([(ip_address(f"192.0.2.{i}"), 200)]) for i in range(1, 21)))
    assert counting.runs == 1     # all 20 asked in one turn of the loop: one transaction
    assert len(ns.elements(4)) == 21
    counting.runs = 0
    clock.now += 20               # 180 s left of 200 wanted: within the 30 s slack
    await garden.admit([(A1, 200), (A2, 150)])
    assert counting.runs == 0
    assert stats.peek("kernel_failures") == 0


async def test_refresh_extends_and_survives_an_element_that_expired_meanwhile(ns: Namespace) -> None:
    ns.create_table(1000)
    clock = Clock()
    garden, stats = writer(ns, clock=clock)
    await garden.seed()
    await garden.admit([(A1, 100), (A2, 1)])
    await garden.admit([(A1, 1000)])
    assert ns.elements(4)["192.0.2.1"] == 1000
    await asyncio.sleep(2.5)      # the kernel drops A2; by the writer's (frozen) clock it is still held
    assert "192.0.2.2" not in ns.elements(4)
    await garden.admit([(A2, 600)])      # delete fails (no such element): retried as a plain add
    assert ns.elements(4)["192.0.2.2"] == 600
    assert stats.peek("kernel_failures") == 0
    assert stats.peek("garden_addresses_added", ("ipv4",)) == 2   # refreshes are not additions


async def test_cap_keeps_the_others(ns: Namespace) -> None:
    ns.create_table(4)            # the marker and three addresses
    garden, stats = writer(ns, max_addresses=10)
    await garden.seed()
    assert garden.cap[4] == 3
    await garden.admit([(A1, 100), (A2, 100), (A3, 100), (A4, 100), (A5, 100)])
    assert set(ns.elements(4)) == {SENTINELS[4], "192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert stats.peek("garden_set_full", ("ipv4",)) == 2
    await garden.admit([(A1, 500)])      # a refresh of a full set still works
    assert ns.elements(4)["192.0.2.1"] == 500
    assert stats.peek("kernel_failures") == 0


async def test_a_kernel_set_fuller_than_tracked_fails_no_address_that_fits(ns: Namespace) -> None:
    ns.create_table(4)
    garden, stats = writer(ns, max_addresses=10)
    await garden.seed()
    ns.sh("nft", f"add element inet {TABLE} dnsgarden4 {{ 198.51.100.1 timeout 1h, 198.51.100.2 timeout 1h }}")
    await garden.admit([(A1, 100), (A2, 100), (A3, 100)])   # one slot left: the kernel refuses a batch of 3
    assert "192.0.2.1" in ns.elements(4)
    assert len(ns.elements(4)) == 4
    assert stats.peek("garden_set_full", ("ipv4",)) == 2
    assert stats.peek("kernel_failures") == 0


async def test_the_marker_check_refills_after_a_flush_and_a_recreated_table(ns: Namespace) -> None:
    ns.create_table(1000)
    garden, stats = writer(ns)
    await garden.seed()
    await garden.admit([(A1, 300), (B1, 300)])
    await garden.check()
    assert ns.elements(4) == {SENTINELS[4]: None, "192.0.2.1": 300}   # nothing to do: no rewrite
    ns.sh("nft", f"flush set inet {TABLE} dnsgarden6")
    await garden.check()
    assert set(ns.elements(6)) == {SENTINELS[6], "2001:db8::1"}
    ns.sh("nft", f"delete table inet {TABLE}")
    await garden.check()          # waits (logged once), raises nothing
    await garden.admit([(A2, 300)])     # fails: counted, not raised, not tracked
    assert stats.peek("kernel_failures") == 1
    ns.create_table(1000)         # the daemon recreates the table, empty
    await garden.check()
    assert set(ns.elements(4)) == {SENTINELS[4], "192.0.2.1"}
    assert set(ns.elements(6)) == {SENTINELS[6], "2001:db8::1"}


async def test_a_refill_writes_the_sets_whole_with_the_times_this_process_gave(ns: Namespace) -> None:
    """After a table replace carried the sets (with the time each element had left when the
    daemon listed them) and left the marker out, the refill makes each set exactly what the
    forwarder tracks, with its own times: a plain add would keep a carried element's shorter
    timeout on kernels before the timeout update (Debian 12's 6.1), and keep what it no longer
    tracks."""
    ns.create_table(1000)
    garden, _ = writer(ns)
    await garden.seed()
    await garden.admit([(A1, 300)])
    ns.sh("nft", f"flush set inet {TABLE} dnsgarden4")    # the replace: no marker, a shorter time,
    ns.sh("nft", f"add element inet {TABLE} dnsgarden4 {{ 192.0.2.1 timeout 20s, 198.51.100.9 timeout 40s }}")
    await garden.check()                                   # and an element this process does not track
    held = ns.elements(4)
    assert set(held) == {SENTINELS[4], "192.0.2.1"}, held
    assert held["192.0.2.1"] is not None and held["192.0.2.1"] > 200, held


async def test_watch_notices_within_a_second_or_two(ns: Namespace) -> None:
    ns.create_table(1000)
    garden, _ = writer(ns)
    await garden.seed()
    await garden.admit([(A1, 300)])
    stop = asyncio.Event()
    watching = asyncio.create_task(garden.watch(stop))
    try:
        ns.sh("nft", f"flush set inet {TABLE} dnsgarden4")
        for _ in range(30):
            await asyncio.sleep(0.1)
            if "192.0.2.1" in ns.elements(4):
                break
        assert set(ns.elements(4)) == {SENTINELS[4], "192.0.2.1"}
    finally:
        stop.set()
        await asyncio.wait_for(watching, 5)


async def test_seed_reads_back_what_the_sets_hold(ns: Namespace) -> None:
    ns.create_table(1000)
    first, _ = writer(ns)
    await first.seed()
    await first.admit([(A1, 300), (B1, 600)])
    clock = Clock()
    second, stats = writer(ns, clock=clock)
    await second.seed()
    held4, held6 = second.held(4), second.held(6)
    assert set(held4) == {A1} and set(held6) == {B1}
    assert 1000 + 295 <= held4[A1] <= 1000 + 300
    assert 1000 + 595 <= held6[B1] <= 1000 + 600
    await second.admit([(A1, 300)])   # still held long enough: nothing to write
    assert stats.peek("garden_addresses_added", ("ipv4",)) == 0
    clock.now += 400
    assert set(second.held(4)) == set()       # expired entries are pruned
    assert set(second.held(6)) == {B1}


async def test_seed_without_the_table_is_a_clear_error(ns: Namespace) -> None:
    garden, _ = writer(ns)
    with pytest.raises(GardenSetError, match="has no set dnsgarden4"):
        await garden.seed()


async def test_the_writer_fills_the_sets_the_daemons_layout_renders(ns: Namespace) -> None:
    from enforcer.dataplane.layout import Layout

    layout = Layout(TABLE, ("eth1",), (), (), 8080, dns_port=5300, ntp=(), dns_garden_size=4)
    ns.sh("nft", layout.render())
    garden, stats = writer(ns, max_addresses=4)
    await garden.seed()
    assert garden.cap == {4: 3, 6: 3}        # the marker takes one of the set's slots
    await garden.admit([(A1, 300), (A2, 300), (A3, 300), (A4, 300), (B1, 300)])
    assert ns.elements(4) == {SENTINELS[4]: None, "192.0.2.1": 300, "192.0.2.2": 300, "192.0.2.3": 300}
    assert ns.elements(6) == {SENTINELS[6]: None, "2001:db8::1": 300}
    assert stats.peek("garden_set_full", ("ipv4",)) == 1
    assert stats.peek("kernel_failures") == 0


def test_a_refused_batch_applies_nothing(ns: Namespace) -> None:
    """The netlink writer's batch is one transaction: an add in one set and a delete of an element
    the other set does not hold are refused together, with the kernel's errno."""
    ns.create_table(1000)
    elements = ns.writer_inside()
    with pytest.raises(BatchRefused) as refused:
        elements.write([("dnsgarden4", [], [(A1, 300)]), ("dnsgarden6", [B1], [])])
    assert refused.value.errno == errno.ENOENT and refused.value.index == 1
    assert ns.elements(4) == {} and ns.elements(6) == {}
    elements.write([("dnsgarden4", [], [(A1, 300), (A2, 60)]), ("dnsgarden6", [], [(B1, 90)])])
    elements.write([("dnsgarden4", [A1], [(A1, 900)])])     # a refresh: delete and add in one batch
    assert ns.elements(4) == {"192.0.2.1": 900, "192.0.2.2": 60}
    assert ns.elements(6) == {"2001:db8::1": 90}
    with pytest.raises(BatchRefused) as refused:
        elements.write([("nosuchset", [], [(A3, 10)])])
    assert refused.value.errno == errno.ENOENT
    elements.close()


async def test_covers_an_address_held_for_the_ttl_though_not_as_long_as_wanted(ns: Namespace) -> None:
    ns.create_table(1000)
    clock = Clock()
    garden, _ = writer(ns, clock=clock)      # ttl_margin 120: the slack is 30 s
    await garden.seed()
    await garden.admit([(A1, 300)])          # an answer with TTL 180, held 300 s
    clock.now += 40
    assert not garden.holds([(A1, 300)])     # 260 s left < 300 - 30: a refresh is due
    assert garden.covers([(A1, 300)])        # 260 s left >= TTL 180 + 10: it may follow the answer
    clock.now += 75
    assert not garden.covers([(A1, 300)])    # 185 s left: the answer waits for the refresh
    assert not garden.covers([(A2, 300)])    # never held


async def test_a_big_admit_goes_in_chunks_and_a_refresh_of_a_gone_element_adds_it(ns: Namespace) -> None:
    """More addresses than one netlink batch holds are written a chunk at a time, all of them;
    and when one refreshed element expired meanwhile, only it is added back, the others deleted
    and added (their new timeout recorded and real)."""
    ns.create_table(5000)
    clock = Clock()
    garden, stats = writer(ns, max_addresses=4000, clock=clock)
    await garden.seed()
    many = [(ip_address(f"2001:db8::{i:x}"), 300) for i in range(1, 3501)]
    await garden.admit(many)
    assert len(ns.elements(6)) == 3501 and stats.peek("kernel_failures") == 0
    await garden.admit([(A1, 100), (A2, 1)])
    await asyncio.sleep(2.5)      # the kernel drops A2; the writer's frozen clock still holds it
    await garden.admit([(A1, 900), (A2, 900)])
    assert ns.elements(4) == {SENTINELS[4]: None, "192.0.2.1": 900, "192.0.2.2": 900}
    assert stats.peek("kernel_failures") == 0
