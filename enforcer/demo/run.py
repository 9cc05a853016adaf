"""``walled-garden demo``: a small ISP in network namespaces, restricted and released for real.

Builds a gateway, two subscribers, an upstream web host and a walled-garden (payment) host;
runs the enforcer and the portal on the gateway; shows with curl that the overdue subscriber
gets the portal while the other browses; sends a signed payment event like billing would;
and shows service restored, with the measured latency. Everything is removed afterwards,
also on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time

from .lab import Lab
from .topology import Topology

UPSTREAM = "http://198.51.100.10/"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


def _show(label: str, result: tuple[int, str, dict[str, str], float]) -> None:
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


def main() -> int:
    problems = preflight()
    if problems:
        for problem in problems:
            print(f"walled-garden demo: {problem}", file=sys.stderr)
        return 1
    _say("walled-garden demo: a simulated ISP in network namespaces (nothing leaves this machine)")
    with Topology(subscribers=2) as topo, tempfile.TemporaryDirectory(prefix="wg-demo-") as work:
        alice, bob = topo.subscribers
        _step("building the ISP")
        _say(f"   gateway        {topo.gateway.netns}: runs walled-garden (enforcer + portal)")
        _say(f"   subscriber 1   {alice.addr4} / {alice.addr6}  account C-1001, overdue")
        _say(f"   subscriber 2   {bob.addr4} / {bob.addr6}  account C-2002, paid up")
        _say("   internet host  198.51.100.10, payment site 203.0.113.10 (in the walled garden)")
        topo.serve_http(topo.upstream, "Welcome to the internet", ports=(80, 443))
        topo.serve_http(topo.garden, "Pay your bill here", ports=(80, 443))
        lab = Lab(topo, work, [{"id": "C-1001", "addresses": [alice.addr4, "2001:db8:100:1::/64"],
                                "reason": "overdue"}])
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
        _step("cleaning up")
        lab.stop_daemon()
    _say("   namespaces, processes and the table are gone. Done.")
    return 0
