"""``walled-garden demo``: a small ISP in network namespaces, restricted and released for real.

Builds a gateway, two subscribers, an upstream web host and a walled-garden (payment) host;
runs the enforcer and the portal on the gateway; shows with curl that the overdue subscriber
gets the portal while the other browses; sends a signed payment event like billing would;
and shows service restored, with the measured latency. Then the DHCP act: two more
subscribers get their addresses from a real dnsmasq (udhcpc clients), the list names the
overdue one by MAC only, and when its lease moves to a new address the walled garden follows
it while the old address, re-leased to a paying subscriber, is free. Everything is removed
afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import dhcp
from .dhcp import DhcpClient, DhcpError, Dnsmasq, Segment
from .lab import Lab
from .topology import Topology

UPSTREAM = "http://198.51.100.10/"
Fetch = tuple[int, str, dict[str, str], float]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


def _show(label: str, result: Fetch) -> None:
    status, body, headers, seconds = result
    if status == 0:
        _say(f"   {label}: refused at once, {seconds * 1000:.1f} ms ({body.splitlines()[-1] if body else 'no answer'})")
    elif status in (301, 302, 303, 307):
        _say(f"   {label}: {status} -> {headers.get('location')} (Cache-Control: {headers.get('cache-control')})")
    else:
        heading = re.search(r"<h1[^>]*>(.*?)</h1>", body, re.S)
        first = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", heading.group(1) if heading else body)).strip()[:90]
        _say(f"   {label}: {status} \"{first}\" in {seconds * 1000:.1f} ms")


def _event_to_enforce(topo: Topology) -> float | None:
    """Mean of walled_garden_event_to_enforce_seconds, scraped from the gateway's /metrics."""
    text = topo.run(topo.gateway.netns, "curl", "-s", "--max-time", "2", "http://127.0.0.1:9640/metrics").stdout
    values = dict(re.findall(r"^walled_garden_event_to_enforce_seconds_(sum|count) (\S+)$", text, re.M))
    try:
        return float(values["sum"]) / float(values["count"])
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def preflight() -> list[str]:
    problems = [] if os.geteuid() == 0 else ["run as root (network namespaces and nftables need it)"]
    problems += [f"'{tool}' not found (apt-get install nftables conntrack curl iproute2)"
                 for tool in ("nft", "conntrack", "curl", "ip") if shutil.which(tool) is None]
    return problems


def _restricted(lab: Lab, address: str) -> bool:
    return bool(lab.lookup(address).get("restricted"))


def _source_status(lab: Lab) -> dict[str, Any]:
    """The daemon's status of the demo's dnsmasq session source ({} when not reported)."""
    source = ((lab.status() or {}).get("sessions") or {}).get("dnsmasq")
    return source if isinstance(source, dict) else {}


def _changes(lab: Lab) -> int:
    changes = _source_status(lab).get("changes")
    return changes if isinstance(changes, int) else 0


def _lag(lab: Lab, changes_before: int) -> str:
    """The daemon's own measure of the session change made since ``changes_before`` commits,
    lease file written -> kernel commit. The kernel (what ``lookup`` reads) is changed before
    the status is, so this waits for the status to count the commit."""
    try:
        lab.wait_for(lambda: _changes(lab) > changes_before, 2.0, "the session change in the status")
    except AssertionError:
        return "not reported"
    lag = _source_status(lab).get("last_lag_seconds")
    return f"{lag * 1000:.0f} ms" if isinstance(lag, (int, float)) else "not reported"


def _fetch(topo: Topology, netns: str, label: str) -> Fetch:
    result = topo.curl(netns, UPSTREAM)
    _show(label, result)
    return result


def dhcp_act(topo: Topology, lab: Lab, segment: Segment, work: Path, lease_file: Path) -> bool:
    """Subscriber 3 (listed by MAC only) and 4 (paid up) lease addresses from dnsmasq; 3's lease
    moves to a reserved address and its old one goes to 4. True when the walled garden followed:
    the new address redirected, the old one free for the paying subscriber."""
    began = time.monotonic()
    overdue, paid = segment.clients
    _step("DHCP: two more subscribers get their addresses from dnsmasq on the gateway")
    _say(f"   segment        bridge {segment.bridge}, gateway {segment.gateway4}/24, "
         f"pool {dhcp.POOL4[0]}-{dhcp.POOL4[1]}; the daemon watches the lease file")
    _say(f"   subscriber 3   MAC {overdue.mac}  account C-3003, overdue: listed as "
         f"match: {{mac: {overdue.mac}}}, no address")
    _say(f"   subscriber 4   MAC {paid.mac}  account C-4004, paid up (not listed)")
    segment.build()
    with Dnsmasq(segment, work, lease_file) as server, DhcpClient(segment, overdue, work) as client3, \
            DhcpClient(segment, paid, work) as client4:
        started, changes = time.monotonic(), _changes(lab)
        old = client3.acquire()
        leased = time.monotonic() - started
        walled = lab.wait_for(lambda: _restricted(lab, old), 5.0, f"{old} (C-3003's lease) restricted")
        _say(f"   subscriber 3 leased {old} in {leased:.2f} s (udhcpc); walled {walled * 1000:.0f} ms after it was "
             f"bound (daemon: lease file written -> kernel commit {_lag(lab, changes)})")
        _fetch(topo, overdue.netns, "subscriber 3: GET http://198.51.100.10/")
        other = client4.acquire()
        _say(f"   subscriber 4 leased {other}")
        _fetch(topo, paid.netns, "subscriber 4: GET http://198.51.100.10/")

        new = next(a for a in (f"{dhcp.NET4}.{n}" for n in range(140, 143)) if a not in (old, other))
        _step(f"DHCP: C-3003's lease moves to {new} (dnsmasq reservation, then the client renews)")
        server.reserve(overdue.mac, new)
        started, changes = time.monotonic(), _changes(lab)
        moved = client3.renew()
        renewed = time.monotonic() - started
        followed = lab.wait_for(lambda: _restricted(lab, moved) and not _restricted(lab, old), 5.0,
                                f"{moved} restricted and {old} free")
        _say(f"   subscriber 3 renewed: NAK, 3 s wait, DISCOVER, bound to {moved} in {renewed:.1f} s")
        _say(f"   walled {moved} and freed {old} {followed * 1000:.0f} ms after it was bound "
             f"(daemon: lease file written -> kernel commit {_lag(lab, changes)})")
        garden = _fetch(topo, overdue.netns, f"subscriber 3 at {moved}: GET http://198.51.100.10/")

        _step(f"DHCP: the old address {old} is re-leased to C-4004 (paid up)")
        server.reserve(paid.mac, old)
        handed = client4.renew()
        _say(f"   subscriber 4 renewed: bound to {handed}; the daemon: {handed} restricted: {_restricted(lab, handed)}")
        free = _fetch(topo, paid.netns, f"subscriber 4 at {handed}: GET http://198.51.100.10/")
    redirected = garden[0] in (302, 303, 307) and garden[2].get("location") == lab.portal_url
    ok = moved == new and handed == old and redirected and free[0] == 200
    _say(f"   DHCP act: {'ok' if ok else 'FAILED'} in {time.monotonic() - began:.1f} s "
         f"(C-3003 {old} -> {moved}: {'redirected' if redirected else f'NOT redirected ({garden[0]})'}; "
         f"{handed} for C-4004: {'free' if free[0] == 200 else f'NOT free ({free[0]})'})")
    return ok


def main() -> int:
    problems = preflight()
    if problems:
        for problem in problems:
            print(f"walled-garden demo: {problem}", file=sys.stderr)
        return 1
    # The DHCP act is optional for people trying the demo: without its tools it is skipped (the
    # kernel test runs under CI, where the tools are installed, and fails instead).
    dhcp_missing = dhcp.missing_tools()
    _say("walled-garden demo: a simulated ISP in network namespaces (nothing leaves this machine)")
    with Topology(subscribers=2) as topo, tempfile.TemporaryDirectory(prefix="wg-demo-") as work:
        alice, bob = topo.subscribers
        segment = Segment(topo)
        lease_file = Path(work) / "dnsmasq.leases"
        lease_file.touch()   # the daemon watches it from the start; dnsmasq fills it in the DHCP act
        _step("building the ISP")
        _say(f"   gateway        {topo.gateway.netns}: runs walled-garden (enforcer + portal)")
        _say(f"   subscriber 1   {alice.addr4} / {alice.addr6}  account C-1001, overdue")
        _say(f"   subscriber 2   {bob.addr4} / {bob.addr6}  account C-2002, paid up")
        _say("   internet host  198.51.100.10, payment site 203.0.113.10 (in the walled garden)")
        topo.serve_http(topo.upstream, "Welcome to the internet", ports=(80, 443))
        topo.serve_http(topo.garden, "Pay your bill here", ports=(80, 443))
        listed: list[dict[str, Any]] = [{"id": "C-1001", "addresses": [alice.addr4, "2001:db8:100:1::/64"],
                                         "reason": "overdue"}]
        if not dhcp_missing:
            listed.append({"id": "C-3003", "match": {"mac": segment.clients[0].mac}, "reason": "overdue"})
        lab = Lab(topo, work, listed, interfaces=[] if dhcp_missing else [segment.bridge],
                  sessions=[] if dhcp_missing else [{"kind": "dnsmasq", "path": str(lease_file)}])
        lab.start_daemon()
        lab.start_portal()
        _say(f"   enforcer and portal running; billing list says C-1001 is restricted ({lab.list_path})")

        _step("subscriber 2 (paid up) browses normally")
        _show("GET http://198.51.100.10/", topo.curl(bob.netns, UPSTREAM))

        _step("subscriber 1 (overdue) is in the walled garden")
        _show("GET http://198.51.100.10/", topo.curl(alice.netns, UPSTREAM))
        _show(f"GET {lab.portal_url}", topo.curl(alice.netns, lab.portal_url))
        _show("HTTPS to 198.51.100.10", topo.curl(alice.netns, "https://198.51.100.10/"))
        _show("payment site 203.0.113.10", topo.curl(alice.netns, "http://203.0.113.10/"))

        _step("billing sends a signed payment.received webhook for C-1001")
        sent = time.perf_counter()
        result = lab.send_event("payment.received", "C-1001")
        _say(f"   webhook answer {result['status']}: {result['answer'].get('result')}, "
             f"mode now {result['answer'].get('mode')}")
        restored = topo.curl(alice.netns, UPSTREAM)
        restored_at = time.perf_counter() - sent
        _show("GET http://198.51.100.10/ right after", restored)
        if result["status"] != 200 or restored[0] != 200:
            _say("   service was NOT restored; daemon log follows\n" + lab.log())
            return 1

        _step("measured")
        committed = _event_to_enforce(topo)
        if committed is not None:
            _say("   lift latency, event received -> kernel commit (daemon's own histogram): "
                 f"{committed * 1000:.2f} ms")
        _say(f"   lift latency, webhook sent -> 200 (kernel committed, connections flushed): "
             f"{result['seconds'] * 1000:.1f} ms")
        _say(f"   billing process started -> subscriber's next page loaded from the internet host: "
             f"{restored_at * 1000:.0f} ms (includes starting Python and curl)")
        if dhcp_missing:
            _step("DHCP act skipped")
            _say(f"   needs {', '.join(dhcp_missing)}: apt install {' '.join(dhcp.TOOLS.values())}")
        else:
            try:
                if not dhcp_act(topo, lab, segment, Path(work), lease_file):
                    _say("   the walled garden did NOT follow the lease; daemon log follows\n" + lab.log())
                    return 1
            except (DhcpError, AssertionError) as exc:   # a peer that did not answer, a wait_for timeout
                _say(f"   DHCP act FAILED: {exc}")
                return 1
        _step("cleaning up")
        lab.stop_daemon()
    _say("   namespaces, processes (dnsmasq, udhcpc too) and the table are gone. Done.")
    return 0
