"""A replace of the table carries the kernel-held timeout sets' elements over (``Reconciler._carry``).

Notice acknowledgements, the portal's recent callers and the DNS forwarder's learnt addresses
live only in the kernel's timeout sets; a restart without a replace keeps them, so a replace
(a layout change, a table without our structure mark, a repair) must too: each goes into the
replacing transaction with its timeout and the time it had left. Where that comes from: the
table's listing when the sync just made one, else one small listing of just these sets (never
the subscriber sets); a trusted start that replaces nothing reads nothing. The kernel side
(``expires`` on add, the ipset backend's swap) is in tests/kernel/test_replace_keeps_timeout_sets.py.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable

import pytest

from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import SENTINELS, Layout
from enforcer.dataplane.state import Expiring, TableState
from enforcer.dataplane.transaction import AddExpiring, ReplaceTable, Transaction
from enforcer.model import Mode
from enforcer.policy import Decision
from enforcer.reconciler import Reconciler, _Listed
from enforcer.subscribers import Subscriber

TABLE = "walled_garden"
net = ipaddress.ip_network
BASE = Layout(TABLE, ("eth1",), (net("192.0.2.0/24"),), None, 8080)
OTHER = Layout(TABLE, ("eth1",), (net("192.0.2.0/24"),), None, 8081)   # an upgrade's new layout


def restricted(sid: str, *addresses: str, mode: Mode = Mode.NOTICE) -> Decision:
    return Decision(sid, mode, "on the restricted list", Subscriber(sid, tuple(net(a) for a in addresses), mode,
                                                                     "overdue"))


DECISIONS = {"C-1": restricted("C-1", "100.64.0.10", "2001:db8:10:100::/64"),
             "C-2": restricted("C-2", "100.64.0.11", mode=Mode.WALLED_GARDEN)}


class Fake(FakeDataplane):
    """Counts full listings and small ones; can fail the small listing, or a replace carrying
    elements."""

    def __init__(self) -> None:
        super().__init__(TABLE)
        self.reads = 0
        self.small_reads: list[list[str]] = []
        self.fail_small_read = False
        self.refuse_carried = False

    def read(self) -> TableState | None:
        self.reads += 1
        return super().read()

    def read_timeouts(self, names: Iterable[str]) -> Expiring:
        names = list(names)
        self.small_reads.append(names)
        if self.fail_small_read:
            raise DataplaneError("list set: Operation not permitted")
        return super().read_timeouts(names)

    def apply(self, tx: Transaction) -> None:
        if self.refuse_carried and any(isinstance(op, AddExpiring) for op in tx.operations):
            raise DataplaneError("Could not process rule: Operation not supported")
        super().apply(tx)


def started(fake: Fake | None = None) -> tuple[Fake, Reconciler]:
    """A table with C-1 (notice) acknowledged for 600 s, and two recent callers."""
    fake = fake or Fake()
    rec = Reconciler(fake, BASE)
    rec.sync_all(DECISIONS, read_kernel=True)
    rec.acknowledge(DECISIONS["C-1"], 600)
    fake.saw_caller("100.64.0.10")
    fake.saw_caller("2001:db8:10:100::")
    fake.transactions.clear()
    fake.reads, fake.small_reads = 0, []
    return fake, rec


def carried(fake: Fake) -> dict[str, dict[str, tuple[int, int]]]:
    """What the replacing transaction(s) carried, by set."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for tx in fake.transactions:
        for op in tx.operations:
            if isinstance(op, AddExpiring):
                out.setdefault(op.container, {}).update({k: (t, left) for k, t, left in op.items})
    return out


def held(fake: Fake) -> dict[str, dict[str, tuple[int, int]]]:
    """The timeout sets' elements the table holds now, with their expiry."""
    found = FakeDataplane.read_timeouts(fake, OTHER.carried_sets())   # not counted as the reconciler's
    return {name: items for name, items in found.items() if items}


EXPECTED = {"noticeack4_32": {"100.64.0.10"}, "noticeack6_64": {"2001:db8:10:100::"},
            "portalcaller4": {"100.64.0.10"}, "portalcaller6": {"2001:db8:10:100::"}}


def test_a_reload_to_another_layout_carries_acks_and_callers_with_one_small_listing() -> None:
    fake, rec = started()
    rec.base_layout = OTHER
    assert rec.sync_all(DECISIONS).kind == "full"
    assert {name: set(items) for name, items in held(fake).items()} == EXPECTED
    assert fake.reads == 0, "the mirror's sync lists nothing but the timeout sets"
    assert fake.small_reads == [list(OTHER.carried_sets())]
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable) and carried(fake).keys() == EXPECTED.keys()
    for items in carried(fake).values():
        assert all(0 < left <= timeout for timeout, left in items.values())


def test_a_start_that_lists_the_table_reuses_the_listing() -> None:
    fake, _ = started()
    rec = Reconciler(fake, OTHER)   # a new process, a new layout: the start lists the table, then replaces
    fake.add_element("noticeack4_32", "100.64.0.99")   # someone's element without a timeout: not carried
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert fake.reads == 1 and fake.small_reads == [], "the start's own listing is used"
    assert {name: set(items) for name, items in carried(fake).items()} == EXPECTED


def test_a_repair_after_a_flushed_set_keeps_the_acks() -> None:
    fake, rec = started()
    fake.flush_set("portal4_32")        # the table check's finding: the next sync lists and replaces
    assert rec.check_kernel()
    assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.small_reads == []
    assert {name: set(items) for name, items in held(fake).items()} == EXPECTED


def test_a_trusted_start_reads_nothing_unless_it_replaces() -> None:
    fake, _ = started()
    rec = Reconciler(fake, BASE)
    rec.sync_all(DECISIONS, read_kernel=True)   # a write since the last listing: listed once, marked
    fake.transactions.clear()
    fake.reads, fake.small_reads = 0, []
    rec = Reconciler(fake, BASE)
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "partial"
    assert (fake.reads, fake.small_reads) == (0, []), "a trusted start stays a start that reads nothing"
    fake.chains = {"forward": ["someone's rule"]}   # changed without a commit: only the structure says so
    rec = Reconciler(fake, BASE)
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert fake.reads == 0 and fake.small_reads == [list(BASE.carried_sets())]
    assert {name: set(items) for name, items in held(fake).items()} == EXPECTED


def test_a_set_the_new_layout_does_not_have_is_not_carried() -> None:
    fake = Fake()
    rec = Reconciler(fake, BASE)
    decisions = {"C-3": restricted("C-3", "100.64.8.0/24")}
    rec.sync_all(decisions, read_kernel=True)
    rec.acknowledge(decisions["C-3"], 300)
    assert "noticeack4_24" in fake.state.elements
    fake.transactions.clear()
    assert rec.sync_all({}).kind == "full"   # the /24 no longer used: a layout without noticeack4_24
    assert "noticeack4_24" not in carried(fake) and "noticeack4_24" not in fake.state.elements


def test_a_failed_small_listing_does_not_stop_the_replace(caplog: pytest.LogCaptureFixture) -> None:
    fake, rec = started()
    fake.fail_small_read = True
    rec.base_layout = OTHER
    with caplog.at_level(logging.WARNING):
        assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.state is not None and fake.state.layout_tag == OTHER.tag and not carried(fake)
    assert "event=timeout_elements_unread" in caplog.text


def test_a_replace_the_kernel_refuses_with_the_carried_elements_goes_ahead_without_them(
        caplog: pytest.LogCaptureFixture) -> None:
    fake, rec = started()
    fake.refuse_carried = True
    rec.base_layout = OTHER
    with caplog.at_level(logging.WARNING):
        assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.state is not None and fake.state.layout_tag == OTHER.tag and not rec.needs_full
    assert "event=timeout_elements_dropped" in caplog.text and held(fake) == {}


def test_what_is_carried_is_filtered_capped_and_aged() -> None:
    """The time since the listing is taken off (an element spent by now is left out); only a key
    of the set's family, never a sentinel; at most what the new set takes, longest-lived first
    (``dnsgarden``: its ``size`` less the forwarder's marker)."""
    layout = Layout(TABLE, ("eth1",), (), None, 8080, dns_port=5300, dns_garden_size=3)
    listed = _Listed({
        "dnsgarden4": {"198.51.100.1": (720, 100), "198.51.100.2": (720, 700), "198.51.100.3": (720, 400),
                       "198.51.100.4": (720, 5), "2001:db8::1": (720, 700), SENTINELS[4]: (720, 700)},
        "noticeack4_32": {"100.64.0.1": (600, 590)},
        "notinthelayout4": {"100.64.0.2": (600, 590)},
    }, time.monotonic() - 10.2)
    tx = Transaction(TABLE)
    rec = Reconciler(FakeDataplane(TABLE), layout)
    assert rec._carry(tx, layout, listed) == 3
    assert tx.operations == [AddExpiring("noticeack4_32", (("100.64.0.1", 600, 579),)),
                             AddExpiring("dnsgarden4", (("198.51.100.2", 720, 689), ("198.51.100.3", 720, 389)))]
    assert "198.51.100.2 timeout 720s expires 689s" in tx.render()
