"""The ipset backend's parts that need no kernel (issue 19's review): which set names are ours,
the umbrellas' size, the netlink sequence number, the order of a diff's lines, the size count of
acknowledgements, destroying set by set, tool failures as ``DataplaneError``, the tools a
configuration needs. Every tool call is intercepted (``subprocess.run``), so nothing here runs
``ipset`` or ``iptables``; the kernel side is in ``test_dataplane_conformance.py`` and
``tests/kernel/test_ipset_backend.py``.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from enforcer.config import ConfigError, parse_config
from enforcer.dataplane import ipset as ipset_module
from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.ipset import IpsetDataplane, available
from enforcer.dataplane.ipset_lookup import SetLookup, next_seq
from enforcer.dataplane.ipset_sets import (
    UMBRELLA_KINDS,
    UMBRELLA_SIZE,
    capacity,
    members,
    ours,
    ours_temporary,
    specs,
    temporary,
    umbrella,
)
from enforcer.dataplane.layout import Layout
from enforcer.dataplane.transaction import Transaction

net = ipaddress.ip_network
LAYOUT = Layout("t", ("eth1",), (net("192.0.2.0/24"),), None, 8080).with_prefixes({(4, 24), (6, 56)})
Reply = Callable[[list[str], str | None], tuple[int, str, str]]


class Tools:
    """Stands in for every tool the backend spawns: records argv and stdin, answers with ``reply``."""

    def __init__(self, reply: Reply | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.reply = reply or (lambda argv, data: (0, "", ""))

    def __call__(self, argv: list[str], input: str | None = None, **kwargs: object
                 ) -> subprocess.CompletedProcess[str]:
        data = input
        self.calls.append((argv, data))
        code, out, err = self.reply(argv, data)
        return subprocess.CompletedProcess(argv, code, out, err)

    def restores(self) -> list[list[str]]:
        return [(data or "").splitlines() for argv, data in self.calls if argv[:2] == ["ipset", "restore"]]


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch) -> Tools:
    fake = Tools()
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.setattr(ipset_module, "keep_big_blocks_apart", lambda: None)
    return fake


# -- 1. only names we generate ------------------------------------------------------------------

def test_every_name_the_layout_generates_is_ours_and_nothing_else() -> None:
    wide = LAYOUT.with_prefixes({(4, plen) for plen in range(33)} | {(6, plen) for plen in range(129)})
    generated = set(specs(wide))
    assert all(ours(name) and ours_temporary(temporary(name)) for name in generated)
    assert {umbrella(kind, version) for kind in UMBRELLA_KINDS for version in (4, 6)} <= generated
    for name in ("walled-peers", "walled-portal4-33", "walled-portal6-129", "walled-portal5-24",
                 "walled-portal4-024", "walled-portal4-", "walled-allow", "walled-layouttag2", "walled-foo4",
                 "wg-portal4-32", "walledtmp-peers", "walled-walledtmp-portal4"):
        assert not ours(name) and not ours_temporary(name), name
    assert not ours_temporary("walled-portal4-32") and not ours("walledtmp-portal4-32")


def test_read_takes_only_our_names(tools: Tools) -> None:
    """``ipset save`` is asked for ours alone; an operator's ``walled-peers`` is not read as ours."""
    tools.reply = lambda argv, data: (0, "walled-peers\nwalled-layouttag\nwalled-portal4-32\n", "") \
        if argv[:3] == ["ipset", "list", "-n"] else (0, "", "")
    IpsetDataplane("t", "external", "nft").read()
    saved = next(data for argv, data in tools.calls if argv == ["ipset", "-"])
    assert saved is not None and "walled-peers" not in saved and "save walled-portal4-32" in saved


def test_remove_everything_destroys_only_our_names(tools: Tools) -> None:
    listing = "walled-peers\nwalledtmp-peers\nwalled-portal4\nwalled-portal4-32\nwalledtmp-portal4-32\nwg-x\n"
    tools.reply = lambda argv, data: (0, listing, "") if argv[:3] == ["ipset", "list", "-n"] else (0, "", "")
    IpsetDataplane("t", "own", "nft").remove_everything()
    destroyed = [line.split()[1] for lines in tools.restores() for line in lines]
    assert destroyed == ["walled-portal4", "walled-portal4-32", "walledtmp-portal4-32"], "the umbrella first"


# -- 6. umbrellas hold every IPv6 prefix length ---------------------------------------------------

def test_an_umbrella_holds_a_set_for_every_prefix_length() -> None:
    every = LAYOUT.with_prefixes({(6, plen) for plen in range(129)})
    assert len(members(every, "portal", 6)) == 129 <= UMBRELLA_SIZE
    assert f"list:set size {UMBRELLA_SIZE}" in specs(every)[umbrella("portal", 6)].create("x", 0)


# -- 8. the netlink sequence number wraps -----------------------------------------------------------

class _AckingSocket:
    """A netlink socket that acknowledges each request (error 0) with its sequence number."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        seq = struct.unpack_from("=I", self.sent[-1], 8)[0]
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", 0) + self.sent[-1][:16]

    def close(self) -> None:
        pass


def test_the_sequence_number_wraps() -> None:
    assert next_seq(0) == 1 and next_seq(41) == 42
    assert next_seq(0xFFFFFFFF) == 1, "32 bits, never 0"
    lookup = SetLookup()
    fake = _AckingSocket()
    lookup._sock = fake   # type: ignore[assignment]
    lookup._seq = 0xFFFFFFFE
    for _ in range(3):   # struct.error ("argument out of range") on the second without the wrap
        assert lookup.holds("walled-portal4-32", "100.64.1.10") is True
    assert [struct.unpack_from("=I", data, 8)[0] for data in fake.sent] == [0xFFFFFFFF, 1, 2]
    assert lookup.holds_member("walled-portal4", "walled-portal4-32") is True


def test_a_member_test_names_the_member_set() -> None:
    lookup = SetLookup()
    fake = _AckingSocket()
    lookup._sock = fake   # type: ignore[assignment]
    lookup.holds_member("walled-portal4", "walled-portal4-32")
    assert b"walled-portal4\0" in fake.sent[0] and b"walled-portal4-32\0" in fake.sent[0]
    assert fake.sent[0][16] == socket.AF_INET


# -- 3. a moved subscriber is never in neither set ------------------------------------------------

def _room(dataplane: IpsetDataplane, *names: str) -> None:
    """Sizes known and far from full: ``_make_room`` asks nothing."""
    for name in names:
        dataplane._sizes[name] = (10, 65536)


def test_a_diff_writes_its_additions_before_its_deletions(tools: Tools) -> None:
    dataplane = IpsetDataplane("t", "own", "nft")
    _room(dataplane, "walled-portal4-32", "walled-notice4-32", "walled-throttle4-32")
    tx = Transaction("t")
    tx.delete("portal4_32", ["100.64.1.10"])          # walled garden → notice, as the reconciler writes it
    tx.add("notice4_32", [("100.64.1.10", None)])
    tx.delete("throttle4_32", ["100.64.1.11"])
    tx.add("portal4_32", [("100.64.1.11", None)])
    dataplane.apply(tx)
    assert tools.restores() == [["add walled-notice4-32 100.64.1.10", "add walled-portal4-32 100.64.1.11",
                                 "del walled-portal4-32 100.64.1.10", "del walled-throttle4-32 100.64.1.11"]]
    assert dataplane._sizes["walled-portal4-32"] == (10, 65536), "one in, one out"
    assert dataplane._sizes["walled-notice4-32"] == (11, 65536)


def test_an_element_deleted_and_added_again_keeps_that_order(tools: Tools) -> None:
    dataplane = IpsetDataplane("t", "own", "nft")
    _room(dataplane, "walled-portal4-32")
    tx = Transaction("t")
    tx.delete("portal4_32", ["100.64.1.10"])
    tx.add("portal4_32", [("100.64.1.10", None), ("100.64.1.12", None)])
    dataplane.apply(tx)
    assert tools.restores() == [["add walled-portal4-32 100.64.1.12", "del walled-portal4-32 100.64.1.10",
                                 "add walled-portal4-32 100.64.1.10"]]


def test_a_failed_line_undoes_the_lines_before_it_whatever_their_order(tools: Tools) -> None:
    dataplane = IpsetDataplane("t", "own", "nft")
    _room(dataplane, "walled-portal4-32", "walled-notice4-32")
    failure = "ipset v7.17: Error in line 3: Element cannot be deleted from the set: it's not added"
    tools.reply = lambda argv, data: (1, "", failure) if len(tools.calls) == 1 else (0, "", "")
    tx = Transaction("t")
    tx.delete("portal4_32", ["100.64.1.10", "100.64.1.11"])
    tx.add("notice4_32", [("100.64.1.10", None), ("100.64.1.11", None)])
    with pytest.raises(DataplaneError, match="not added"):
        dataplane.apply(tx)
    applied, undone = tools.restores()
    assert applied[:3] == ["add walled-notice4-32 100.64.1.10", "add walled-notice4-32 100.64.1.11",
                           "del walled-portal4-32 100.64.1.10"]
    assert undone == ["del walled-notice4-32 100.64.1.11", "del walled-notice4-32 100.64.1.10"], \
        "line 3 failed: lines 2 and 1 undone, in that order"
    assert dataplane._sizes == {}, "read back after a failure"


# -- 7. acknowledgement refreshes do not inflate the size -----------------------------------------

def test_acknowledgement_refreshes_are_not_counted_as_growth(tools: Tools) -> None:
    """An ack set near its maxelem: refreshing the same element again and again never grows it
    (each refresh counted +1 did, needlessly: a save and a copy of the whole set)."""
    header = "Header: family inet hashsize 1024 maxelem 65536 timeout 0\nNumber of entries: 65535\n"
    tools.reply = lambda argv, data: ((0, header, "") if argv[:3] == ["ipset", "list", "-t"]
                                      else (0, "walled-noticeack4-32\n", "") if argv[:3] == ["ipset", "list", "-n"]
                                      else (0, "", ""))
    dataplane = IpsetDataplane("t", "own", "nft")
    for _ in range(3):
        tx = Transaction("t")
        tx.add("noticeack4_32", [("100.64.1.10", None)], timeout=600)
        dataplane.apply(tx)
    assert not [argv for argv, _ in tools.calls if argv == ["ipset", "-"]], "no set copied to grow it"
    assert len(tools.restores()) == 3
    assert all(lines == ["add walled-noticeack4-32 100.64.1.10 timeout 600 -exist"] for lines in tools.restores())


def test_acknowledgements_that_do_fill_the_set_grow_it(tools: Tools) -> None:
    """Counting refreshes as nothing must not let new acknowledgements overflow the set: its size
    is read back, and 2 more than room for 1 grows it."""
    header = "Header: family inet hashsize 1024 maxelem 65536 timeout 0\nNumber of entries: 65535\n"
    save = "create walled-noticeack4-32 hash:net family inet hashsize 1024 maxelem 65536 timeout 0\n"
    tools.reply = lambda argv, data: ((0, header, "") if argv[:3] == ["ipset", "list", "-t"]
                                      else (0, "walled-noticeack4-32\n", "") if argv[:3] == ["ipset", "list", "-n"]
                                      else (0, save, "") if argv == ["ipset", "-"] else (0, "", ""))
    dataplane = IpsetDataplane("t", "own", "nft")
    tx = Transaction("t")
    tx.add("noticeack4_32", [("100.64.1.10", None), ("100.64.1.11", None)], timeout=600)
    dataplane.apply(tx)
    grow = tools.restores()[0]
    assert grow[0].startswith("create walledtmp-noticeack4-32 ") and f"maxelem {capacity(65537)}" in grow[0]
    assert grow[-1] == "swap walledtmp-noticeack4-32 walled-noticeack4-32"


# -- 4. destroying goes on past a set that cannot go ----------------------------------------------

def test_destroy_goes_on_past_a_set_in_use(tools: Tools) -> None:
    def reply(argv: list[str], data: str | None) -> tuple[int, str, str]:
        lines = (data or "").splitlines()
        if "destroy walled-portal4-24" in lines:   # as ipset restore: the lines before it are done
            line = lines.index("destroy walled-portal4-24") + 1
            return 1, "", f"ipset v7.17: Error in line {line}: Set cannot be destroyed: it is in use by a kernel " \
                "component"
        return 0, "", ""

    tools.reply = reply
    stayed = IpsetDataplane("t", "own", "nft")._destroy(["walled-portal4-24", "walled-notice4-24", "walled-portal4"])
    assert stayed == ["walled-portal4-24"]
    assert tools.restores() == [["destroy walled-portal4", "destroy walled-portal4-24", "destroy walled-notice4-24"],
                                ["destroy walled-notice4-24"],
                                ["flush walled-portal4-24"],      # what stays is emptied
                                ["destroy walled-portal4-24"]], "the umbrella first, then on past the failure"


def _in_use(kept: set[str], broken_flush: set[str] | None = None) -> Reply:
    """``ipset restore`` as the kernel answers it while rules not ours name ``kept``: their
    ``destroy`` lines fail (the lines before are done), ``flush`` works but on ``broken_flush``."""
    def reply(argv: list[str], data: str | None) -> tuple[int, str, str]:
        if argv[:3] == ["ipset", "list", "-n"]:
            return 0, "walled-portal4\nwalled-portal4-32\nwalled-allow4\nwalled-layouttag\noperator-set\n", ""
        for number, line in enumerate((data or "").splitlines(), 1):
            verb, name = line.split()
            if (verb == "destroy" and name in kept) or (verb == "flush" and name in (broken_flush or set())):
                what = "Set cannot be destroyed: it is in use by a kernel component" if verb == "destroy" else "boom"
                return 1, "", f"ipset v7.17: Error in line {number}: {what}"
        return 0, "", ""
    return reply


def test_a_set_a_rule_not_ours_still_names_is_emptied_not_left_restricting(tools: Tools) -> None:
    """A switch to nftables while the operator's ``rules: external`` lines still name our umbrella
    and allow set: those cannot be destroyed, so they are flushed (an empty set walls nobody), and
    the umbrella's member, held only by the umbrella, goes once the umbrella is empty."""
    kept = {"walled-portal4", "walled-allow4"}
    state: dict[str, set[str]] = {"emptied": set()}

    def reply(argv: list[str], data: str | None) -> tuple[int, str, str]:
        lines = (data or "").splitlines()
        # the member is in use while its umbrella still lists it
        if "walled-portal4" not in state["emptied"] and "destroy walled-portal4-32" in lines:
            index = lines.index("destroy walled-portal4-32")
            if not any(line.split()[1] in kept for line in lines[:index]):
                return 1, "", f"ipset v7.17: Error in line {index + 1}: Set cannot be destroyed: it is in use"
        answer = _in_use(kept)(argv, data)
        if answer[0] == 0:
            state["emptied"].update(line.split()[1] for line in lines if line.startswith("flush "))
        return answer

    tools.reply = reply
    left = IpsetDataplane("t", "own", "nft").remove_everything()
    assert left.emptied == ("walled-portal4", "walled-allow4") and left.not_emptied == () and left
    restores = tools.restores()
    assert restores[-3:] == [["flush walled-portal4", "flush walled-portal4-32", "flush walled-allow4"],
                             ["destroy walled-portal4", "destroy walled-portal4-32", "destroy walled-allow4"],
                             ["destroy walled-portal4-32", "destroy walled-allow4"]], \
        "emptied, then destroyed again: the member goes (line 2 failed: line 1 done)"
    assert not any("operator-set" in line for lines in restores for line in lines)


def test_a_set_that_cannot_even_be_emptied_is_said_so(tools: Tools) -> None:
    tools.reply = _in_use({"walled-portal4"}, broken_flush={"walled-portal4"})
    left = IpsetDataplane("t", "own", "nft").remove_everything()
    assert left.emptied == () and left.not_emptied == ("walled-portal4",)


def test_nothing_left_when_everything_goes(tools: Tools) -> None:
    tools.reply = _in_use(set())
    left = IpsetDataplane("t", "own", "nft").remove_everything()
    assert not left and all(line.startswith("destroy ") for lines in tools.restores() for line in lines)


def test_a_leftover_temporary_is_destroyed_before_a_set_grows(tools: Tools) -> None:
    save = "create walled-portal4-32 hash:net family inet hashsize 1024 maxelem 2\nadd walled-portal4-32 1.2.3.4\n"
    tools.reply = lambda argv, data: ((0, "walled-portal4-32\nwalledtmp-portal4-32\n", "")
                                      if argv[:3] == ["ipset", "list", "-n"]
                                      else (0, save, "") if argv == ["ipset", "-"] else (0, "", ""))
    dataplane = IpsetDataplane("t", "own", "nft")
    dataplane._sizes["walled-portal4-32"] = (2, 2)
    tx = Transaction("t")
    tx.add("portal4_32", [("100.64.1.10", None)])
    dataplane.apply(tx)
    restores = tools.restores()
    assert restores[0] == ["destroy walledtmp-portal4-32"], "the leftover goes first"
    assert restores[1][0].startswith("create walledtmp-portal4-32 ")


# -- 5. every tool failure is a DataplaneError -----------------------------------------------------

@pytest.mark.parametrize("error", [subprocess.TimeoutExpired(["iptables"], 30), FileNotFoundError(2, "iptables"),
                                   PermissionError(13, "denied")])
def test_a_tool_that_hangs_or_is_missing_is_a_dataplane_error(monkeypatch: pytest.MonkeyPatch,
                                                             error: Exception) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(ipset_module, "keep_big_blocks_apart", lambda: None)
    dataplane = IpsetDataplane("t", "own", "nft")
    monkeypatch.setattr(subprocess, "run", broken)
    calls: list[Callable[[], object]] = [
        lambda: dataplane._rules_hold("x rules y"),
        lambda: dataplane._rules_hold("x rules y", LAYOUT),
        lambda: dataplane._install_rules(LAYOUT),
        lambda: dataplane.read(),
        lambda: dataplane.layout_tag(),
        lambda: dataplane.apply(_replace_tx()),
        lambda: dataplane.apply(Transaction("t", _replace_tx().operations[1:])),
    ]
    for call in calls:
        with pytest.raises(DataplaneError):
            call()
    dataplane.remove_everything()   # best effort: logs, never raises
    assert dataplane._destroy(["walled-portal4-32"]) == ["walled-portal4-32"]


def _replace_tx() -> Transaction:
    tx = Transaction("t")
    tx.replace_table(LAYOUT)
    tx.add("portal4_32", [("100.64.1.10", None)])
    return tx


def test_available_asks_for_the_configured_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    present = {"ipset", "iptables", *(f"{b}-nft{t}" for b in ("iptables", "ip6tables") for t in ("", "-save",
                                                                                              "-restore"))}
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}" if name in present else None)
    assert available("own", "nft") == ""
    assert available("own", "legacy").startswith("needs iptables-legacy")
    assert available("external", "legacy") == "", "rules: external runs no iptables"
    monkeypatch.setattr(ipset_module, "iptables_variant", lambda choice: "legacy")
    assert available("own", "auto").startswith("needs iptables-legacy"), "auto: the variant iptables -V names"
    present.discard("ipset")
    assert available("external", "nft").startswith("needs ipset")


def test_a_start_without_the_tools_fails_naming_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from enforcer.daemon import build_dataplane

    monkeypatch.setattr(ipset_module, "available", lambda rules, iptables: f"needs iptables-{iptables}-restore")
    config = parse_config(f"subscribers:\n  source: {tmp_path}/list.csv\n"
                          "gateway:\n  backend: ipset\n  ipset: {iptables: legacy}\n")
    with pytest.raises(ConfigError, match=r"gateway\.backend: ipset needs iptables-legacy-restore"):
        build_dataplane(config)


def test_a_live_element_is_compared_as_element_writes_it() -> None:
    """``ipset save`` spells an IPv4-mapped IPv6 address with dots; a full sync comparing it with
    Python's spelling would take it as entering and fail adding it again."""
    from enforcer.dataplane.ipset import _as_written
    from enforcer.dataplane.ipset_sets import element

    assert _as_written("::ffff:1.2.3.4") == element("portal6_128", str(ipaddress.ip_address("::ffff:1.2.3.4")))
    assert _as_written("::ffff:1.2.3.0/120") == element("portal6_120", str(ipaddress.ip_address("::ffff:1.2.3.0")))
    assert [_as_written(text) for text in ("100.64.1.10", "100.64.7.0/24", "2001:db8::/64")] == \
        ["100.64.1.10", "100.64.7.0/24", "2001:db8::/64"]
