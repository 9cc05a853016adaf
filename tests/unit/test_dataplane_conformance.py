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
