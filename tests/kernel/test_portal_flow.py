"""Portal behaviour seen from a subscriber's namespace: OS captive probes, notice acknowledgement."""

from __future__ import annotations

import re
import time

import pytest
from kernel_helpers import SUB1

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

PROBES = [
    ("connectivitycheck.gstatic.com", "/generate_204"),          # Android
    ("captive.apple.com", "/hotspot-detect.html"),                # Apple
    ("www.msftconnecttest.com", "/connecttest.txt"),             # Windows
    ("detectportal.firefox.com", "/canonical.html"),             # Firefox
]


@pytest.mark.parametrize("host, path", PROBES)
def test_os_captive_probes_get_the_302(topo: Topology, lab: Lab, host: str, path: str) -> None:
    # --resolve pins the probe host name to our upstream test host: no name lookup, no outside traffic.
    resolve = ("--resolve", f"{host}:80:198.51.100.10")
    status, _, headers, _ = topo.curl(topo.subscribers[0].netns, f"http://{host}{path}", extra=resolve)
    assert status == 302 and headers["location"] == lab.portal_url
    assert "no-store" in headers["cache-control"]
    status, body, _, _ = topo.curl(topo.subscribers[1].netns, f"http://{host}{path}", extra=resolve)
    assert (status, body) == (200, "UPSTREAM OK"), "a free subscriber's probe reaches the internet"


def test_captive_api_answers_per_caller(topo: Topology, lab: Lab) -> None:
    api = lab.portal_url + "api/captive"
    status, body, headers, _ = topo.curl(topo.subscribers[0].netns, api)
    assert status == 200 and headers["content-type"].startswith("application/captive+json")
    assert '"captive": true' in body.replace('":true', '": true')
    status, body, _, _ = topo.curl(topo.subscribers[1].netns, api)
    assert status == 200 and '"captive": false' in body.replace('":false', '": false')


def test_notice_subscriber_acknowledges_and_then_reaches_the_upstream(topo: Topology, lab: Lab) -> None:
    notice = topo.subscribers[1]
    lab.write_list([{"id": SUB1, "addresses": [topo.subscribers[0].addr4]},
                    {"id": "C-2002", "addresses": [notice.addr4], "mode": "notice", "reason": "overdue"}])
    lab.wait_for(lambda: lab.lookup(notice.addr4)["mode"] == "notice", timeout=3, what="notice mode applied")
    # Nothing but HTTP is touched in notice mode.
    assert topo.curl(notice.netns, "http://198.51.100.10:8000/")[:2] == (200, "UPSTREAM OK")
    wanted = "http://198.51.100.10/some/page?x=1"
    status, _, headers, _ = topo.curl(notice.netns, wanted)
    assert status == 302 and headers["location"] == lab.portal_url
    jar = f"{lab.work}/cookies-{notice.netns}"
    status, page, _, _ = topo.curl(notice.netns, lab.portal_url, extra=("-c", jar, "-b", jar))
    assert status == 200
    form = re.search(r'<form[^>]*action="([^"]+)"', page)
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page))
    assert form and fields, page[:2000]
    action = form.group(1) if form.group(1).startswith("http") else lab.portal_url.rstrip("/") + form.group(1)
    data = tuple(arg for name, value in fields.items() for arg in ("--data-urlencode", f"{name}={value}"))
    status, _, headers, _ = topo.curl(notice.netns, action, extra=("-c", jar, "-b", jar, *data))
    assert status == 303, headers
    assert headers["location"] == wanted, "continue returns to the page the subscriber asked for, only"
    started = time.monotonic()
    status, body, _, _ = topo.curl(notice.netns, wanted)
    assert (status, body) == (200, "UPSTREAM OK")
    assert time.monotonic() - started < 1.0
    assert lab.lookup(notice.addr4)["ack_until"] is not None
    # The acknowledgement is a kernel element with a timeout: it survives a portal or daemon restart.
    elements = topo.run(topo.gateway.netns, "nft", "list", "set", "inet", lab.table, "noticeack4_32").stdout
    assert notice.addr4 in elements and "expires" in elements
    lab.stop_daemon()
    lab.start_daemon()
    assert topo.curl(notice.netns, wanted)[:2] == (200, "UPSTREAM OK")
    # A walled-garden subscriber cannot acknowledge the restriction away.
    assert topo.curl(topo.subscribers[0].netns, wanted)[0] == 302
