"""The ``Dataplane`` Protocol, one set of checks for both implementations.

Every check runs against ``FakeDataplane`` (strict: ``callers_seen_by_default=False``) and, when
root with libnftables, against ``KernelDataplane`` in a network namespace of its own (created and
removed here; every kernel call runs on one thread that entered it, as the daemon's kernel thread
does), and when root with ipset and iptables, against ``IpsetDataplane`` (``gateway.backend:
ipset``, its own rules, with iptables-nft and iptables-legacy) the same way. What the fake
answers, the kernels answer, so unit tests on the fake mean something. The one difference, by
design: ipset has no ruleset generation, so the ipset backend never trusts a digest mark
(``test_the_digest_mark_...``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest

from enforcer.dataplane.backend import Dataplane, DataplaneError
from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.layout import CALLER_SET, COUNTERS, Layout
from enforcer.dataplane.state import TableState
from enforcer.dataplane.transaction import Transaction

net = ipaddress.ip_network
TABLE = "wg_conform"
LAYOUT = Layout(TABLE, ("eth1",), (net("192.0.2.0/24"),), None, 8080, portal_tls_port=8443).with_prefixes({(4, 24)})
CLONE_NEWNET = 0x40000000


class Outside(Protocol):
    """What the packet path or another tool does to the table behind the daemon's back."""

    def saw_caller(self, address: str) -> None: ...
    def flush_set(self, name: str) -> None: ...
    def drop_element(self, name: str, key: str) -> None: ...
    def drop_table(self) -> None: ...


class FakeOutside:
    def __init__(self, fake: FakeDataplane) -> None:
        self.saw_caller, self.flush_set = fake.saw_caller, fake.flush_set
        self.drop_element, self.drop_table = fake.drop_element, fake.drop_table


class NamespacedKernel:
    """A ``KernelDataplane`` (or, with ``make``, another backend) whose every call runs on one
    thread inside a private namespace."""

    def __init__(self, netns: str, make: Callable[[], Any] | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=self._enter, initargs=(netns,))
        self._inner: Any = self._call(make or (lambda: __import__("enforcer.dataplane.kernel", fromlist=["x"])
                                               .KernelDataplane(TABLE)))
        self.table = TABLE
        self.netns = netns

    @staticmethod
    def _enter(netns: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def _call(self, fn: Callable[[], Any]) -> Any:
        return self._pool.submit(fn).result(timeout=30)

    def nft(self, commands: str) -> None:
        self._call(lambda: self._inner._nft.run(commands))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        return lambda *args: self._call(lambda: method(*args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class KernelOutside:
    def __init__(self, kernel: NamespacedKernel) -> None:
        self.k = kernel

    def saw_caller(self, address: str) -> None:
        version = ipaddress.ip_address(address).version
        self.k.nft(f"add element inet {TABLE} {CALLER_SET[version]} {{ {address} }}")

    def flush_set(self, name: str) -> None:
        self.k.nft(f"flush set inet {TABLE} {name}")

    def drop_element(self, name: str, key: str) -> None:
        self.k.nft(f"delete element inet {TABLE} {name} {{ {key} }}")

    def drop_table(self) -> None:
        self.k.nft(f"delete table inet {TABLE}")


class IpsetOutside:
    """The same outside acts with the ipset and iptables tools, in the test's namespace."""

    def __init__(self, kernel: NamespacedKernel) -> None:
        self.k = kernel

    def _ipset(self, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.k.netns, "ipset", *args], check=True, timeout=10,
                       capture_output=True)

    def saw_caller(self, address: str) -> None:
        version = ipaddress.ip_address(address).version
        self._ipset("add", f"walled-{CALLER_SET[version]}", address)

    def flush_set(self, name: str) -> None:
        self._ipset("flush", "walled-" + name.replace("_", "-"))

    def drop_element(self, name: str, key: str) -> None:
        from enforcer.dataplane.ipset_sets import element, set_name
        self._ipset("del", set_name(name), element(name, key))

    def drop_table(self) -> None:
        self.k.remove_everything()


def _ipset_available() -> str:
    if os.geteuid() != 0:
        return "needs root"
    for name in ("ip", "ipset", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-legacy-restore"):
        if shutil.which(name) is None:
            return f"needs {name} (Debian packages iproute2, ipset, iptables)"
    return ""


def _kernel_available() -> str:
    """Why the kernel variant cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    from enforcer.dataplane.libnftables import Nftables, NftError
    try:
        Nftables().close()
    except NftError as exc:
        return f"needs libnftables ({exc})"
    return ""


@pytest.fixture(params=["fake", "kernel", "ipset-nft", "ipset-legacy"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[Dataplane, Outside]]:
    if request.param == "fake":
        fake = FakeDataplane(TABLE, callers_seen_by_default=False)
        yield fake, FakeOutside(fake)
        return
    missing = _kernel_available() if request.param == "kernel" else _ipset_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"kernel conformance {missing}: CI refuses to skip")
        pytest.skip(f"kernel conformance {missing}")
    netns = f"wgconf{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
    kernel = None
    try:
        if request.param == "kernel":
            kernel = NamespacedKernel(netns)
            yield kernel, KernelOutside(kernel)   # type: ignore[misc]
        else:
            variant = request.param.split("-")[1]
            kernel = NamespacedKernel(netns, lambda: __import__("enforcer.dataplane.ipset", fromlist=["x"])
                                      .IpsetDataplane(TABLE, "own", variant))
            yield kernel, IpsetOutside(kernel)   # type: ignore[misc]
    finally:
        if kernel is not None:
            kernel.close()
        subprocess.run(["ip", "netns", "del", netns], timeout=10)


def install(dp: Dataplane, **elements: list[str]) -> None:
    tx = Transaction(TABLE)
    tx.replace_table(LAYOUT)
    for name, keys in elements.items():
        tx.add(name, [(key, None) for key in keys])
    dp.apply(tx)


def contents(state: TableState | None) -> dict[str, dict[str, str | None]]:
    """The reconciled sets of a read (the kernel also lists the static and timeout sets)."""
    assert state is not None
    return {name: state.elements[name] for name in LAYOUT.containers()}


# -- the checks -----------------------------------------------------------------------------

def test_no_table(backend):
    dp, _ = backend
    assert dp.read() is None
    assert dp.layout_tag() is None
    assert dp.missing_sentinels(["portal4_32", "allowhost6"]) == ["portal4_32", "allowhost6"]
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is False
    assert dp.counters() == {}
    assert dp.recent_caller("100.64.1.10") is False
    with pytest.raises(DataplaneError):
        dp.apply(Transaction(TABLE, [*_adds("portal4_32", "100.64.1.10")]))


def _adds(name: str, *keys: str) -> list:
    tx = Transaction(TABLE)
    tx.add(name, [(key, None) for key in keys])
    return tx.operations


def test_a_new_table_reads_back_its_elements_tag_and_sentinels(backend):
    dp, _ = backend
    install(dp, portal4_32=["100.64.1.10"], portal4_24=["100.64.7.0"], notice6_64=["2001:db8:40::"],
            allowhost4=["198.51.100.7"])
    state = dp.read()
    expected = {name: {} for name in LAYOUT.containers()}
    expected.update(portal4_32={"100.64.1.10": None}, portal4_24={"100.64.7.0": None},
                    notice6_64={"2001:db8:40::": None}, allowhost4={"198.51.100.7": None})
    assert contents(state) == expected, "the sentinel is never read back as an element"
    assert state.layout_tag == dp.layout_tag() == LAYOUT.tag
    assert state.sealed >= set(LAYOUT.containers())
    assert dp.missing_sentinels(LAYOUT.containers()) == []
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True
    other = LAYOUT.with_prefixes({(6, 48)})
    assert dp.holds_layout(other.tag, LAYOUT.containers()) is False, "another layout's tag"
    assert dp.counters() == {name: (0, 0) for name in COUNTERS}


def test_a_failed_transaction_changes_nothing(backend):
    dp, _ = backend
    install(dp, portal4_32=["100.64.1.10"])
    before = dp.read()
    tx = Transaction(TABLE)
    tx.add("portal4_32", [("100.64.1.11", None)])
    tx.delete("notice4_32", ["100.64.1.12"])          # not there: the whole batch fails
    with pytest.raises(DataplaneError):
        dp.apply(tx)
    assert contents(dp.read()) == contents(before)


def test_diffs_add_and_delete(backend):
    dp, _ = backend
    install(dp, portal4_32=["100.64.1.10"])
    tx = Transaction(TABLE)
    tx.delete("portal4_32", ["100.64.1.10"])
    tx.add("notice4_32", [("100.64.1.10", None)])
    tx.add("throttle4_32", [("100.64.1.10", None)])
    tx.add("noticeack4_32", [("100.64.1.10", None)], timeout=60)
    dp.apply(tx)
    state = contents(dp.read())
    assert state["portal4_32"] == {} and state["notice4_32"] == state["throttle4_32"] == {"100.64.1.10": None}
    assert dp.missing_sentinels(LAYOUT.containers()) == [], "deleting elements never takes the sentinel"


def test_a_flushed_set_loses_its_sentinel(backend):
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10"])
    outside.flush_set("portal4_32")
    outside.flush_set("throttle6_56")
    assert dp.missing_sentinels(LAYOUT.containers()) == ["portal4_32", "throttle6_56"]
    assert dp.missing_sentinels(["notice4_32"]) == []
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is False
    assert dp.holds_layout(LAYOUT.tag, ["notice4_32"]) is True
    state = dp.read()
    assert state.elements["portal4_32"] == {}
    assert "portal4_32" not in state.sealed and "notice4_32" in state.sealed
    install(dp)   # a replace restores them
    assert dp.missing_sentinels(LAYOUT.containers()) == []


def test_an_element_deleted_by_someone_else_shows_in_a_read(backend):
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10", "100.64.1.11"])
    outside.drop_element("portal4_32", "100.64.1.10")
    assert contents(dp.read())["portal4_32"] == {"100.64.1.11": None}
    assert dp.missing_sentinels(LAYOUT.containers()) == []


def test_recent_callers(backend):
    dp, outside = backend
    install(dp)
    assert dp.recent_caller("100.64.1.10") is False
    outside.saw_caller("100.64.1.10")
    outside.saw_caller("2001:db8:100:1::10")
    assert dp.recent_caller("100.64.1.10") is True
    assert dp.recent_caller("2001:db8:100:1::10") is True
    assert dp.recent_caller("2001:db8:100:1:0:0:0:10") is True, "any spelling of the address"
    assert dp.recent_caller("100.64.1.11") is False
    assert dp.recent_caller("2001:db8:100:1::11") is False
    with pytest.raises(ValueError, match="not an IP address"):
        dp.recent_caller("100.64.1.10; flush ruleset")
    install(dp)   # a replaced table starts with no callers
    assert dp.recent_caller("100.64.1.10") is False


def test_a_dropped_table(backend):
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10"])
    outside.saw_caller("100.64.1.10")
    outside.drop_table()
    assert dp.read() is None and dp.layout_tag() is None
    assert dp.recent_caller("100.64.1.10") is False
    assert dp.missing_sentinels(["portal4_32"]) == ["portal4_32"]
    assert dp.holds_layout(LAYOUT.tag, []) is False
    assert dp.counters() == {}


def test_the_digest_mark_is_looked_up_with_the_tag_and_small_sets_read_alone(backend):
    """``holds_layout`` with a mark (``Reconciler._carries``) and ``read_sets`` (its garden hosts)."""
    from enforcer.dataplane.layout import TAG_SET
    from enforcer.dataplane.state import digest_mark
    dp, outside = backend
    install(dp, portal4_32=["100.64.1.10"], allowhost4=["198.51.100.7"])
    generation = dp.generation()
    tx = Transaction(TABLE)
    tx.add(TAG_SET, [(digest_mark(7, generation + 1), None)])
    dp.apply(tx)
    if isinstance(outside, IpsetOutside):   # no generation: a new number on every call, no mark trusted
        assert dp.generation() != dp.generation()
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers(), digest_mark(7, generation + 1)) is False
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True
        state = dp.read()
        assert state is not None and digest_mark(7, generation + 1) in state.elements[TAG_SET], "listed as written"
        outside.drop_element("portal4_32", "100.64.1.10")
    else:
        assert dp.generation() == generation + 1, "one commit, one generation"
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers(), digest_mark(7, generation + 1)) is True
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers(), digest_mark(8, generation + 1)) is False
        state = dp.read()
        assert state is not None and digest_mark(7, generation + 1) in state.elements[TAG_SET], "listed as written"
        assert dp.generation() == generation + 1, "lookups and listings commit nothing"
        outside.drop_element("portal4_32", "100.64.1.10")
        assert dp.generation() == generation + 2, "someone else's commit moves it too"
    hosts = dp.read_sets(["allowhost4", "allowhost6"])
    assert hosts is not None
    assert hosts.elements == {"allowhost4": {"198.51.100.7": None}, "allowhost6": {}}
    assert hosts.sealed == {"allowhost4", "allowhost6"}
    outside.flush_set("allowhost6")
    hosts = dp.read_sets(["allowhost4", "allowhost6"])
    assert hosts is not None and hosts.sealed == {"allowhost4"}
    assert dp.read_sets(["allowhost4", "nosuchset4"]) is None
    outside.drop_table()
    assert dp.read_sets(["allowhost4"]) is None
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers(), digest_mark(7, generation + 1)) is False


# -- the ipset backend only (issue 19's review) -----------------------------------------------------

@pytest.fixture(params=["nft", "legacy"])
def ipset_backend(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Callable[..., str]]]:
    """An ``IpsetDataplane`` with its own rules in a namespace of its own, and ``sh(*argv)`` that
    runs a tool there (its stdout; a failure fails the test)."""
    missing = _ipset_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"ipset conformance {missing}: CI refuses to skip")
        pytest.skip(f"ipset conformance {missing}")
    variant: str = request.param
    netns = f"wgips{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)

    def sh(*argv: str, check: bool = True) -> str:
        done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 or not check, (argv, done.stderr)
        return done.stdout

    kernel = None
    try:
        kernel = NamespacedKernel(netns, lambda: __import__("enforcer.dataplane.ipset", fromlist=["x"])
                                  .IpsetDataplane(TABLE, "own", variant))
        kernel.variant = variant   # type: ignore[attr-defined]
        yield kernel, sh
    finally:
        if kernel is not None:
            kernel.close()
        subprocess.run(["ip", "netns", "del", netns], timeout=10)


def _members(sh: Callable[..., str], name: str) -> list[str]:
    return [line.split()[2] for line in sh("ipset", "save", name).splitlines() if line.startswith("add ")]


def test_a_flushed_or_emptied_umbrella_is_noticed_and_repaired(ipset_backend):
    """The rules match only the umbrellas: ``ipset flush walled-portal4`` freed every walled-garden
    subscriber and neither check saw it. The quick check tests each member; ``layout_tag`` and
    ``read`` say what is wrong, so the reconciler replaces, and the replace lists them again."""
    dp, sh = ipset_backend
    install(dp, portal4_32=["100.64.1.10"])
    wanted = _members(sh, "walled-portal4")
    assert wanted == ["walled-portal4-32", "walled-portal4-24"], "longest prefix first"
    for damage in (("flush", "walled-portal4"), ("del", "walled-portal4", "walled-portal4-32"),
                   ("del", "walled-noticeack6", "walled-noticeack6-56")):
        sh("ipset", *damage)
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is False, damage
        assert dp.missing_sentinels(LAYOUT.containers()) == [], "no set was flushed"
        top = damage[1]
        assert dp.layout_tag().startswith(f"{LAYOUT.tag} (umbrella {top} lacks "), damage
        state = dp.read()
        assert state is not None and state.layout_tag != LAYOUT.tag and f"umbrella {top} lacks" in state.layout_tag
        install(dp, portal4_32=["100.64.1.10"])
        assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True
        assert dp.read().layout_tag == LAYOUT.tag
        assert _members(sh, "walled-portal4") == wanted
    assert "walledtmp-" not in sh("ipset", "list", "-n")


def test_someone_elses_set_in_an_umbrella_is_seen_at_the_full_check_and_taken_out(ipset_backend):
    dp, sh = ipset_backend
    install(dp, portal4_32=["100.64.1.10"])
    sh("ipset", "create", "walled-peers", "hash:net")
    sh("ipset", "add", "walled-portal4", "walled-peers")
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True, "the quick check tests only ours"
    assert "umbrella walled-portal4 lists walled-peers" in dp.read().layout_tag
    install(dp, portal4_32=["100.64.1.10"])
    assert "walled-peers" not in _members(sh, "walled-portal4")
    assert "walled-peers" in sh("ipset", "list", "-n").split(), "taken out, not destroyed"
    assert dp.read().layout_tag == LAYOUT.tag


def test_a_rule_deleted_inside_our_chains_is_seen_at_the_full_check(ipset_backend):
    """The quick check sees jumps and the stamp; the full check (``read``) compares every rule of
    our chains with what this release renders, so a rule deleted or added inside them is
    repaired too."""
    dp, sh = ipset_backend
    tool = f"iptables-{dp.variant}"
    install(dp, portal4_32=["100.64.1.10"])
    assert dp.read().layout_tag == LAYOUT.tag, "the chains as rendered: iptables' own spelling matches"
    garden = sh(tool, "-S", "WALLED-GARDEN-GARDEN")
    sh(tool, "-D", "WALLED-GARDEN-GARDEN", "-p", "tcp", "-m", "comment", "--comment",
       "walled-garden counter refused_tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True, "the quick check stays cheap"
    assert "iptables" in dp.read().layout_tag
    install(dp, portal4_32=["100.64.1.10"])
    assert sh(tool, "-S", "WALLED-GARDEN-GARDEN") == garden
    assert dp.read().layout_tag == LAYOUT.tag
    sh(f"ip6tables-{dp.variant}", "-I", "WALLED-GARDEN-UP", "-j", "RETURN")   # a rule added: every IPv6 one passes
    assert "iptables" in dp.read().layout_tag


def test_sets_that_are_not_ours_are_never_read_or_destroyed(ipset_backend):
    """Only names ``ipset_sets`` generates are ours: ``walled-peers`` and ``walledtmp-peers`` (someone
    else's, with our prefixes) survive a full sync, a layout change and ``remove_everything``."""
    dp, sh = ipset_backend
    for name in ("walled-peers", "walledtmp-peers", "walled-portal4-33"):
        sh("ipset", "create", name, "hash:net")
    install(dp, portal4_32=["100.64.1.10"])
    assert "peers" not in dp.read().elements
    tx = Transaction(TABLE)
    tx.replace_table(LAYOUT.with_prefixes({(4, 28)}))
    dp.apply(tx)
    dp.remove_everything()
    assert sorted(sh("ipset", "list", "-n").split()) == ["walled-peers", "walled-portal4-33", "walledtmp-peers"]


def test_a_full_sync_adds_the_entering_keys_before_it_swaps(ipset_backend, monkeypatch):
    """Walled garden → notice in a full sync: the address is added to the live notice set before
    any set is swapped, so it is in one of the two throughout (the swaps follow each other, and
    the portal set's came first: it was in neither for a moment)."""
    from enforcer.dataplane import ipset as ipset_module
    dp, _ = ipset_backend
    install(dp, portal4_32=["100.64.1.10"], notice4_32=["100.64.1.11"])
    restores: list[str] = []
    run = ipset_module._run

    def spy(argv: list[str], data: str | None = None, timeout: float = 120.0) -> str:
        if argv == ["ipset", "restore"]:
            restores.append(data or "")
        return run(argv, data, timeout)

    monkeypatch.setattr(ipset_module, "_run", spy)
    install(dp, notice4_32=["100.64.1.10", "100.64.1.11"])
    first_swap = next(i for i, text in enumerate(restores) if "\nswap walledtmp-portal4-32 walled-portal4-32\n"
                      in f"\n{text}")
    entered = next(i for i, text in enumerate(restores) if "add walled-notice4-32 100.64.1.10\n" in text)
    assert entered < first_swap, restores
    assert "add walled-notice4-32 100.64.1.11\n" not in restores[entered], "only keys that enter"
    state = contents(dp.read())
    assert state["portal4_32"] == {} and state["notice4_32"] == {"100.64.1.10": None, "100.64.1.11": None}


def test_a_full_sync_that_fails_at_a_swap_changes_nothing(ipset_backend, monkeypatch):
    """A swap that fails (a temporary gone) undoes the swaps before it, the umbrellas' copies and
    the entering keys: every set of ours as before, no temporary left."""
    from enforcer.dataplane import ipset as ipset_module
    dp, sh = ipset_backend
    install(dp, portal4_32=["100.64.1.10"], notice4_32=["100.64.1.11"])
    before = sh("ipset", "save")
    run = ipset_module._run
    done: list[str] = []

    def sabotage(argv: list[str], data: str | None = None, timeout: float = 120.0) -> str:
        if argv == ["ipset", "restore"] and data and data.startswith("swap walledtmp-") and not done:
            sh("ipset", "destroy", "walledtmp-notice4-32")   # its swap comes after portal4-32's
            done.append(data)
        return run(argv, data, timeout)

    monkeypatch.setattr(ipset_module, "_run", sabotage)
    with pytest.raises(DataplaneError):
        install(dp, portal4_32=["100.64.1.11"], notice4_32=["100.64.1.10"], throttle4_24=["100.64.9.0"])
    assert done and done[0].index("swap walledtmp-portal4-32 ") < done[0].index("swap walledtmp-notice4-32 ")
    assert sh("ipset", "save") == before
    assert "walledtmp-" not in sh("ipset", "list", "-n")


def test_an_obsolete_set_in_use_stays_and_the_others_go(ipset_backend):
    """Destroying is set by set: an operator's rule naming ``walled-portal4-24`` keeps that one
    (and the full sync still succeeds); the other sets of the dropped prefix length go."""
    dp, sh = ipset_backend
    wide = LAYOUT.with_prefixes({(4, 20)})
    tx = Transaction(TABLE)
    tx.replace_table(wide)
    dp.apply(tx)
    sh(f"iptables-{dp.variant}", "-A", "FORWARD", "-m", "set", "--match-set", "walled-portal4-20", "src", "-j", "DROP")
    install(dp, portal4_32=["100.64.1.10"])
    names = sh("ipset", "list", "-n").split()
    assert "walled-portal4-20" in names
    assert not {"walled-notice4-20", "walled-noticeack4-20", "walled-throttle4-20"} & set(names)
    assert "walled-portal4-20" not in _members(sh, "walled-portal4")
    assert dp.holds_layout(LAYOUT.tag, LAYOUT.containers()) is True
    sh(f"iptables-{dp.variant}", "-D", "FORWARD", "-m", "set", "--match-set", "walled-portal4-20", "src", "-j", "DROP")


def test_more_ipv6_prefix_lengths_than_64(ipset_backend):
    """An umbrella of 64 made every full sync of a list with more IPv6 prefix lengths fail."""
    dp, sh = ipset_backend
    many = LAYOUT.with_prefixes({(6, plen) for plen in range(48, 129)})
    tx = Transaction(TABLE)
    tx.replace_table(many)
    tx.add("portal6_128", [("2001:db8::1", None)])
    dp.apply(tx)
    assert len(_members(sh, "walled-portal6")) == 81
    assert dp.holds_layout(many.tag, many.containers()) is True
    assert dp.read().layout_tag == many.tag


def test_an_old_umbrella_of_64_is_replaced_by_a_bigger_one(ipset_backend):
    """Umbrellas made by an older release (size 64) are copied at this release's size by the next
    full sync, so a list that later uses more prefix lengths does not fail."""
    dp, sh = ipset_backend
    install(dp)
    saved = sh("ipset", "save", "walled-portal6")
    small = re.sub(r"^(create|add) walled-portal6 ", r"\1 walledtmp-small ", saved, flags=re.M).replace(
        "size 129", "size 64")
    subprocess.run(["ip", "netns", "exec", dp.netns, "ipset", "restore"], check=True, timeout=30, text=True,
                   input=small + "swap walledtmp-small walled-portal6\ndestroy walledtmp-small\n")
    assert "size 64" in sh("ipset", "list", "-t", "walled-portal6")
    install(dp)
    assert f"size {129}" in sh("ipset", "list", "-t", "walled-portal6")
