"""Promise to pay, end to end: a walled-in subscriber presses the button on the portal page, the
gateway lets them out at once, billing receives one signed ``promise.made``, and a second
promise is refused.

Real namespaces, nftables, daemon and portal (``enforcer.demo``); billing is a tiny HTTP receiver
in the upstream namespace that writes what it receives to a file.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kernel_helpers import SUB1, tcp_connect
from standardwebhooks.webhooks import Webhook

from enforcer.control import request
from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

RECEIVER_PORT = 8099
TERM_DAYS = 3

# Billing's webhook endpoint: records every POST (headers and body) as one JSON line, answers 204.
# socketserver rather than http.server.HTTPServer: its server_bind would do a DNS lookup.
_RECEIVER = r"""
import json, socketserver, sys
from http.server import BaseHTTPRequestHandler

address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_POST(self):
        length = min(int(self.headers.get("Content-Length") or 0), 1 << 16)
        body = self.rfile.read(length)
        record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                  "body": body.decode("utf-8", "replace")}
        with open(out, "a") as file:
            file.write(json.dumps(record) + "\n")
        self.send_response(204)
        self.send_header("Connection", "close")
        self.end_headers()
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

with Server((address, port), Hook) as server:
    open(out + ".ready", "w").close()
    server.serve_forever()
"""

OUTBOX_SECRET = "whsec_" + base64.b64encode(b"promise-outbox-key-for-the-tests").decode()


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``predicate`` until true, at most ``timeout`` seconds (and so a bounded number of times)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s")


def received(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def billing(topo: Topology, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The receiver in the upstream namespace: (webhook URL, file it records to)."""
    record = tmp_path / "billing-received.jsonl"
    with open(tmp_path / "billing.log", "wb") as log:
        proc = topo.popen(topo.upstream.netns, sys.executable, "-c", _RECEIVER, topo.upstream.addr4,
                          str(RECEIVER_PORT), str(record), stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT)
    ready = Path(str(record) + ".ready")
    wait(lambda: ready.exists() or proc.poll() is not None, 10, "billing receiver listening")
    assert proc.poll() is None, (tmp_path / "billing.log").read_text()
    yield f"http://{topo.upstream.addr4}:{RECEIVER_PORT}/billing/hook", record
    # The topology kills the receiver's process group and deletes the namespaces.


@pytest.fixture
def promise_lab(topo: Topology, tmp_path: Path, billing: tuple[str, Path]) -> Iterator[Lab]:
    """Subscriber 1 walled in for an overdue bill (IPv4 and its IPv6 /64); promises allowed once."""
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64"],
                "reason": "overdue"}]
    lab = Lab(topo, tmp_path / "lab", entries)
    outbox_secret = lab.work / "outbox.secret"     # the promise webhook's own key, never the inbound one
    outbox_secret.write_text(OUTBOX_SECRET + "\n")
    outbox_secret.chmod(0o600)
    lab.config["policy"]["promise_to_pay"] = {"enabled": True, "term": f"{TERM_DAYS}d", "max": 1,
                                              "period": "90d", "reasons": ["overdue"], "webhook_url": billing[0],
                                              "webhook_secret_file": str(outbox_secret)}
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    with lab.serving():
        yield lab


def promise_form(page: str, portal_url: str) -> tuple[str, tuple[str, ...]]:
    """(action URL, curl arguments) of the page's promise form."""
    form = re.search(r'<form[^>]*action="([^"]*/promise)"[^>]*>(.*?)</form>', page, re.DOTALL)
    assert form, page[:3000]
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
    assert set(fields) == {"csrf", "lang"}, fields
    action = form.group(1) if form.group(1).startswith("http") else portal_url.rstrip("/") + form.group(1)
    return action, tuple(arg for name, value in fields.items() for arg in ("--data-urlencode", f"{name}={value}"))


def cli(lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enforcer.cli", *argv, "--config", str(lab.config_path)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)


def test_promise_to_pay_lets_the_subscriber_out_and_tells_billing_once(
        topo: Topology, promise_lab: Lab, billing: tuple[str, Path]) -> None:
    lab, sub = promise_lab, topo.subscribers[0]
    upstream = f"http://{topo.upstream.addr4}/"
    jar = str(lab.work / f"cookies-{sub.netns}")
    cookies = ("-c", jar, "-b", jar)

    # Walled in: plain HTTP goes to the portal, other TCP is refused.
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="subscriber restricted")
    before = lab.lookup(sub.addr4)
    assert before["promise"] == {"eligible": True, "why": "eligible", "term_seconds": TERM_DAYS * 86400.0}
    status, _, headers, _ = topo.curl(sub.netns, upstream)
    assert status == 302 and headers["location"] == lab.portal_url
    assert tcp_connect(topo, sub.netns, topo.upstream.addr4, 443)[0] == "ECONNREFUSED"

    # The page offers the promise, for the configured term.
    status, page, _, _ = topo.curl(sub.netns, lab.portal_url, extra=cookies)
    assert status == 200 and f"for {TERM_DAYS} days" in page, page[:3000]
    action, data = promise_form(page, lab.portal_url)
    assert action == lab.portal_url.rstrip("/") + "/promise"

    # Pressing it: the confirmation, and the kernel has let them out before it was sent.
    status, confirmation, headers, _ = topo.curl(sub.netns, action, extra=(*cookies, *data))
    assert status == 200, confirmation[:3000]
    assert "Your service is back until" in confirmation and "Please pay by then" in confirmation
    assert "location" not in headers
    started = time.monotonic()
    assert topo.curl(sub.netns, upstream)[:2] == (200, "UPSTREAM OK")
    assert time.monotonic() - started < 2.0
    assert tcp_connect(topo, sub.netns, topo.upstream.addr4, 443)[0] == "connected"
    assert topo.curl(sub.netns, f"http://[{topo.upstream.addr6}]:8000/")[:2] == (200, "UPSTREAM OK")
    after = lab.lookup(sub.addr4)
    assert after["restricted"] is False and after["promise"]["eligible"] is False

    # Billing hears of it exactly once, signed with the promise webhook's own secret.
    record = billing[1]
    wait(lambda: len(received(record)) >= 1, 10, "promise.made delivered to billing")
    time.sleep(1.0)  # nothing more should follow
    messages = received(record)
    assert len(messages) == 1, messages
    message = messages[0]
    assert message["path"] == "/billing/hook"
    payload = Webhook(OUTBOX_SECRET).verify(message["body"], message["headers"])
    instant = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
    assert payload["type"] == "promise.made" and instant.fullmatch(payload["timestamp"])
    made = payload["data"]
    assert made["subscriber"] == SUB1 and made["address"] == sub.addr4
    assert made["reference"] == before["reference"] and instant.fullmatch(made["until"])
    assert message["headers"]["webhook-id"].startswith("wg_promise_")

    # Support can see it: explain, on the command line and on the control socket.
    explained = cli(lab, "explain", SUB1)
    assert explained.returncode == 0, explained.stderr
    assert "free" in explained.stdout and "promise to pay" in explained.stdout, explained.stdout
    assert re.search(r"promise to pay \S+ - \S+: active", explained.stdout), explained.stdout
    answer = request(lab.socket, "GET", f"/v1/explain?q={SUB1}")
    assert [p["outcome"] for p in answer["promises"]] == ["active"]
    assert answer["promises"][0]["address"] == sub.addr4
    assert answer["promise_eligibility"] == "not_restricted"

    # A second press: nothing to promise while free ...
    status, page, _, _ = topo.curl(sub.netns, action, extra=(*cookies, *data))
    assert status == 409 and "nothing to promise" in page
    # ... and once an operator walls them in again, no promise gets them out.
    restricted = cli(lab, "restrict", SUB1, "--reason", "promise broken, per phone call")
    assert restricted.returncode == 0, restricted.stdout + restricted.stderr
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="restricted again")
    assert lab.lookup(sub.addr4)["promise"]["why"] == "operator_restriction"
    assert topo.curl(sub.netns, upstream)[0] == 302
    status, page, _, _ = topo.curl(sub.netns, lab.portal_url, extra=cookies)
    assert status == 200 and 'action="/promise"' not in page
    status, page, _, _ = topo.curl(sub.netns, action, extra=(*cookies, *data))
    assert status == 403 and "not available for this connection" in page
    assert topo.curl(sub.netns, upstream)[0] == 302
    assert len(received(record)) == 1, "billing heard of no second promise"
