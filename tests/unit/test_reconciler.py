"""Decisions → the smallest transaction, against the in-memory FakeDataplane (docs/reference.md,
Dataplane).

The kernel holds set memberships only (``portalV_L``, ``noticeV_L``, ``throttleV_L``); the
reconciler's mode view ``modeV_L`` never reaches it, so ``fake.state`` has no ``mode`` container
and ``fake.view`` adds the view the sets imply."""

from __future__ import annotations

import ipaddress

import pytest

from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import TAG_SET, Layout, elements_for, tag_address, with_mode_view
from enforcer.dataplane.state import TableState
from enforcer.dataplane.transaction import AddElements, DeleteElements, ReplaceTable, Transaction
from enforcer.model import Mode
from enforcer.policy import Decision
from enforcer.reconciler import AddressConflict, NeedsFullSync, Reconciler, _Preferred, changed_networks
from enforcer.subscribers import Key, Subscriber, network_key

net = ipaddress.ip_network


def keys(*texts: str) -> set[Key]:
    """The reconciler's keys (``SyncResult.changed``) of these networks."""
    return {network_key(net(text)) for text in texts}
TABLE = "walled_garden"
BASE = Layout(TABLE, ("eth1",), (net("192.0.2.0/24"),), None, 8080)


def restricted(sid: str, *addresses: str, mode: Mode = Mode.WALLED_GARDEN) -> Decision:
    sub = Subscriber(sid, tuple(net(a) for a in addresses), mode, "overdue")
    return Decision(sid, mode, "on the restricted list", sub)


def free(sid: str) -> Decision:
    return Decision(sid, Mode.FREE, "not on the restricted list")


def desired_elements(decisions: dict[str, Decision]) -> dict[str, dict[str, str | None]]:
    """What the kernel should hold for ``decisions`` (no conflicts), by container."""
    layout = BASE.with_prefixes({(n.version, n.prefixlen) for d in decisions.values() if d.subscriber
                                 for n in d.subscriber.addresses})
    out: dict[str, dict[str, str | None]] = {name: {} for name in [*layout.containers(), *layout.ack_sets()]}
    for d in decisions.values():
        if d.restricted:
            for a in d.subscriber.addresses:
                for container, key, value in elements_for(a, d.mode):
                    out[container][key] = value
    return out


def ops(tx: Transaction) -> list:
    """The operations on subscriber sets (not the digest mark's in ``layouttag``: see the digest tests)."""
    return [op for op in tx.operations if isinstance(op, ReplaceTable) or op.container != TAG_SET]


def sets(state: TableState | None) -> dict[str, dict[str, str | None]]:
    """The table's elements but ``layouttag`` (the layout tag and the digest mark)."""
    assert state is not None
    return {name: items for name, items in state.elements.items() if name != TAG_SET}


def kernel_state(**sets: dict[str, None]) -> TableState:
    """What the kernel holds for BASE with these set elements (the rest empty), every
    reconciled set still holding the sentinel the layout created it with."""
    state = TableState(BASE.tag, {name: {} for name in [*BASE.containers(), *BASE.ack_sets()]},
                       set(BASE.containers()))
    state.elements[TAG_SET] = {tag_address(BASE.tag): None}
    for name, items in sets.items():
        assert name in state.elements, name
        state.elements[name].update(items)
    return state


@pytest.fixture
def fake() -> FakeDataplane:
    return FakeDataplane(TABLE)


@pytest.fixture
def rec(fake: FakeDataplane) -> Reconciler:
    return Reconciler(fake, BASE)


INITIAL = {
    "C-1": restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56"),
    "C-2": restricted("C-2", "100.64.0.11", mode=Mode.NOTICE),
    "C-3": free("C-3"),
}


def synced(rec: Reconciler, fake: FakeDataplane, decisions=None) -> dict[str, Decision]:
    decisions = dict(INITIAL if decisions is None else decisions)
    rec.sync_all(decisions)
    fake.transactions.clear()
    return decisions


# -- full syncs -----------------------------------------------------------------------------

def test_first_sync_replaces_the_table_in_one_transaction(rec, fake):
    result = rec.sync_all(INITIAL)
    assert result.kind == "full"
    assert len(fake.transactions) == 1
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable)
    assert tx.operations[0].layout == BASE
    assert all(isinstance(op, AddElements) for op in tx.operations[1:])
    added = {(op.container, k, v) for op in ops(tx)[1:] for k, v in op.items}
    assert added == {
        ("portal4_32", "100.64.0.10", None), ("portal6_56", "2001:db8:10:100::", None),
        ("notice4_32", "100.64.0.11", None),
    }
    assert result.elements == 3
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56", "100.64.0.11/32")
    assert fake.state.layout_tag == BASE.tag
    assert sets(fake.state) == desired_elements(INITIAL)
    assert fake.view["mode4_32"] == {"100.64.0.10": "goto garden", "100.64.0.11": "goto notice"}
    assert fake.view["mode6_56"] == {"2001:db8:10:100::": "goto garden"}
    assert not rec.needs_full


def test_second_sync_with_one_subscriber_added_is_partial(rec, fake):
    decisions = synced(rec, fake)
    decisions["C-4"] = restricted("C-4", "100.64.0.40")
    result = rec.sync_all(decisions)
    assert result.kind == "partial"
    assert result.elements == 1
    (tx,) = fake.transactions
    assert ops(tx) == [AddElements("portal4_32", (("100.64.0.40", None),))]
    assert set(result.changed) == keys("100.64.0.40/32")
    assert sets(fake.state) == desired_elements(decisions)


def test_removal_deletes_the_set_element(rec, fake):
    decisions = synced(rec, fake)
    decisions["C-2"] = free("C-2")
    result = rec.sync_all(decisions)
    assert result.kind == "partial"
    assert result.elements == 1
    (tx,) = fake.transactions
    assert ops(tx) == [DeleteElements("notice4_32", ("100.64.0.11",))]
    assert set(result.changed) == keys("100.64.0.11/32")
    assert "100.64.0.11" not in fake.view["mode4_32"]
    assert sets(fake.state) == desired_elements(decisions)


def test_subscriber_dropped_from_decisions_is_deleted(rec, fake):
    decisions = synced(rec, fake)
    del decisions["C-1"]
    result = rec.sync_all(decisions)
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56")
    assert result.elements == 2
    (tx,) = fake.transactions
    assert sorted(ops(tx), key=lambda o: o.container) == [DeleteElements("portal4_32", ("100.64.0.10",)),
                                                         DeleteElements("portal6_56", ("2001:db8:10:100::",))]
    assert sets(fake.state) == desired_elements(decisions)


def test_mode_change_within_notice_modes_touches_the_throttle_set_only(rec, fake):
    decisions = synced(rec, fake)
    decisions["C-2"] = restricted("C-2", "100.64.0.11", mode=Mode.THROTTLE)
    result = rec.sync_all(decisions)
    (tx,) = fake.transactions
    assert ops(tx) == [AddElements("throttle4_32", (("100.64.0.11", None),))]
    assert result.elements == 1
    assert set(result.changed) == keys("100.64.0.11/32")
    assert fake.state.elements["notice4_32"]["100.64.0.11"] is None
    assert fake.state.elements["throttle4_32"] == {"100.64.0.11": None}
    assert fake.view["mode4_32"]["100.64.0.11"] == "goto throttle"
    # and back to notice: out of the throttle set, still redirected
    decisions["C-2"] = restricted("C-2", "100.64.0.11", mode=Mode.NOTICE)
    fake.transactions.clear()
    result = rec.sync_all(decisions)
    (tx,) = fake.transactions
    assert ops(tx) == [DeleteElements("throttle4_32", ("100.64.0.11",))]
    assert set(result.changed) == keys("100.64.0.11/32")
    assert fake.state.elements["throttle4_32"] == {}
    assert fake.view["mode4_32"]["100.64.0.11"] == "goto notice"
    assert sets(fake.state) == desired_elements(decisions)


def test_mode_change_to_notice_moves_the_redirect_element(rec, fake):
    decisions = synced(rec, fake)
    decisions["C-1"] = restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56", mode=Mode.NOTICE)
    result = rec.sync_all(decisions)
    assert result.kind == "partial"
    (tx,) = fake.transactions
    deletes = {(op.container, op.keys) for op in ops(tx) if isinstance(op, DeleteElements)}
    adds = {(op.container, op.items) for op in ops(tx) if isinstance(op, AddElements)}
    assert deletes == {("portal4_32", ("100.64.0.10",)), ("portal6_56", ("2001:db8:10:100::",))}
    assert adds == {("notice4_32", (("100.64.0.10", None),)), ("notice6_56", (("2001:db8:10:100::", None),))}
    assert len(ops(tx)) == 4 and result.elements == 4
    # every delete comes before any add, so the kernel never sees the same key twice
    last_delete = max(i for i, op in enumerate(ops(tx)) if isinstance(op, DeleteElements))
    first_add = min(i for i, op in enumerate(ops(tx)) if isinstance(op, AddElements))
    assert last_delete < first_add
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56")
    assert fake.view["mode4_32"]["100.64.0.10"] == "goto notice"
    assert "100.64.0.10" not in fake.state.elements["portal4_32"]


def test_nothing_changed_means_empty_diff(rec, fake):
    decisions = synced(rec, fake)
    before = fake.state.copy()
    result = rec.sync_all(decisions)
    assert result.kind == "partial"
    assert result.elements == 0
    assert set(result.changed) == set()
    assert all(not tx for tx in fake.transactions)
    assert fake.state == before


def test_sync_all_with_read_kernel_on_unchanged_kernel_is_empty(rec, fake):
    decisions = synced(rec, fake)
    result = rec.sync_all(decisions, read_kernel=True)
    assert (result.kind, result.elements, result.changed) == ("partial", 0, [])


# -- small updates --------------------------------------------------------------------------

def test_update_one_subscriber_is_a_tiny_transaction(rec, fake):
    synced(rec, fake)
    result = rec.update({"C-5": restricted("C-5", "100.64.0.50")})
    assert result.kind == "partial"
    assert result.elements == 1
    (tx,) = fake.transactions
    assert ops(tx) == [AddElements("portal4_32", (("100.64.0.50", None),))]
    assert set(result.changed) == keys("100.64.0.50/32")
    assert tx.render().splitlines()[0] == "add element inet walled_garden portal4_32 { 100.64.0.50 }"
    assert fake.view["mode4_32"]["100.64.0.50"] == "goto garden"


def test_update_lift_deletes(rec, fake):
    decisions = synced(rec, fake)
    result = rec.update({"C-1": free("C-1")})
    assert result.elements == 2
    (tx,) = fake.transactions
    assert sorted(ops(tx), key=lambda o: o.container) == [DeleteElements("portal4_32", ("100.64.0.10",)),
                                                         DeleteElements("portal6_56", ("2001:db8:10:100::",))]
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56")
    decisions["C-1"] = free("C-1")
    assert sets(fake.state) == desired_elements(decisions)
    assert "C-1" not in rec.owned


def test_update_mode_change(rec, fake):
    decisions = synced(rec, fake)
    result = rec.update({"C-2": restricted("C-2", "100.64.0.11", mode=Mode.THROTTLE)})
    (tx,) = fake.transactions
    assert ops(tx) == [AddElements("throttle4_32", (("100.64.0.11", None),))]
    assert set(result.changed) == keys("100.64.0.11/32")
    assert fake.view["mode4_32"]["100.64.0.11"] == "goto throttle"
    assert rec.update({"C-2": free("C-2")}).elements == 2  # the notice and throttle set elements
    assert fake.state.elements["notice4_32"] == {} and fake.state.elements["throttle4_32"] == {}
    # walled garden → throttle moves the key between sets, deletes before adds
    fake.transactions.clear()
    throttled = restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56", mode=Mode.THROTTLE)
    result = rec.update({"C-1": throttled})
    (tx,) = fake.transactions
    assert [type(op) for op in ops(tx)] == [DeleteElements] * 2 + [AddElements] * 4
    assert {(op.container, op.keys) for op in ops(tx)[:2]} == {("portal4_32", ("100.64.0.10",)),
                                                                     ("portal6_56", ("2001:db8:10:100::",))}
    assert {(op.container, op.items) for op in ops(tx)[2:]} == {
        ("notice4_32", (("100.64.0.10", None),)), ("throttle4_32", (("100.64.0.10", None),)),
        ("notice6_56", (("2001:db8:10:100::", None),)), ("throttle6_56", (("2001:db8:10:100::", None),))}
    assert set(result.changed) == keys("100.64.0.10/32", "2001:db8:10:100::/56")
    decisions.update({"C-1": throttled, "C-2": free("C-2")})
    assert sets(fake.state) == desired_elements(decisions)


def test_update_address_change(rec, fake):
    decisions = synced(rec, fake)
    new = restricted("C-2", "100.64.0.12", mode=Mode.NOTICE)
    result = rec.update({"C-2": new})
    assert set(result.changed) == keys("100.64.0.11/32", "100.64.0.12/32")
    decisions["C-2"] = new
    assert sets(fake.state) == desired_elements(decisions)


def test_update_nothing_changed(rec, fake):
    synced(rec, fake)
    result = rec.update({"C-1": INITIAL["C-1"], "C-3": free("C-3"), "C-9": free("C-9")})
    assert (result.elements, result.changed) == (0, [])
    assert all(not tx for tx in fake.transactions)


def test_update_then_sync_all_agree(rec, fake):
    decisions = synced(rec, fake)
    rec.update({"C-5": restricted("C-5", "100.64.0.50")})
    rec.update({"C-1": free("C-1")})
    decisions.update({"C-5": restricted("C-5", "100.64.0.50"), "C-1": free("C-1")})
    fake.transactions.clear()
    result = rec.sync_all(decisions)
    assert (result.kind, result.elements, result.changed) == ("partial", 0, [])
    assert sets(fake.state) == desired_elements(decisions)


def test_update_before_any_full_sync_is_refused(rec):
    with pytest.raises(DataplaneError):
        rec.update({"C-1": INITIAL["C-1"]})


def test_new_prefix_length_needs_a_full_sync(rec, fake):
    decisions = synced(rec, fake)
    wide = restricted("C-6", "100.64.7.0/24")
    with pytest.raises(NeedsFullSync):
        rec.update({"C-6": wide})
    assert fake.transactions == []
    decisions["C-6"] = wide
    result = rec.sync_all(decisions)
    assert result.kind == "full"
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable)
    assert (4, 24) in tx.operations[0].layout.prefixes
    text = tx.render()
    assert "set portal4_24 { type ipv4_addr; }" in text
    assert "ip saddr & 255.255.255.0 @portal4_24 goto garden" in text
    assert "add element inet walled_garden portal4_24 { 100.64.7.0 }" in text
    assert "mode4_24" not in text and "vmap" not in text
    assert fake.state.layout_tag == tx.operations[0].layout.tag
    assert sets(fake.state) == desired_elements(decisions)
    # only the new subscriber's enforcement changed: the atomic replace kept everyone else as is
    assert set(result.changed) == keys("100.64.7.0/24")
    # and now diffs work for /24 too
    fake.transactions.clear()
    assert rec.update({"C-7": restricted("C-7", "100.64.8.0/24")}).kind == "partial"


def test_address_conflict_in_update(rec, fake):
    synced(rec, fake)
    with pytest.raises(AddressConflict, match="C-1"):
        rec.update({"C-8": restricted("C-8", "100.64.0.10")})
    assert fake.transactions == []
    assert "C-8" not in rec.owned


def test_address_conflict_within_one_update_batch(rec, fake):
    synced(rec, fake)
    try:
        rec.update({"A": restricted("A", "100.64.0.99"), "B": restricted("B", "100.64.0.99")})
    except AddressConflict:
        return
    rec.update({"A": free("A")})
    # B is still restricted, so its address must still be in the kernel
    assert fake.view["mode4_32"].get("100.64.0.99") == "goto garden"


def test_address_conflict_in_sync_all_enforces_the_first_holder_only(rec, fake):
    decisions = {"A": restricted("A", "100.64.0.10"), "B": restricted("B", "100.64.0.10", mode=Mode.NOTICE)}
    result = rec.sync_all(decisions)
    assert fake.view["mode4_32"] == {"100.64.0.10": "goto garden"}
    assert fake.state.elements["notice4_32"] == {}
    assert set(rec.owned) == {"A"}
    assert set(result.changed) == keys("100.64.0.10/32")


# -- restarts -------------------------------------------------------------------------------

def test_restart_over_matching_kernel_is_a_partial_diff(fake):
    desired = {
        "A": restricted("A", "100.64.0.1"),                          # already right in the kernel
        "C": restricted("C", "100.64.0.3"),                          # missing from the kernel
        "D": restricted("D", "2001:db8:40::/64", mode=Mode.THROTTLE),  # kernel has notice
        "E": free("E"),
    }
    fake.state = kernel_state(portal4_32={"100.64.0.1": None, "100.64.0.2": None},  # B: no longer wanted
                              notice6_64={"2001:db8:40::": None})

    rec = Reconciler(fake, BASE)  # a new daemon: no mirror yet
    result = rec.sync_all(desired, read_kernel=True)

    assert result.kind == "partial"
    (tx,) = fake.transactions
    assert not any(isinstance(op, ReplaceTable) for op in tx.operations)
    assert fake.state.layout_tag == BASE.tag
    assert sets(fake.state) == desired_elements(desired)
    assert set(result.changed) == keys("100.64.0.2/32", "100.64.0.3/32", "2001:db8:40::/64")
    assert sorted(ops(tx), key=lambda o: o.container) == [
        DeleteElements("portal4_32", ("100.64.0.2",)),      # B
        AddElements("portal4_32", (("100.64.0.3", None),)),  # C
        AddElements("throttle6_64", (("2001:db8:40::", None),)),  # D: notice → throttle, stays in notice
    ]
    assert result.elements == 3
    # and the reconciler is ready for diffs straight away
    assert rec.update({"A": free("A")}).elements == 1


def test_restart_without_read_kernel_flag_still_reads_the_kernel_first(fake):
    fake.state = kernel_state(portal4_32={"100.64.0.1": None})
    result = Reconciler(fake, BASE).sync_all({"A": restricted("A", "100.64.0.1")})
    assert (result.kind, result.elements, result.changed) == ("partial", 0, [])


def test_restart_over_other_layout_replaces_the_table_once(fake):
    # e.g. an older release's table, which still had a verdict map beside the sets
    kernel = TableState("0123456789abcdef", {"mode4_32": {"100.64.0.1": "goto garden", "100.64.0.2": "goto notice"},
                                             "portal4_32": {"100.64.0.1": None},
                                             "notice4_32": {"100.64.0.2": None}})
    fake.state = kernel
    desired = {"A": restricted("A", "100.64.0.1"), "C": restricted("C", "100.64.0.3")}
    result = Reconciler(fake, BASE).sync_all(desired, read_kernel=True)
    assert result.kind == "full"
    assert len(fake.transactions) == 1
    (tx,) = fake.transactions
    assert sum(isinstance(op, ReplaceTable) for op in tx.operations) == 1
    assert isinstance(tx.operations[0], ReplaceTable)
    assert fake.state.layout_tag == BASE.tag
    assert sets(fake.state) == desired_elements(desired)
    # A stayed restricted through the atomic replace; B lost and C gained a restriction
    assert set(result.changed) == keys("100.64.0.2/32", "100.64.0.3/32")


def test_restart_with_no_table_in_the_kernel(fake):
    assert fake.read() is None
    result = Reconciler(fake, BASE).sync_all({"A": restricted("A", "100.64.0.1")}, read_kernel=True)
    assert result.kind == "full"
    assert set(result.changed) == keys("100.64.0.1/32")


# -- failures -------------------------------------------------------------------------------

def test_failed_transaction_changes_nothing_and_requires_a_full_sync(rec, fake):
    decisions = synced(rec, fake)
    before = fake.state.copy()
    fake.fail_next = "Error: Could not process rule: No buffer space available"
    decisions["C-4"] = restricted("C-4", "100.64.0.40")
    with pytest.raises(DataplaneError, match="No buffer space"):
        rec.sync_all(decisions)
    assert rec.needs_full
    assert fake.state == before
    with pytest.raises(DataplaneError):
        rec.update({"C-5": restricted("C-5", "100.64.0.50")})
    assert fake.state == before
    # the next sync converges
    result = rec.sync_all(decisions, read_kernel=True)
    assert not rec.needs_full
    assert set(result.changed) == keys("100.64.0.40/32")
    assert sets(fake.state) == desired_elements(decisions)


def test_failed_update_changes_nothing(rec, fake):
    synced(rec, fake)
    before = fake.state.copy()
    owned = dict(rec.owned)
    fake.fail_next = "boom"
    with pytest.raises(DataplaneError, match="boom"):
        rec.update({"C-1": free("C-1")})
    assert rec.needs_full
    assert fake.state == before
    assert rec.owned == owned
    assert rec.sync_all(dict(INITIAL, **{"C-1": free("C-1")})).elements == 2


def test_failed_first_sync_then_retry(rec, fake):
    fake.fail_next = "boom"
    with pytest.raises(DataplaneError):
        rec.sync_all(INITIAL)
    assert fake.state is None and rec.needs_full
    assert rec.sync_all(INITIAL).kind == "full"
    assert sets(fake.state) == desired_elements(INITIAL)


def test_kernel_drift_is_repaired_by_reading_the_kernel(rec, fake):
    """Someone deleted an element by hand: the mirror is stale, the diff fails, a re-read fixes it."""
    decisions = synced(rec, fake)
    del fake.state.elements["notice4_32"]["100.64.0.11"]
    decisions["C-2"] = free("C-2")
    with pytest.raises(DataplaneError):
        rec.sync_all(decisions)
    assert rec.needs_full
    rec.sync_all(decisions, read_kernel=True)
    assert sets(fake.state) == desired_elements(decisions)


# -- host allow -----------------------------------------------------------------------------

def test_host_allow_addresses(rec, fake):
    rec.set_host_allow(["198.51.100.7", "2001:db8::80"])  # before the first sync: kept for it
    rec.sync_all(INITIAL)
    assert fake.state.elements["allowhost4"] == {"198.51.100.7": None}
    assert fake.state.elements["allowhost6"] == {"2001:db8::80": None}
    fake.transactions.clear()
    rec.set_host_allow(["198.51.100.8", "2001:db8::80"])
    (tx,) = fake.transactions
    assert ops(tx) == [DeleteElements("allowhost4", ("198.51.100.7",)),
                       AddElements("allowhost4", (("198.51.100.8", None),))]
    assert rec.sync_all(INITIAL).elements == 0


# -- rendering --------------------------------------------------------------------------------

def test_transactions_render_as_nft_syntax(rec, fake):
    rec.sync_all({"C-1": restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56")})
    rec.sync_all({"C-1": restricted("C-1", "100.64.0.10", "2001:db8:10:100::/56", mode=Mode.NOTICE)})
    rec.sync_all({})
    text = fake.dump()
    assert text.startswith("add table inet walled_garden\ndelete table inet walled_garden\n"
                           "table inet walled_garden {\n")
    assert "add element inet walled_garden portal4_32 { 100.64.0.10 }\n" in text
    assert "add element inet walled_garden portal6_56 { 2001:db8:10:100:: }\n" in text
    assert "delete element inet walled_garden portal4_32 { 100.64.0.10 }\n" in text
    assert "add element inet walled_garden notice4_32 { 100.64.0.10 }\n" in text
    assert "delete element inet walled_garden notice6_56 { 2001:db8:10:100:: }\n" in text
    for line in text.splitlines():
        if line.startswith(("add element", "delete element")):
            assert line.count("{") == 1 and line.endswith("}")
            assert " mode" not in line and " : " not in line, "only set elements reach the kernel"


def test_transaction_render_and_count():
    tx = Transaction("wg")
    tx.add("mode4_32", [])
    tx.delete("mode4_32", [])
    assert not tx and tx.render() == "" and tx.element_count() == 0
    tx.add("mode4_32", [("100.64.0.1", "goto garden"), ("100.64.0.2", "goto notice")])
    tx.delete("portal4_32", ["100.64.0.3"])
    assert tx.element_count() == 3
    assert tx.render() == ("add element inet wg mode4_32 { 100.64.0.1 : goto garden, 100.64.0.2 : goto notice }\n"
                           "delete element inet wg portal4_32 { 100.64.0.3 }\n")


def test_changed_networks_helper():
    before = {"mode4_32": {"100.64.0.1": "goto garden", "100.64.0.2": "goto garden"},
              "portal4_32": {"100.64.0.9": None}}
    after = {"mode4_32": {"100.64.0.1": "goto garden", "100.64.0.2": "goto notice"},
             "mode6_56": {"2001:db8:10:100::": "goto garden"}}
    assert changed_networks(before, after) == keys("100.64.0.2/32", "2001:db8:10:100::/56")


# -- the fake keeps the kernel's rules ----------------------------------------------------------

def test_fake_refuses_what_the_kernel_refuses(fake):
    tx = Transaction(TABLE)
    tx.add("portal4_32", [("100.64.0.1", None)])
    with pytest.raises(DataplaneError):
        fake.apply(tx)  # no table yet
    full = Transaction(TABLE)
    full.replace_table(BASE)
    full.add("portal4_32", [("100.64.0.1", None)])
    fake.apply(full)
    for bad in (DeleteElements("portal4_32", ("100.64.0.2",)),            # no such element
                AddElements("portal4_24", (("100.64.0.0", None),)),       # no such set in this layout
                AddElements("mode4_32", (("100.64.0.5", "goto garden"),))):  # the mode view is not in the kernel
        before = fake.state.copy()
        with pytest.raises(DataplaneError):
            fake.apply(Transaction(TABLE, [AddElements("portal4_32", (("100.64.0.5", None),)), bad]))
        assert fake.state == before  # all or nothing


def test_mode_view_is_derived_from_the_sets():
    """The inverse of the elements a decision puts in the kernel: what a restart reads back."""
    state = kernel_state(portal4_32={"100.64.0.1": None}, notice4_32={"100.64.0.2": None, "100.64.0.3": None},
                         throttle4_32={"100.64.0.3": None}, notice6_56={"2001:db8:10:100::": None})
    view = with_mode_view(state)
    assert view.layout_tag == BASE.tag
    assert view.elements["mode4_32"] == {"100.64.0.1": "goto garden", "100.64.0.2": "goto notice",
                                         "100.64.0.3": "goto throttle"}
    assert view.elements["mode6_56"] == {"2001:db8:10:100::": "goto notice"}
    assert view.elements["mode6_128"] == {}
    assert {k: v for k, v in view.elements.items() if not k.startswith("mode")} == state.elements
    assert with_mode_view(None) is None


def test_changed_lists_each_network_once(rec, fake):
    """``changed`` is a list (no hashing on the 100k path); it must still hold no duplicates."""
    d = {"A": restricted("A", "100.64.0.1", "2001:db8:1::/64"), "B": restricted("B", "100.64.0.2")}
    result = rec.sync_all(d)
    assert len(result.changed) == len(set(result.changed)) == 3


def test_acknowledge_adds_expiring_elements_outside_the_mirror(rec, fake):
    decisions = synced(rec, fake)
    sub = restricted("N", "100.64.0.20", "2001:db8:20::/64", mode=Mode.NOTICE)
    decisions["N"] = sub
    rec.sync_all(decisions)
    rec.acknowledge(sub, 3600)
    text = fake.transactions[-1].render()
    assert "add element inet walled_garden noticeack4_32 { 100.64.0.20 timeout 3600s }" in text
    assert "add element inet walled_garden noticeack6_64 { 2001:db8:20:: timeout 3600s }" in text
    # a later full diff leaves acknowledgements alone (the kernel expires them)
    fake.transactions.clear()
    result = rec.sync_all(decisions, read_kernel=True)
    assert result.elements == 0 and fake.state.elements["noticeack4_32"] == {"100.64.0.20": None}


_MODES = [Mode.WALLED_GARDEN, Mode.NOTICE, Mode.THROTTLE, Mode.FREE]


@pytest.mark.parametrize("seed", range(40))
def test_grouped_desired_state_equals_the_exact_pass(seed: int) -> None:
    """The bulk path (``_desired``) and the per-subscriber pass agree on elements, owners,
    changed addresses and prefix lengths, with or without a previous state and clashes."""
    import random

    rng = random.Random(seed)
    pool = [f"100.64.{i // 250}.{i % 250}" for i in range(60)] + [f"2001:db8:{i}::/56" for i in range(20)] \
        + ["198.51.100.0/30", "198.51.100.4/30"]
    clash = seed % 4 == 0            # a quarter of the cases claim some address twice

    def decisions() -> dict[str, Decision]:
        out: dict[str, Decision] = {}
        free_pool = rng.sample(pool, len(pool))
        for i in range(30):
            mode = rng.choice(_MODES)
            take = [free_pool.pop() for _ in range(rng.randint(1, 2)) if free_pool]
            if clash and i % 7 == 3:
                take.append(rng.choice(pool))
            if not take or mode is Mode.FREE:
                out[f"S-{i}"] = free(f"S-{i}")
            else:
                out[f"S-{i}"] = restricted(f"S-{i}", *dict.fromkeys(take), mode=mode)
        return out

    rec = Reconciler(FakeDataplane(TABLE), BASE)
    rec.host_allow = {"203.0.113.7": None}
    for _ in range(2):
        now = decisions()
        fast = rec._desired(now, _Preferred(now, {}, {}))
        exact = rec._desired_exact(now, _Preferred(now, {}, {}))
        assert fast == exact
        assert clash or not exact.clashes, "without a deliberate clash the fast path itself was compared"


# -- drift: check_kernel ---------------------------------------------------------------------

def test_check_kernel_on_a_matching_kernel_is_empty_both_ways(rec, fake):
    synced(rec, fake)
    assert rec.check_kernel() == "" and rec.check_kernel(full=True) == ""
    assert not rec.needs_full and fake.transactions == []


def test_check_kernel_before_the_first_sync_or_while_a_full_sync_is_due_checks_nothing(rec, fake):
    assert rec.check_kernel() == "" and rec.check_kernel(full=True) == ""
    synced(rec, fake)
    fake.drop_table()
    rec.needs_full = True
    assert rec.check_kernel() == ""


def test_a_flushed_set_is_seen_by_the_cheap_check_and_repaired_by_one_atomic_replace(rec, fake):
    decisions = synced(rec, fake)
    fake.flush_set("portal4_32")
    problem = rec.check_kernel()
    assert problem == "set(s) flushed: portal4_32"
    assert rec.needs_full
    result = rec.sync_all(decisions)
    assert result.kind == "full", "a diff would put the elements back but never the sentinel"
    (tx,) = fake.transactions
    assert isinstance(tx.operations[0], ReplaceTable)
    assert sets(fake.state) == desired_elements(decisions)
    assert rec.check_kernel() == "" and rec.check_kernel(full=True) == ""


def test_a_flushed_empty_set_is_seen_too(rec, fake):
    synced(rec, fake)
    assert fake.state.elements["throttle6_56"] == {}
    fake.flush_set("throttle6_56")
    assert "throttle6_56" in rec.check_kernel()


def test_a_lost_or_replaced_table_is_seen_by_the_cheap_check(rec, fake):
    decisions = synced(rec, fake)
    fake.drop_table()
    assert rec.check_kernel() == "table missing" and rec.needs_full
    rec.sync_all(decisions)
    fake.state.layout_tag = "0123456789abcdef"
    assert rec.check_kernel() == f"layout 0123456789abcdef instead of {rec.layout.tag}"


def test_a_single_deleted_element_is_seen_only_by_the_full_check_and_repaired_by_a_diff(rec, fake):
    decisions = synced(rec, fake)
    fake.drop_element("portal4_32", "100.64.0.10")
    assert rec.check_kernel() == "", "the cheap check sees sets, not elements"
    problem = rec.check_kernel(full=True)
    assert problem == "portal4_32: 1 missing (e.g. 100.64.0.10)"
    assert rec.needs_full
    result = rec.sync_all(decisions)
    assert (result.kind, result.elements) == ("partial", 1)
    assert sets(fake.state) == desired_elements(decisions)


def test_an_element_added_by_someone_else_is_seen_by_the_full_check(rec, fake):
    decisions = synced(rec, fake)
    fake.state.elements["notice6_64"]["2001:db8:99::"] = None
    assert rec.check_kernel(full=True) == "notice6_64: 1 unexpected (e.g. 2001:db8:99::)"
    rec.sync_all(decisions)
    assert sets(fake.state) == desired_elements(decisions)


def test_the_full_check_names_a_missing_set_and_summarises_many(rec, fake):
    synced(rec, fake)
    del fake.state.elements["portal6_56"]
    for name in ("portal4_32", "notice4_32", "portal6_64", "notice6_64", "throttle4_32"):
        fake.flush_set(name)
    problem = rec.check_kernel(full=True)
    assert problem.startswith("portal4_32 flushed; portal4_32: 1 missing (e.g. 100.64.0.10); notice4_32 flushed")
    assert problem.endswith("more") and "portal6_56 missing" not in problem  # summarised, not a wall of text


def test_the_sentinel_never_enters_the_mirror_the_view_or_a_diff(rec, fake):
    synced(rec, fake)
    rec.set_host_allow(["255.255.255.255", "198.51.100.7"])
    assert fake.state.elements["allowhost4"] == {"198.51.100.7": None}
    assert rec.check_kernel(full=True) == ""
