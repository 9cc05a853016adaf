"""A replace of the table keeps the elements of its kernel-held timeout sets (upgrade audit).

A full sync that replaces the table (a start after an upgrade whose layout changed, a table
without our structure mark, a repair, a reload with another layout) used to create the timeout
sets empty: the DNS forwarder's learnt addresses (``dnsgarden``) and the portal's recent callers
(``portalcaller``) were gone, while a restart without a replace keeps them. Now the replacing
transaction carries them over with the time they had left. Not the notice acknowledgements
(``noticeack``): they belong to a subscriber, and the daemon puts back those still due after
every replace, at their subscribers' addresses now (tests/unit/test_acks_after_replace.py); at
the reconciler's level a replace leaves them empty.

Each case runs the reconciler on the real backend in a network namespace of its own (a
``python`` started with ``ip netns exec``: every netlink socket it opens is there), fills the
timeout sets with ``nft`` as the kernel, the forwarder and the daemon would, forces a replace and
reads the sets back. The forwarder's marker (an element without timeout) is not carried: the
forwarder puts it back itself, and a missing marker is how it learns to refill what it tracks.
A replace the kernel refuses is tried again without what it carried only when the refusal can
be theirs (``reconciler.carry_refused``): both kinds are produced on the real kernel here, as
nft words them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import scratch_netns

from required import tool

TABLE = "wg_carry_test"
ROOT = Path(__file__).resolve().parents[2]   # this checkout: the code the subprocess runs

#: The reconciler, on the namespace's nftables: ``install PORT``, ``restart PORT`` (a new process's
#: start), ``reload PORT NEW_PORT`` (a start, then a reload to another layout in the same
#: process). Prints the kind of each sync as JSON.
SCRIPT = textwrap.dedent(f"""
    import json, sys
    from ipaddress import ip_network
    from enforcer.dataplane.kernel import KernelDataplane
    from enforcer.dataplane.layout import Layout
    from enforcer.reconciler import Reconciler

    def layout(port):
        return Layout({TABLE!r}, ("wgcarry0",), (ip_network("203.0.113.0/24"),), None, int(port), dns_port=5353)

    step, *ports = sys.argv[1:]
    rec = Reconciler(KernelDataplane({TABLE!r}), layout(ports[0]))
    kinds = [rec.sync_all({{}}, read_kernel=True).kind]
    if step == "reload":
        rec.base_layout = layout(ports[1])
        kinds.append(rec.sync_all({{}}).kind)
    print(json.dumps(kinds))
""")

#: The same on the ipset backend (``rules: external``: no iptables needed; no ``dns: gateway``).
IPSET_SCRIPT = textwrap.dedent(f"""
    import json, sys
    from ipaddress import ip_network
    from enforcer.dataplane.ipset import IpsetDataplane
    from enforcer.dataplane.layout import Layout
    from enforcer.reconciler import Reconciler

    port = int(sys.argv[2])
    layout = Layout({TABLE!r}, ("wgcarry0",), (ip_network("203.0.113.0/24"),), None, port)
    rec = Reconciler(IpsetDataplane({TABLE!r}, rules="external", base=layout), layout)
    print(json.dumps([rec.sync_all({{}}, read_kernel=True).kind]))
""")

#: A reload to another layout whose replace the kernel refuses, on the namespace's nftables:
#: ``carried`` (the small listing says a caller's expiry is above its timeout, which the kernel
#: refuses: ERANGE) or ``other`` (a caller the kernel takes, but the replace also deletes an
#: element the new table lacks: ENOENT, nothing of the carried element's). Prints each replace
#: tried (did it carry elements?), then the reload's kind or its error.
FAILING_SCRIPT = textwrap.dedent(f"""
    import json, sys
    from ipaddress import ip_network
    from enforcer.dataplane.backend import DataplaneError
    from enforcer.dataplane.kernel import KernelDataplane
    from enforcer.dataplane.layout import Layout
    from enforcer.dataplane.transaction import AddExpiring, DeleteElements, ReplaceTable
    from enforcer.reconciler import Reconciler

    mode = sys.argv[1]
    tried = []

    class Refused(KernelDataplane):
        def read_timeouts(self, names):
            found = super().read_timeouts(names)
            # a recent caller: refused (``carried``), or one the kernel takes (``other``)
            found["portalcaller4"] = {{"100.64.0.9": (10, 20) if mode == "carried" else (900, 500)}}
            return found

        def apply(self, tx):
            carrying = any(isinstance(op, AddExpiring) for op in tx.operations)
            if any(isinstance(op, ReplaceTable) for op in tx.operations):
                tried.append(carrying)
                if mode == "other" and carrying:
                    tx.operations.append(DeleteElements("portal4_32", ("100.64.0.99",)))
            super().apply(tx)

    def layout(port):
        return Layout({TABLE!r}, ("wgcarry0",), (ip_network("203.0.113.0/24"),), None, port, dns_port=5353)

    rec = Reconciler(Refused({TABLE!r}), layout(8080))
    rec.sync_all({{}}, read_kernel=True)
    tried.clear()
    rec.base_layout = layout(8081)
    try:
        outcome = rec.sync_all({{}}).kind
    except DataplaneError as exc:
        outcome = str(exc)
    print(json.dumps([tried, outcome]))
""")

#: The same ``carried`` case on the ipset backend: a caller whose time ``ipset`` refuses (above
#: its 2147483 s); ``ipset restore`` names only the line, the backend adds the set.
IPSET_FAILING_SCRIPT = textwrap.dedent(f"""
    import json
    from ipaddress import ip_network
    from enforcer.dataplane.ipset import IpsetDataplane
    from enforcer.dataplane.layout import Layout
    from enforcer.dataplane.transaction import AddExpiring, ReplaceTable
    from enforcer.reconciler import Reconciler

    tried, errors = [], []

    class Refused(IpsetDataplane):
        def read_timeouts(self, names):
            found = super().read_timeouts(names)
            found["portalcaller4"] = {{"100.64.0.9": (3000000, 3000000)}}
            return found

        def apply(self, tx):
            if any(isinstance(op, ReplaceTable) for op in tx.operations):
                tried.append(any(isinstance(op, AddExpiring) for op in tx.operations))
            try:
                super().apply(tx)
            except Exception as exc:
                errors.append(str(exc))
                raise

    def layout(port):
        return Layout({TABLE!r}, ("wgcarry0",), (ip_network("203.0.113.0/24"),), None, port)

    rec = Reconciler(Refused({TABLE!r}, rules="external", base=layout(8080)), layout(8080))
    rec.sync_all({{}}, read_kernel=True)
    tried.clear()
    rec.base_layout = layout(8081)
    print(json.dumps([tried, rec.sync_all({{}}).kind, errors]))
""")

#: What the kernel, the forwarder and the daemon put in the timeout sets: set → element text.
FILLED = {
    "dnsgarden4": "198.51.100.7 timeout 12m expires 700s, 255.255.255.255",
    "dnsgarden6": "2001:db8::7 timeout 10m, ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    "noticeack4_32": "100.64.0.5 timeout 10m expires 400s",
    "noticeack6_64": "2001:db8:1:2:: timeout 5m",
    "portalcaller4": "100.64.0.6, 100.64.0.8 expires 90s",   # the set's own timeout (15m)
    "portalcaller6": "2001:db8::6 timeout 20m expires 1000s",
}
#: Key → timeout of each set once replaced (the markers stay out: the forwarder adds them; the
#: acknowledgements too: the daemon puts them back by subscriber).
CARRIED = {
    "dnsgarden4": {"198.51.100.7": 720},
    "dnsgarden6": {"2001:db8::7": 600},
    "noticeack4_32": {},
    "noticeack6_64": {},
    "portalcaller4": {"100.64.0.6": 900, "100.64.0.8": 900},
    "portalcaller6": {"2001:db8::6": 1200},
}


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *argv: str, timeout: float = 60) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise AssertionError(f"{argv[:3]}: {done.stderr[-3000:]}")
        return done.stdout

    def reconcile(self, *args: str, script: str = SCRIPT) -> list[str]:
        kinds: list[str] = json.loads(self.run(sys.executable, "-c", script, *args).strip().splitlines()[-1])
        return kinds

    def ipsets(self) -> dict[str, dict[str, int]]:
        """Set → element → seconds left, of the ipset backend's timeout sets (``ipset save``)."""
        out: dict[str, dict[str, int]] = {}
        for line in self.run("ipset", "save").splitlines():
            parts = line.split()
            if parts[:1] == ["add"] and parts[1] in IPSET_FILLED:
                assert parts[3] == "timeout", line
                out.setdefault(parts[1], {})[parts[2]] = int(parts[4])
        return out

    def expiry(self) -> dict[str, dict[str, tuple[int | None, int | None]]]:
        """Set → key → (timeout, seconds left) of every timeout set (None: none listed)."""
        data = json.loads(self.run("nft", "-j", "list", "table", "inet", TABLE))
        out: dict[str, dict[str, tuple[int | None, int | None]]] = {}
        for obj in data["nftables"]:
            found = obj.get("set")
            if not found or found["name"] not in FILLED:
                continue
            items = out.setdefault(found["name"], {})
            for item in found.get("elem", []):
                if isinstance(item, str):
                    items[item] = (None, None)
                else:
                    elem = item["elem"]
                    items[elem["val"]] = (elem.get("timeout", found.get("timeout")), elem.get("expires"))
        return out



@pytest.fixture
def ns() -> Iterator[Namespace]:
    with scratch_netns("wg-carry") as name:   # the table and the sets go with it
        yield Namespace(name)


def _fill(ns: Namespace) -> dict[str, dict[str, tuple[int | None, int | None]]]:
    ns.run("nft", "".join(f"add element inet {TABLE} {name} {{ {text} }}\n" for name, text in FILLED.items()))
    return ns.expiry()


def _assert_carried(before: dict[str, dict[str, tuple[int | None, int | None]]],
                    after: dict[str, dict[str, tuple[int | None, int | None]]]) -> None:
    assert {name: {key: timeout for key, (timeout, _) in items.items()} for name, items in after.items()} \
        == CARRIED, after
    for name, items in after.items():
        for key, (_, left) in items.items():
            was = before[name][key][1]
            assert left is not None and was is not None and 0 < left <= was, (name, key, left, was)


def _remove_structure_mark(ns: Namespace) -> None:
    """The layout tag's element without the comment that carries the structure fingerprint (as a
    table from before the mark has it): the next start replaces the table."""
    data = json.loads(ns.run("nft", "-j", "list", "set", "inet", TABLE, "layouttag"))
    (found,) = [obj["set"] for obj in data["nftables"] if "set" in obj]
    (tag,) = [item["elem"]["val"] for item in found["elem"]
              if isinstance(item, dict) and "comment" in item["elem"]]
    ns.run("nft", f"delete element inet {TABLE} layouttag {{ {tag} }}\n"
                  f"add element inet {TABLE} layouttag {{ {tag} }}\n")


def test_a_start_with_another_layout_keeps_the_timeout_elements(ns: Namespace) -> None:
    """The audit's repro: an upgrade (here: another portal port) replaces the table at the start,
    which lists the whole table first: the carried expiry comes from that listing."""
    assert ns.reconcile("install", "8080") == ["full"]
    before = _fill(ns)
    assert ns.reconcile("restart", "8081") == ["full"]
    _assert_carried(before, ns.expiry())


def test_a_start_that_finds_no_structure_mark_keeps_the_timeout_elements(ns: Namespace) -> None:
    """The same layout, but a table without our structure mark (an older release's): replaced."""
    assert ns.reconcile("install", "8080") == ["full"]
    before = _fill(ns)
    _remove_structure_mark(ns)
    assert ns.reconcile("restart", "8080") == ["full"]
    _assert_carried(before, ns.expiry())


def test_a_reload_to_another_layout_keeps_the_timeout_elements(ns: Namespace) -> None:
    """A replace from the mirror (no listing of the table in that sync): one small listing of
    just the timeout sets."""
    assert ns.reconcile("install", "8080") == ["full"]
    before = _fill(ns)
    assert ns.reconcile("reload", "8080", "8082") == ["partial", "full"]
    _assert_carried(before, ns.expiry())


#: The ipset backend's timeout sets: set → (element, seconds). One hash:net per prefix length.
IPSET_FILLED = {
    "walled-noticeack4-32": ("100.64.0.5", 400),
    "walled-noticeack6-64": ("2001:db8:1:2::/64", 300),
    "walled-portalcaller4": ("100.64.0.6", 800),
    "walled-portalcaller6": ("2001:db8::6", 500),
}


def test_the_ipset_backend_keeps_its_caller_sets_through_a_full_sync(ns: Namespace) -> None:
    """The ipset backend's full sync fills a fresh set for every set of the layout, the timeout
    sets included, and swaps it in: without the carried elements they came out empty too. The
    acknowledgement sets come out empty (the daemon puts them back). (The sets go with the
    namespace.)"""
    tool("ipset", "ipset")
    assert ns.reconcile("install", "8080", script=IPSET_SCRIPT) == ["full"]
    for name, (item, seconds) in IPSET_FILLED.items():
        ns.run("ipset", "add", name, item, "timeout", str(seconds))
    before = ns.ipsets()
    assert ns.reconcile("restart", "8081", script=IPSET_SCRIPT) == ["full"]
    after = ns.ipsets()
    assert {name: set(items) for name, items in after.items()} == \
        {name: {item} for name, (item, _) in IPSET_FILLED.items() if "noticeack" not in name}, after
    for name, items in after.items():
        for item, left in items.items():
            assert 0 < left <= before[name][item], (name, item, left, before[name][item])


def test_a_replace_refused_for_a_carried_element_goes_ahead_without_them(ns: Namespace) -> None:
    """nft 1.0.6 does not say which line it refused (it echoes its input's first line): the
    kernel's ERANGE for an expiry above its timeout is one only a carried element can earn."""
    tried, outcome = json.loads(ns.run(sys.executable, "-c", FAILING_SCRIPT, "carried").strip().splitlines()[-1])
    assert (tried, outcome) == ([True, False], "full")
    assert ns.expiry()["portalcaller4"] == {}


def test_a_replace_refused_for_another_reason_is_raised_without_a_retry(ns: Namespace) -> None:
    """The kernel refuses the replace for one of its own elements (here: a delete of one the new
    table lacks, ENOENT): not retried without the carried elements, which would fail the same
    way after as long again (2 s at 100k subscribers)."""
    tried, outcome = json.loads(ns.run(sys.executable, "-c", FAILING_SCRIPT, "other").strip().splitlines()[-1])
    assert tried == [True] and "No such file or directory" in outcome, (tried, outcome)


def test_the_ipset_backend_names_the_set_of_a_refused_carried_element(ns: Namespace) -> None:
    tool("ipset", "ipset")
    tried, kind, errors = json.loads(ns.run(sys.executable, "-c", IPSET_FAILING_SCRIPT).strip().splitlines()[-1])
    assert (tried, kind) == ([True, False], "full"), (tried, kind, errors)
    (error,) = errors
    assert "out of range" in error and error.endswith("(adding to set portalcaller4)"), error
    assert "walled-portalcaller4" not in ns.ipsets()
