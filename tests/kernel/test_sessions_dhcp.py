"""Sessions end to end on the real kernel with real DHCP servers (issue 13): restrictions follow
the addresses dnsmasq and Kea hand out, as the subscribers' own traffic sees it.

Layout: the demo Topology (gateway, two fixed subscribers, the "internet" host) with a DHCP
segment (:class:`dhcp_peers.Lan`, a bridge with client namespaces) hung off its gateway, the
DHCP server in the gateway namespace writing its lease file into the test's directory, and the
daemon reading that file as a session source. Client A is listed by its MAC only (restricted),
client B is paying (not listed). Each test starts and stops everything it uses; the times from
a lease change to the state seen by traffic are printed (``pytest -s``) for information.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dhcp_peers import Dhcp6Client, DhcpClient, Dnsmasq, Kea4, Kea6, Lan, LanClient, unused_address

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from required import tool

UPSTREAM = "http://198.51.100.10/"
UPSTREAM6 = "http://[2001:db8:198::10]/"
POOL4 = ("100.64.200.100", "100.64.200.150")
#: The topology's subscriber links, the Lan's /24 and /64, and the Kea6 delegated-prefix pool.
PREFIXES = ["100.64.0.0/16", "2001:db8:100::/48", "2001:db8:2100::/48"]
PD_POOL = "2001:db8:2100::/48"
WALLED, FREE = "walled", "free"
#: Generous bound on lease change -> state seen by traffic (the target is 1 s p99, see the benchmark).
LAG_BOUND = 5.0
#: The element every set of the layout holds from its creation on (not an address: skipped).
SENTINELS = ("255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
CLI = str(Path(sys.executable).parent / "walled-garden")


def _need(*programs: tuple[str, str]) -> None:
    for name, package in programs:
        tool(name, package)


# ---------------------------------------------------------------------------- helpers


def _ns(netns: str, *argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _route(lan: Lan, client: LanClient) -> None:
    """The default route via the segment's gateway, set again after each lease: udhcpc's script
    flushes the address on every change, and the kernel drops the routes of an interface left
    without an address with it (the script records the event once the new address is set)."""
    r = _ns(client.netns, "ip", "-4", "route", "replace", "default", "via", lan.gateway4)
    assert r.returncode == 0, f"{client.netns}: default route: {r.stderr}"


def _state(netns: str, lab: Lab, url: str = UPSTREAM, source: str = "") -> tuple[str, str]:
    """One fetch of the upstream host from a Lan client (from ``source``, when given):
    (walled | free | other, detail)."""
    bind = ["--interface", source] if source else []
    r = _ns(netns, "curl", "-sS", "-g", "--noproxy", "*", "--max-time", "2", "-o", "/dev/null",
            "-w", "%{http_code} %{redirect_url}", *bind, url, timeout=8.0)
    code, _, location = r.stdout.strip().partition(" ")
    if code == "302" and location == lab.portal_url:
        return WALLED, r.stdout
    if code == "200":
        return FREE, r.stdout
    return "other", f"{r.stdout} {r.stderr.strip()}"


def _await_state(netns: str, lab: Lab, want: str, since: float, what: str) -> float:
    """Poll (bounded) until ``netns`` sees ``want``; the wall-clock seconds since ``since``."""
    deadline = time.monotonic() + LAG_BOUND + 3.0
    seen = ("", "")
    while time.monotonic() < deadline:
        seen = _state(netns, lab)
        if seen[0] == want:
            lag = time.time() - since
            print(f"lag {what}: {lag * 1000:.0f} ms")
            assert lag < LAG_BOUND, f"{what}: {lag:.2f}s"
            return lag
        time.sleep(0.05)
    raise AssertionError(f"{what}: {netns} is not {want} (last: {seen})\n{lab.log()}")


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _cli(lab: Lab, *argv: str) -> dict[str, Any]:
    """The operator's command, typed on the gateway: ``walled-garden <argv> --json --config <lab's>``."""
    r = _ns(lab.topo.gateway.netns, CLI, *argv, "--json", "--config", str(lab.config_path), timeout=20.0)
    assert r.returncode == 0, f"walled-garden {' '.join(argv)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    answer: dict[str, Any] = json.loads(r.stdout)
    return answer


def _walled_networks(lab: Lab) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """What the kernel walls now: the elements of the daemon's ``portal<family>_<prefix length>``
    sets (docs/reference.md, Dataplane), read with ``nft -j list table`` as an operator would."""
    r = _ns(lab.topo.gateway.netns, "nft", "-j", "list", "table", "inet", lab.table)
    assert r.returncode == 0, r.stderr
    out: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for item in json.loads(r.stdout)["nftables"]:
        body = item.get("set")
        match = re.fullmatch(r"portal[46]_(\d+)", body.get("name", "")) if isinstance(body, dict) else None
        if match is None:
            continue
        for element in body.get("elem", []):
            while isinstance(element, dict) and "elem" in element:     # an element with attributes
                element = element["elem"]["val"]
            if isinstance(element, str) and element not in SENTINELS:
                out.add(ipaddress.ip_network(f"{element}/{match.group(1)}"))
    return out


def _walled(lab: Lab, network: str) -> bool:
    """True when ``network`` (an address or a prefix) is exactly an element of a walled-garden set."""
    return ipaddress.ip_network(network) in _walled_networks(lab)


def _wait(condition: Callable[[], bool], what: str, lab: Lab, timeout: float = LAG_BOUND) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s\n{lab.log()}")
        time.sleep(0.05)
    return time.monotonic() - start


def _session_status(lab: Lab, name: str) -> dict[str, Any]:
    status = lab.status()
    assert status is not None, lab.log()
    sources: dict[str, Any] = status["sessions"]
    assert name in sources, f"no session source {name!r} in status: {sorted(sources)}"
    source: dict[str, Any] = sources[name]
    return source


@pytest.fixture
def lan(topo: Topology) -> Iterator[Lan]:
    with Lan(clients=2, gateway_netns=topo.gateway.netns) as segment:
        yield segment


def _lab(topo: Topology, lan: Lan, tmp_path: Path, sessions: list[dict[str, Any]]) -> Lab:
    """Client A listed by MAC only; the gateway's subscriber side includes the Lan's bridge."""
    a = lan.clients[0]
    lab = Lab(topo, tmp_path, [{"id": "C-A", "match": {"mac": a.mac}, "reason": "overdue"}])
    lab.config["gateway"]["subscriber_interfaces"] = [*topo.subscriber_interfaces, lan.bridge]
    lab.config["gateway"]["subscriber_prefixes"] = PREFIXES
    lab.config["subscribers"]["sessions"] = sessions
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    return lab


@pytest.fixture
def stop_lab() -> Iterator[list[Lab]]:
    """Labs registered here are stopped after the test, and their logs printed."""
    labs: list[Lab] = []
    yield labs
    for lab in labs:
        lab.stop_daemon()
        print(lab.log())


# ---------------------------------------------------------------------------- dnsmasq


def test_dnsmasq_restriction_follows_a_move_and_the_old_address_goes_to_a_paying_client(
        topo: Topology, lan: Lan, tmp_path: Path, stop_lab: list[Lab]) -> None:
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    a, b = lan.clients
    leases = tmp_path / "dnsmasq.leases"
    bogus = tmp_path / "other.leases"           # a second source, written by the test
    bogus.write_text("")
    lab = _lab(topo, lan, tmp_path, [{"kind": "dnsmasq", "path": str(leases)},
                                     {"kind": "dnsmasq", "name": "other", "path": str(bogus)}])
    stop_lab.append(lab)
    with Dnsmasq(lan.gateway_netns, lan.bridge, *POOL4, leases) as server, \
            DhcpClient(a.netns, a.interface, tmp_path) as client_a, \
            DhcpClient(b.netns, b.interface, tmp_path) as client_b:
        lab.start_daemon()
        lab.start_portal()

        old_a = client_a.acquire()
        old_b = client_b.acquire()
        _route(lan, a)
        _route(lan, b)
        server.wait_lease(lambda rows: {m for _, m, _ in rows} == {a.mac, b.mac})
        _await_state(a.netns, lab, WALLED, _mtime(leases), "dnsmasq acquire -> A walled")
        assert _state(b.netns, lab)[0] == FREE

        # A lease for an address outside gateway.subscriber_prefixes: reported, nothing else changes.
        before = _walled_networks(lab)
        bogus.write_text(f"{int(time.time()) + 600} {a.mac} 192.0.2.77 a *\n")
        _wait(lambda: _session_status(lab, "other")["problems"].get("outside_prefixes", 0) >= 1,
              "outside_prefixes reported", lab)
        reported = _cli(lab, "status")["sessions"]["other"]          # as the operator reads it
        assert reported["problems"]["outside_prefixes"] >= 1 and "192.0.2.77" in reported["last_problem"], reported
        assert reported["sessions"] == 0, reported
        assert _walled_networks(lab) == before
        assert _state(a.netns, lab)[0] == WALLED and _state(b.netns, lab)[0] == FREE

        # The move: A renews to a new address, B is given A's old one.
        new_a = unused_address(old_a, old_b)
        server.reassign(a.mac, new_a)
        assert client_a.renew() == new_a
        _route(lan, a)
        server.wait_lease(lambda rows: (a.mac, new_a) in {(m, ip) for _, m, ip in rows})
        _await_state(a.netns, lab, WALLED, _mtime(leases), "dnsmasq move -> A walled on its new address")
        assert not _walled(lab, old_a), "A's old address is still in the kernel set"

        server.reassign(b.mac, old_a)
        assert client_b.renew() == old_a
        _route(lan, b)
        server.wait_lease(lambda rows: {(m, ip) for _, m, ip in rows} == {(a.mac, new_a), (b.mac, old_a)})
        _await_state(b.netns, lab, FREE, _mtime(leases), "B on A's old address free")
        assert _state(a.netns, lab)[0] == WALLED

        explained = _cli(lab, "explain", new_a)
        print("explain:", json.dumps(explained["sessions"]))
        assert explained["subscriber"] == "C-A" and explained["restricted"] is True, explained
        assert [(s["source"], s["addresses"]) for s in explained["sessions"]] == [("dnsmasq", [f"{new_a}/32"])], \
            explained
        assert explained["sessions"][0]["match"].get("mac") == a.mac


def test_dnsmasq_sessions_survive_a_restart_and_are_reconciled_with_the_lease_file(
        topo: Topology, lan: Lan, tmp_path: Path, stop_lab: list[Lab]) -> None:
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    a, b = lan.clients
    leases = tmp_path / "dnsmasq.leases"
    lab = _lab(topo, lan, tmp_path, [{"kind": "dnsmasq", "path": str(leases)}])
    stop_lab.append(lab)
    with Dnsmasq(lan.gateway_netns, lan.bridge, *POOL4, leases) as server, \
            DhcpClient(a.netns, a.interface, tmp_path) as client_a, \
            DhcpClient(b.netns, b.interface, tmp_path) as client_b:
        lab.start_daemon()
        lab.start_portal()
        old_a = client_a.acquire()
        _route(lan, a)
        _await_state(a.netns, lab, WALLED, _mtime(leases), "dnsmasq acquire -> A walled")

        # Restart with the lease file out of reach: the session comes from the daemon's saved
        # state (a missing lease file keeps its sessions), so A stays walled, and the kernel
        # kept the restriction while the daemon was down.
        lab.stop_daemon()
        assert _state(a.netns, lab)[0] == WALLED, "the kernel keeps the restriction while the daemon is down"
        away = tmp_path / "dnsmasq.leases.away"
        os.replace(leases, away)
        lab.start_daemon()
        assert _state(a.netns, lab)[0] == WALLED, f"walled right after the restart\n{lab.log()}"
        explained = _cli(lab, "explain", old_a)
        assert [(s["source"], s["match"]) for s in explained["sessions"]] == [("dnsmasq", {"mac": a.mac})], explained
        _wait(lambda: _session_status(lab, "dnsmasq")["problems"].get("unreadable", 0) >= 1,
              "the missing lease file reported", lab)
        os.replace(away, leases)
        time.sleep(0.6)                      # more than two poll intervals: read again, same state
        assert _state(a.netns, lab)[0] == WALLED

        # Changes while the daemon is down: A releases, B (paying) gets A's old address; the
        # restarted daemon reconciles its saved sessions with the lease file.
        lab.stop_daemon()
        client_a.release()
        server.reassign(b.mac, old_a)
        assert client_b.acquire() == old_a
        _route(lan, b)
        server.wait_lease(lambda rows: {(m, ip) for _, m, ip in rows} == {(b.mac, old_a)})
        assert _state(b.netns, lab)[0] == WALLED, "the kernel still walls the address while the daemon is down"
        started = time.monotonic()
        lab.start_daemon()
        print(f"daemon start to ready: {time.monotonic() - started:.2f}s")
        _await_state(b.netns, lab, FREE, time.time(), "daemon ready -> B on A's old address free")
        assert not _walled(lab, old_a)
        assert _session_status(lab, "dnsmasq")["sessions"] == 1, "B's lease is the only session left"


# ---------------------------------------------------------------------------- Kea


def test_kea4_release_frees_the_address_and_a_new_client_on_it_is_free(
        topo: Topology, lan: Lan, tmp_path: Path, stop_lab: list[Lab]) -> None:
    _need(("kea-dhcp4", "kea-dhcp4-server"), ("udhcpc", "udhcpc"))
    a, b = lan.clients
    leases = tmp_path / "kea-leases4.csv"
    lab = _lab(topo, lan, tmp_path, [{"kind": "kea", "path": str(leases)}])
    stop_lab.append(lab)
    only = "100.64.200.160"                  # a pool of one: B can only get the address A released
    with Kea4(lan.gateway_netns, lan.bridge, "100.64.200.0/24", (only, only), leases) as kea, \
            DhcpClient(a.netns, a.interface, tmp_path) as client_a, \
            DhcpClient(b.netns, b.interface, tmp_path) as client_b:
        lab.start_daemon()
        lab.start_portal()
        assert client_a.acquire() == only
        _route(lan, a)
        kea.wait_lease(lambda rows: any(r["address"] == only and r["hwaddr"] == a.mac for r in rows))
        _await_state(a.netns, lab, WALLED, _mtime(leases), "kea4 acquire -> A walled")
        assert _walled(lab, only)

        client_a.release()
        kea.wait_lease(lambda rows: rows[-1]["address"] == only and rows[-1]["valid_lifetime"] == "0")
        _wait(lambda: not _walled(lab, only), "kea4 release frees the address", lab)
        print(f"lag kea4 release -> address out of the kernel set: {(time.time() - _mtime(leases)) * 1000:.0f} ms")

        assert client_b.acquire() == only
        _route(lan, b)
        kea.wait_lease(lambda rows: rows[-1]["address"] == only and rows[-1]["hwaddr"] == b.mac)
        assert _state(b.netns, lab)[0] == FREE, "a paying client on the released address is free"
        time.sleep(0.6)                      # more than two poll intervals: nothing walls it later
        assert _state(b.netns, lab)[0] == FREE


def test_kea6_address_and_delegated_prefix_are_both_walled(
        topo: Topology, lan: Lan, tmp_path: Path, stop_lab: list[Lab]) -> None:
    _need(("kea-dhcp6", "kea-dhcp6-server"), ("dhclient", "isc-dhcp-client"))
    a = lan.clients[0]
    leases = tmp_path / "kea-leases6.csv"
    lab = _lab(topo, lan, tmp_path, [{"kind": "kea", "name": "kea6", "path": str(leases)}])
    stop_lab.append(lab)
    with Kea6(lan.gateway_netns, lan.bridge, "2001:db8:100:200::/64", "2001:db8:100:200::100 - 2001:db8:100:200::1ff",
              PD_POOL, leases) as kea, Dhcp6Client(a.netns, a.interface, tmp_path) as client:
        lab.start_daemon()
        lab.start_portal()
        address, prefix = client.acquire()
        assert prefix is not None
        kea.wait_lease(lambda rows: {r["lease_type"] for r in rows} == {"0", "2"})
        changed = _mtime(leases)
        _wait(lambda: _walled(lab, address) and _walled(lab, prefix),
              f"kea6 {address} and {prefix} in the kernel sets ({_walled_networks(lab)})", lab)
        print(f"lag kea6 lease -> address {address} and prefix {prefix} in the kernel: "
              f"{(time.time() - changed) * 1000:.0f} ms")
        # Traffic from the client's address and from a host inside its delegated prefix (routed
        # to the client by the gateway, as a CPE's LAN would be) is walled.
        inside = str(ipaddress.ip_network(prefix).network_address + 1)
        for netns, argv in ((lan.gateway_netns, ["route", "replace", prefix, "via", address, "dev", lan.bridge]),
                            (topo.upstream.netns, ["route", "replace", PD_POOL, "via", "2001:db8:198::1"]),
                            (a.netns, ["addr", "add", f"{inside}/128", "dev", "lo", "nodad"]),
                            (a.netns, ["route", "replace", "default", "via", lan.gateway6, "dev", a.interface,
                                       "onlink"])):
            r = _ns(netns, "ip", "-6", *argv)
            assert r.returncode == 0, (argv, r.stderr)
        assert _state(a.netns, lab, UPSTREAM6, address)[0] == WALLED, _state(a.netns, lab, UPSTREAM6, address)
        assert _state(a.netns, lab, UPSTREAM6, inside)[0] == WALLED, _state(a.netns, lab, UPSTREAM6, inside)

        explained = _cli(lab, "explain", inside)
        assert explained["subscriber"] == "C-A" and explained["restricted"] is True, explained
        held = {h for s in explained["sessions"] for h in s["addresses"]}
        assert any(ipaddress.ip_network(h) == ipaddress.ip_network(prefix) for h in held), explained

        client.release()
        kea.wait_lease(lambda rows: len(rows) >= 4 and all(r["valid_lifetime"] == "0" for r in rows[-2:]))
        _wait(lambda: not _walled(lab, address) and not _walled(lab, prefix),
              "kea6 release frees the address and the prefix", lab)
        assert _state(a.netns, lab, UPSTREAM6, inside)[0] == FREE, "the delegated prefix is free after the release"
