"""A replace of the table carries the kernel-held timeout sets' elements over (``Reconciler._carry``).

The portal's recent callers and the DNS forwarder's learnt addresses live only in the kernel's
timeout sets; a restart without a replace keeps them, so a replace (a layout change, a table
without our structure mark, a repair) must too: each goes into the replacing transaction with
its timeout and the time it had left. Where that comes from: the table's listing when the sync
just made one, else one small listing of just these sets (never the subscriber sets); a trusted
start that replaces nothing reads nothing. The callers: at most ``CARRIED_CALLERS`` a family,
those with the most time left (spoofed SYNs can fill the sets). Notice acknowledgements are not
carried: they belong to a subscriber, and the engine puts them back after every replace
(tests/unit/test_acks_after_replace.py). A replace the kernel refuses is tried again without
what it carried only when the refusal can be theirs (``carry_refused``). The kernel side
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
from enforcer.dataplane.layout import CARRIED_CALLERS, SENTINELS, THROTTLE_METER_SIZE, Layout
from enforcer.dataplane.state import Expiring, TableState
from enforcer.dataplane.transaction import AddExpiring, ReplaceTable, Transaction
from enforcer.model import Mode
from enforcer.policy import Decision
from enforcer.reconciler import Reconciler, _Listed, carry_refused
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
    """Counts full listings, small ones and replaces tried; can fail the small listing, or a
    replace carrying elements (with ``refuse_carried``'s message)."""

    def __init__(self) -> None:
        super().__init__(TABLE)
        self.reads = 0
        self.small_reads: list[list[str]] = []
        self.fail_small_read = False
        self.refuse_carried: str | None = None
        self.replaces_tried: list[bool] = []   # each replace tried: did it carry elements?

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
        carrying = any(isinstance(op, AddExpiring) for op in tx.operations)
        if any(isinstance(op, ReplaceTable) for op in tx.operations):
            self.replaces_tried.append(carrying)
        if self.refuse_carried and carrying:
            raise DataplaneError(self.refuse_carried)
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
    fake.reads, fake.small_reads, fake.replaces_tried = 0, [], []
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
    """The carried timeout sets' elements the table holds now, with their expiry."""
    found = FakeDataplane.read_timeouts(fake, OTHER.carried_sets())   # not counted as the reconciler's
    return {name: items for name, items in found.items() if items}


def acks(fake: Fake) -> dict[str, dict[str, str | None]]:
    """The notice acknowledgement sets' elements the table holds now."""
    assert fake.state is not None
    return {name: items for name, items in fake.state.elements.items() if name.startswith("noticeack") and items}


EXPECTED = {"portalcaller4": {"100.64.0.10"}, "portalcaller6": {"2001:db8:10:100::"}}


def test_a_reload_to_another_layout_carries_the_callers_with_one_small_listing() -> None:
    fake, rec = started()
    assert acks(fake).keys() == {"noticeack4_32", "noticeack6_64"}
    rec.base_layout = OTHER
    assert rec.sync_all(DECISIONS).kind == "full"
    assert {name: set(items) for name, items in held(fake).items()} == EXPECTED
    assert acks(fake) == {}, "acknowledgements are put back by subscriber (Engine.on_replaced), not carried"
    assert fake.reads == 0, "the mirror's sync lists nothing but the timeout sets"
    assert fake.small_reads == [list(OTHER.carried_sets())]
    assert not any(name.startswith("noticeack") for name in OTHER.carried_sets())
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable) and carried(fake).keys() == EXPECTED.keys()
    for items in carried(fake).values():
        assert all(0 < left <= timeout for timeout, left in items.values())


def test_a_start_that_lists_the_table_reuses_the_listing() -> None:
    fake, _ = started()
    rec = Reconciler(fake, OTHER)   # a new process, a new layout: the start lists the table, then replaces
    assert rec.sync_all(DECISIONS, read_kernel=True).kind == "full"
    assert fake.reads == 1 and fake.small_reads == [], "the start's own listing is used"
    assert {name: set(items) for name, items in carried(fake).items()} == EXPECTED and acks(fake) == {}


def test_a_repair_after_a_flushed_set_keeps_the_callers() -> None:
    fake, rec = started()
    fake.flush_set("portal4_32")        # the table check's finding: the next sync lists and replaces
    assert rec.check_kernel()
    assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.small_reads == []
    assert {name: set(items) for name, items in held(fake).items()} == EXPECTED
    assert acks(fake) == {}   # the engine's ``on_replaced`` puts them back (test_acks_after_replace.py)


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
    """Only the sets ``carried_sets`` names, whatever a listing holds (a set of the old layout's,
    an acknowledgement set)."""
    layout = Layout(TABLE, ("eth1",), (), None, 8080)
    listed = _Listed({"portalcaller4": {"100.64.0.1": (900, 500)}, "noticeack4_32": {"100.64.0.2": (600, 590)},
                      "dnsgarden4": {"198.51.100.1": (720, 700)}}, time.monotonic())
    tx = Transaction(TABLE)
    assert Reconciler(FakeDataplane(TABLE), layout)._carry(tx, layout, listed) == 1   # no ``dns: gateway``
    assert [op.container for op in tx.operations if isinstance(op, AddExpiring)] == ["portalcaller4"]


def test_a_failed_small_listing_does_not_stop_the_replace(caplog: pytest.LogCaptureFixture) -> None:
    fake, rec = started()
    fake.fail_small_read = True
    rec.base_layout = OTHER
    with caplog.at_level(logging.WARNING):
        assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.state is not None and fake.state.layout_tag == OTHER.tag and not carried(fake)
    assert "event=timeout_elements_unread" in caplog.text


#: How nft 1.0.6 (Linux 6.1) refuses a replace, measured (its echo is the input's first line).
ERANGE = "Error: Could not process rule: Numerical result out of range\nadd table inet walled_garden\n    ^^^^"
ENOMEM = "Error: Could not process rule: Cannot allocate memory\nadd table inet walled_garden\n    ^^^^"


def test_a_replace_the_kernel_refuses_for_the_carried_elements_goes_ahead_without_them(
        caplog: pytest.LogCaptureFixture) -> None:
    fake, rec = started()
    fake.refuse_carried = ERANGE   # an expiry above its timeout, say: the kernel does not name the set
    rec.base_layout = OTHER
    with caplog.at_level(logging.WARNING):
        assert rec.sync_all(DECISIONS).kind == "full"
    assert fake.replaces_tried == [True, False]
    assert fake.state is not None and fake.state.layout_tag == OTHER.tag and not rec.needs_full
    assert "event=timeout_elements_dropped" in caplog.text and held(fake) == {}


def test_a_replace_that_fails_for_another_reason_is_not_retried_nor_blamed_on_them(
        caplog: pytest.LogCaptureFixture) -> None:
    """Out of memory, say: a replace without the carried elements fails the same way (2 s at
    100k subscribers, on the kernel thread every webhook waits for); the repair loop retries."""
    fake, rec = started()
    fake.refuse_carried = ENOMEM
    rec.base_layout = OTHER
    with caplog.at_level(logging.WARNING), pytest.raises(DataplaneError, match="Cannot allocate memory"):
        rec.sync_all(DECISIONS)
    assert fake.replaces_tried == [True], "raised at once: no second replace"
    assert rec.needs_full and fake.state is not None and fake.state.layout_tag == BASE.tag
    assert "timeout_elements_dropped" not in caplog.text
    fake.refuse_carried = None   # the repair loop's next round
    assert rec.sync_all(DECISIONS).kind == "full" and held(fake).keys() == EXPECTED.keys()


def test_which_failures_may_be_the_carried_elements_fault() -> None:
    carried_sets = {"portalcaller4", "dnsgarden6"}
    # nft 1.0.6, measured (tests/kernel/test_replace_keeps_timeout_sets.py runs the real ones)
    assert carry_refused(ERANGE, carried_sets)                                       # expires > timeout
    assert carry_refused("Error: Could not process rule: Too many open files in system\nadd table inet t",
                         carried_sets)                                               # a set full
    assert carry_refused("Error: Could not process rule: Invalid argument\nadd table inet t", carried_sets)
    assert carry_refused("Error: value too large\nadd table inet t", carried_sets)    # a timeout beyond range
    assert not carry_refused(ENOMEM, carried_sets)
    assert not carry_refused("Error: Could not process rule: No buffer space available", carried_sets)
    assert not carry_refused("Error: Could not process rule: Operation not permitted", carried_sets)
    assert not carry_refused("Error: Could not resolve hostname: Name or service not known\nadd table inet t",
                             carried_sets)                                           # a subscriber's key
    assert not carry_refused("Error: syntax error, unexpected '}'\nadd table inet t", carried_sets)
    assert not carry_refused("ipset restore: timed out after 120 s", carried_sets)
    # the failing line named (an nft that echoes it; the ipset backend): that settles it
    assert carry_refused("Error: Could not process rule: Cannot allocate memory\n"
                         "add element inet t portalcaller4 { 100.64.0.1 timeout 900s expires 5s }", carried_sets)
    assert not carry_refused("Error: Could not process rule: Numerical result out of range\n"
                             "add element inet t portal4_32 { 100.64.0.1 }", carried_sets)
    assert carry_refused("ipset restore: ipset v7.17: Error in line 9: Hash is full, cannot add more elements "
                         "(adding to set dnsgarden6)", carried_sets)
    assert not carry_refused("ipset restore: ipset v7.17: Error in line 3: Hash is full, cannot add more elements "
                             "(adding to set portal4_32)", carried_sets)


def test_the_callers_carried_are_capped_to_the_longest_lived() -> None:
    """``portalcaller4/6`` take a million each, which spoofed SYNs can fill: a replace (a repair
    too, while the flushed set's subscribers are free) carries the ``CARRIED_CALLERS`` with
    the most time left; the set itself keeps its size."""
    fake, rec = started()
    extra = 100
    fake.callers.update({str(ipaddress.IPv4Address(0x64400000 + 0x100 + n)): (900, 1 + n % 899)
                         for n in range(CARRIED_CALLERS + extra)})
    rec.base_layout = OTHER
    assert rec.sync_all(DECISIONS).kind == "full"
    (items,) = [op.items for tx in fake.transactions for op in tx.operations
                if isinstance(op, AddExpiring) and op.container == "portalcaller4"]
    assert len(items) == CARRIED_CALLERS < THROTTLE_METER_SIZE
    kept = {key for key, _, _ in items}
    dropped = [left for key, (_, left) in fake.callers.items() if ":" not in key and key not in kept] or [0]
    assert len(fake._callers(4)) == CARRIED_CALLERS
    assert min(left for _, _, left in items) >= max(dropped) - 1   # the longest-lived (less the time spent)
    assert "100.64.0.10" in kept   # the real caller, 900 s left


def test_what_is_carried_is_filtered_capped_and_aged() -> None:
    """The time since the listing is taken off (an element spent by now is left out); only a key
    of the set's family, never a sentinel; at most what the new set takes, longest-lived first
    (``dnsgarden``: its ``size`` less the forwarder's marker)."""
    layout = Layout(TABLE, ("eth1",), (), None, 8080, dns_port=5300, dns_garden_size=3)
    listed = _Listed({
        "dnsgarden4": {"198.51.100.1": (720, 100), "198.51.100.2": (720, 700), "198.51.100.3": (720, 400),
                       "198.51.100.4": (720, 5), "2001:db8::1": (720, 700), SENTINELS[4]: (720, 700)},
        "portalcaller4": {"100.64.0.1": (900, 590)},
        "notinthelayout4": {"100.64.0.2": (600, 590)},
    }, time.monotonic() - 10.2)
    tx = Transaction(TABLE)
    rec = Reconciler(FakeDataplane(TABLE), layout)
    assert rec._carry(tx, layout, listed) == 3
    assert tx.operations == [AddExpiring("portalcaller4", (("100.64.0.1", 900, 579),)),
                             AddExpiring("dnsgarden4", (("198.51.100.2", 720, 689), ("198.51.100.3", 720, 389)))]
    assert "198.51.100.2 timeout 720s expires 689s" in tx.render()
