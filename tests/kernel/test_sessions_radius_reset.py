"""SPEC §9 audit findings on the real kernel, FreeRADIUS's ``radclient`` playing the BNG:

- a NAS that rebooted (Accounting-On) numbers its sessions afresh; its new Start for a session
  id it had stopped before the reboot must wall the subscriber at once (it was answered and
  ignored for up to 600 s, the Stop's tombstone outliving the reboot);
- a newer session whose address lies inside an older session's prefix holds it: the older
  restricted prefix is released whole (it stayed walled, walling a paying subscriber), and
  ``explain`` of the address names the paying customer's session.

Layout: the demo Topology, the daemon's radius source on the gateway's upstream-side address,
only the upstream host (the "NAS") in ``clients``. Every radclient call is bounded (1 s, one
retry); every wait is bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from dhcp_peers import RadclientResult, radclient
from test_sessions_radius import LISTEN_HOST, NAS, PORT, SECRET, UPSTREAM6, USER, _radius, _state

from enforcer.control import request
from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology
from required import tool

PD_USER, PAYER = "c-pd@isp.example", "payer6@isp.example"
#: Subscriber 1's and 2's IPv6 addresses (2001:db8:100:1::10, 2001:db8:100:2::10) both lie in it.
PD = "2001:db8:100::/60"


@pytest.fixture
def radius_lab(topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """The daemon with a radius source; C-R (by User-Name) and C-PD (by User-Name) are listed."""
    tool("radclient", "freeradius-utils")
    secret_file = tmp_path / "radius.secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    lab = Lab(topo, tmp_path, [{"id": "C-R", "match": {"username": USER}, "reason": "overdue"},
                               {"id": "C-PD", "match": {"username": PD_USER}, "reason": "overdue"}])
    lab.config["gateway"]["subscriber_prefixes"] = ["100.64.0.0/16", "2001:db8:100::/48"]
    lab.config["subscribers"]["sessions"] = [{"kind": "radius", "listen": f"{LISTEN_HOST}:{PORT}",
                                              "secret_file": str(secret_file), "clients": [f"{NAS}/32"]}]
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    try:
        lab.start_daemon()
        lab.start_portal()
        lab.wait_for(lambda: _radius(lab).get("listening") is True, what="the radius source listening")
        yield lab
    finally:
        lab.stop_daemon()
        print(lab.log())


def _send(topo: Topology, attributes: dict[str, str | int]) -> RadclientResult:
    answer = radclient(LISTEN_HOST, PORT, SECRET, {"NAS-IP-Address": NAS, **attributes},
                       netns=topo.upstream.netns, timeout=1.0, retries=1)
    assert answer.answered, answer.output
    return answer


def _explain(lab: Lab, query: str) -> dict[str, Any]:
    answer = request(lab.socket, "GET", f"/v1/explain?q={quote(query)}", timeout=5.0)
    assert isinstance(answer, dict), answer
    return answer


def test_a_rebooted_nas_reusing_a_session_id_walls_at_once(topo: Topology, radius_lab: Lab) -> None:
    lab, sub = radius_lab, topo.subscribers[0]
    start = {"Acct-Session-Id": "00000001", "User-Name": USER, "Framed-IP-Address": sub.addr4}
    _send(topo, {"Acct-Status-Type": "Start", **start})
    assert _state(topo, lab, sub.netns) == "walled", lab.log()
    _send(topo, {"Acct-Status-Type": "Stop", "Acct-Session-Id": "00000001"})
    assert _state(topo, lab, sub.netns) == "free", lab.log()

    _send(topo, {"Acct-Status-Type": "Accounting-On"})          # the NAS rebooted
    _send(topo, {"Acct-Status-Type": "Start", **start})          # its first session is 00000001 again
    assert _state(topo, lab, sub.netns) == "walled", f"answered but not walled\n{lab.log()}"
    _send(topo, {"Acct-Status-Type": "Interim-Update", **start})
    report = _radius(lab)
    assert report["sessions"] == 1 and report["stale"] == 0, report


def test_a_paying_address_inside_an_older_restricted_prefix_frees_the_prefix(topo: Topology, radius_lab: Lab) -> None:
    lab = radius_lab
    sub, other = topo.subscribers
    _send(topo, {"Acct-Status-Type": "Start", "Acct-Session-Id": "pd-1", "User-Name": PD_USER,
                 "Delegated-IPv6-Prefix": PD})
    assert _state(topo, lab, sub.netns, UPSTREAM6) == "walled", lab.log()
    assert _state(topo, lab, other.netns, UPSTREAM6) == "walled", "the /60 covers subscriber 2 too"

    _send(topo, {"Acct-Status-Type": "Start", "Acct-Session-Id": "pay-1", "User-Name": PAYER,
                 "Framed-IPv6-Address": sub.addr6})
    assert _state(topo, lab, sub.netns, UPSTREAM6) == "free", f"the payer's address stayed walled\n{lab.log()}"
    assert _state(topo, lab, other.netns, UPSTREAM6) == "free", "the older /60 is released whole"
    answer = _explain(lab, sub.addr6)
    assert answer["found"] is False and answer["session"]["key"] == f"{NAS}/pay-1", answer
    assert answer["session"]["subscriber"] is None and answer["session"]["match"] == {"username": PAYER}, answer

    _send(topo, {"Acct-Status-Type": "Stop", "Acct-Session-Id": "pay-1"})
    assert _state(topo, lab, other.netns, UPSTREAM6) == "walled", "the payer gone, C-PD's prefix holds again"
    held = _explain(lab, other.addr6)
    assert (held["subscriber"], held["session"]["key"]) == ("C-PD", f"{NAS}/pd-1"), held
