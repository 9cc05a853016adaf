"""``Dataplane.structure`` on every backend (``test_dataplane_conformance.py``'s fixture: the fake,
nftables in a namespace of its own, the ipset backend with iptables-nft and iptables-legacy):
element changes never move the fingerprint, a reinstall of the same layout gives the same one,
a rule deleted, the table made dormant or a jump deleted by hand moves it and says where, and a
reinstall restores it. On a machine with root these run against the real kernel; in CI a missing
tool fails (the fixture's rule), never skips.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
from test_dataplane_conformance import (  # noqa: F401 (``backend`` is the fixture)
    LAYOUT,
    TABLE,
    FakeOutside,
    IpsetOutside,
    KernelOutside,
    backend,
    install,
)

from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import TAG_SET, tag_address
from enforcer.dataplane.state import describe
from enforcer.dataplane.transaction import Transaction


def _ipset_tool(dp: Any, outside: IpsetOutside, *argv: str) -> None:
    tool = f"{argv[0]}-{dp._inner.variant}"
    subprocess.run(["ip", "netns", "exec", outside.k.netns, tool, *argv[1:]], check=True, timeout=30,
                   capture_output=True)


def _forward_handles(outside: KernelOutside) -> list[int]:
    listed = outside.k._call(lambda: outside.k._inner._nft.run_json(f"list chain inet {TABLE} forward"))
    return [obj["rule"]["handle"] for obj in listed["nftables"] if "rule" in obj]


def delete_rule(dp: Any, outside: Any) -> str:
    """The jump into the per-subscriber chain deleted (what frees every restricted subscriber);
    returns the name of the part that changed."""
    if isinstance(outside, FakeOutside):
        fake: FakeDataplane = outside.drop_table.__self__   # type: ignore[attr-defined]
        fake.delete_rule("forward")
        return "chain forward"
    if isinstance(outside, KernelOutside):
        handle = _forward_handles(outside)[1]   # after the to_subscriber jump: iifname ... jump from_subscriber
        outside.k.nft(f"delete rule inet {TABLE} forward handle {handle}")
        return "chain forward"
    _ipset_tool(dp, outside, "iptables", "-D", "WALLED-GARDEN-FWD", "-i", "eth1", "-j", "WALLED-GARDEN-UP")
    return "chain WALLED-GARDEN-FWD ipv4"


def switch_off(dp: Any, outside: Any) -> str:
    """The table made dormant (nftables, the fake) or our FORWARD jump deleted (ipset)."""
    if isinstance(outside, FakeOutside):
        outside.drop_table.__self__.make_dormant()   # type: ignore[attr-defined]
        return "table made dormant"
    if isinstance(outside, KernelOutside):
        outside.k.nft(f"add table inet {TABLE} {{ flags dormant; }}")
        return "table made dormant"
    _ipset_tool(dp, outside, "ip6tables", "-D", "FORWARD", "-j", "WALLED-GARDEN-FWD")
    return "jump FORWARD->WALLED-GARDEN-FWD ipv6"


def test_elements_never_move_the_structure_and_a_reinstall_gives_the_same(backend) -> None:  # noqa: F811
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10"])
    first = dp.structure(LAYOUT)
    assert first is not None and len(first.fingerprint) == 16
    expected = dp.expected_structure(LAYOUT)
    if isinstance(outside, KernelOutside):
        assert expected == "", "nftables: known only by reading our install back"
        assert first.parts["table"] and first.rules["forward"] == 2 and not first.dormant
    else:
        assert expected == first.fingerprint, "the render says what an untouched install holds"
    tx = Transaction(TABLE)
    tx.add("portal4_32", [("100.64.1.11", None)])
    tx.add("allowhost4", [("203.0.113.7", None)])
    tx.delete("portal4_32", ["100.64.1.10"])
    tx.add("noticeack4_32", [("100.64.1.12", None)], timeout=60)
    dp.apply(tx)
    outside.saw_caller("100.64.1.11")
    assert dp.structure(LAYOUT).fingerprint == first.fingerprint
    install(dp, portal4_32=["100.64.1.10"])
    assert dp.structure(LAYOUT).fingerprint == first.fingerprint, "the same layout installed again"


@pytest.mark.parametrize("damage", [delete_rule, switch_off])
def test_a_hand_change_moves_the_fingerprint_says_where_and_a_reinstall_restores_it(backend, damage) -> None:  # noqa: F811
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10"])
    reference = dp.structure(LAYOUT)
    part = damage(dp, outside)
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) or not isinstance(outside, (FakeOutside, KernelOutside)), \
        "nftables: every element, sentinel and tag still there: only the structure shows it"
    now = dp.structure(LAYOUT)
    assert now is not None and now.fingerprint != reference.fingerprint
    assert part in describe(reference, now), describe(reference, now)
    install(dp, portal4_32=["100.64.1.10"])
    assert dp.structure(LAYOUT).fingerprint == reference.fingerprint


def test_no_table_no_structure(backend) -> None:  # noqa: F811
    dp, outside = backend
    assert dp.structure(LAYOUT) is None
    install(dp)
    outside.drop_table()
    assert dp.structure(LAYOUT) is None


def test_the_mark_rides_on_the_tag_element(backend) -> None:  # noqa: F811
    """``MarkStructure`` (nftables and the fake; the ipset backend never needs it): the tag's
    element gets the fingerprint as its comment, the element itself stays where it was."""
    dp, outside = backend
    if isinstance(outside, IpsetOutside):   # known from the render: the reconciler never marks it
        install(dp)
        assert dp.expected_structure(LAYOUT) == dp.structure(LAYOUT).fingerprint
        return
    install(dp)
    assert dp.structure(LAYOUT).marked == ""
    tx = Transaction(TABLE)
    tx.mark_structure(LAYOUT.tag, "0123456789abcdef")
    dp.apply(tx)
    now = dp.structure(LAYOUT)
    assert now.marked == "0123456789abcdef"
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) and dp.layout_tag() == LAYOUT.tag
    state = dp.read()
    assert state is not None and set(state.elements[TAG_SET]) == {tag_address(LAYOUT.tag)}, "keys only, no new one"
    install(dp)
    assert dp.structure(LAYOUT).marked == "", "a new table: no mark until ours"


def test_the_structure_is_read_without_the_elements(backend) -> None:  # noqa: F811
    """The reading costs the same whatever the subscriber sets hold (nftables: netlink dumps of
    the table's own objects; ``nft -t list table`` would load every element first)."""
    dp, outside = backend

    def cost() -> float:
        started = time.perf_counter()
        for _ in range(5):
            dp.structure(LAYOUT)
        return (time.perf_counter() - started) / 5

    install(dp)
    empty, reference = cost(), dp.structure(LAYOUT)
    install(dp, portal4_32=[f"100.64.{i // 250}.{i % 250 + 1}" for i in range(20000)])
    assert dp.structure(LAYOUT).fingerprint == reference.fingerprint
    if isinstance(outside, KernelOutside):   # the others: a process per table (ipset), or memory (fake)
        full = cost()
        assert full < max(5 * empty, 0.05), (empty, full)

