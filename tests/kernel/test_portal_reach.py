"""The portal as a browser reaches it: through ``portal.url``, with the shipped example's config.

``portal.url`` is ``http://portal.isp.example/`` and the portal listens on ``0.0.0.0:8080``, as
in config/config.example.yaml; the subscriber resolves portal.isp.example to the gateway's
address on its link (as the ISP's DNS would). Real namespaces, nftables, daemon
(``walled-garden run``) and portal (``walled-garden portal``).

The "browser" is a small HTTP/1.1 client running in the subscriber's namespace (``BROWSER``),
driven line by line from the test: one keep-alive connection per host, cookies kept, Origin
sent with forms as Chromium sends it (``null`` from a page with ``Referrer-Policy: no-referrer``,
checked on this machine's Chromium), and the local port of the connection each answer came on, so a test can
check that the button's POST rode the connection that carried the page, as a browser's does.
The lift's conntrack flush once cut exactly that connection (the confirmation never arrived),
and a free subscriber's reload of ``portal.url`` was refused (only restricted subscribers were
redirected to the listener).

The last test does the promise in headless Chromium, driven over the DevTools protocol, and
saves screenshots before and after under ``test-output/browser/``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import yaml
from kernel_helpers import SUB1

from enforcer.demo.lab import PORTAL_PORT, Lab
from enforcer.demo.topology import Topology
from required import tool

PORTAL_HOST = "portal.isp.example"
PORTAL_URL = f"http://{PORTAL_HOST}/"
ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "browser"
#: Upper bound for any one request of the browser (a hung confirmation fails at this, loudly).
REQUEST_TIMEOUT = 8.0
ACTIVE = "Your service is active"
PROMISED = "Your service is back until"

# One HTTP/1.1 client, commands as JSON lines on stdin, answers as JSON lines on stdout.
BROWSER = r"""
import http.client, json, sys, urllib.parse
resolve = json.loads(sys.argv[1])
connections, cookies, policies = {}, {}, {}
for line in sys.stdin:
    command = json.loads(line)
    try:
        url = urllib.parse.urlsplit(command["url"])
        key = (url.hostname, url.port or 80)
        conn = connections.get(key)
        fresh = command.get("fresh", False) or conn is None or conn.sock is None
        if fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(resolve.get(url.hostname, url.hostname), key[1],
                                              timeout=command.get("timeout", 8))
            conn.connect()
            conn.auto_open = 0          # never reconnect behind the test's back
            connections[key] = conn
        local = conn.sock.getsockname()[1]
        headers = {"Host": url.netloc, "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) walled-garden-test",
                   "Accept": "text/html,application/xhtml+xml,*/*", "Accept-Language": "en-US,en;q=0.9"}
        if command.get("accept"):
            headers["Accept"] = command["accept"]
        if cookies:
            headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
        body = None
        if command.get("form") is not None:
            body = urllib.parse.urlencode(command["form"])
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            # Fetch's "serializing a request origin", as Chromium does it (checked): a POST from a
            # page served with Referrer-Policy: no-referrer says Origin: null and no Referer.
            if policies.get(key) == "no-referrer":
                headers["Origin"] = "null"
            else:
                headers["Origin"] = f"{url.scheme}://{url.netloc}"
                headers["Referer"] = command.get("referer", f"{url.scheme}://{url.netloc}/")
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            cookies[name.strip()] = rest.split(";")[0]
        if body is None and "html" in (response.headers.get("Content-Type") or ""):
            policies[key] = (response.headers.get("Referrer-Policy") or "").split(",")[-1].strip().lower()
        if response.will_close:
            conn.close()
        answer = {"status": response.status, "headers": {k.lower(): v for k, v in response.getheaders()},
                  "body": data.decode("utf-8", "replace"), "conn": local, "fresh": fresh}
    except Exception as exc:   # every failure is the test's to judge: reported, never swallowed
        answer = {"error": f"{type(exc).__name__}: {exc}"}
        connections.pop(key, None)
    print(json.dumps(answer), flush=True)
"""


class Browser:
    """The ``BROWSER`` process in a subscriber's namespace."""

    def __init__(self, topo: Topology, netns: str, resolve: dict[str, str]) -> None:
        self.proc = topo.popen(netns, sys.executable, "-c", BROWSER, json.dumps(resolve), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"timeout": REQUEST_TIMEOUT, **command}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()      # bounded: every request has REQUEST_TIMEOUT
        if not line:
            raise AssertionError(f"the browser process died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return json.loads(line)

    def get(self, url: str, fresh: bool = False, accept: str | None = None) -> dict[str, Any]:
        return self._ask({"url": url, "fresh": fresh, "accept": accept})

    def post(self, url: str, form: dict[str, str], referer: str = PORTAL_URL) -> dict[str, Any]:
        return self._ask({"url": url, "form": form, "referer": referer})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def form_of(page: str, action_suffix: str) -> tuple[str, dict[str, str]]:
    """(absolute action URL, hidden fields) of the page's form whose action ends in ``action_suffix``."""
    for match in re.finditer(r'<form[^>]*action="([^"]*)"[^>]*>(.*?)</form>', page, re.DOTALL):
        if match.group(1).endswith(action_suffix):
            fields = {unescape(name): unescape(value) for name, value in
                      re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', match.group(2))}
            return urljoin(PORTAL_URL, unescape(match.group(1))), fields
    raise AssertionError(f"no form with action ending in {action_suffix!r} in the page: {page[:3000]}")


def step(answer: dict[str, Any], what: str, status: int | tuple[int, ...], lab: Lab) -> dict[str, Any]:
    """Assert one answer's status, naming the step and showing the logs when it fails."""
    wanted = (status,) if isinstance(status, int) else status
    if answer.get("status") not in wanted:
        raise AssertionError(f"step {what!r}: expected {wanted}, got {answer.get('error') or answer.get('status')}\n"
                             f"body: {answer.get('body', '')[:1500]}\n--- daemon log ---\n{lab.log()}\n"
                             f"--- portal log ---\n{lab.log('portal.log')}")
    return answer


@pytest.fixture
def reach_lab(topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """Subscriber 1 walled in (overdue, IPv4 and its /64), promises allowed; the example's portal
    settings; subscriber 2 free."""
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64"], "reason": "overdue"}]
    lab = Lab(topo, tmp_path / "lab", entries)
    lab.config["portal"]["url"] = PORTAL_URL
    lab.config["portal"]["listen"] = f"0.0.0.0:{PORTAL_PORT}"
    lab.config["policy"]["promise_to_pay"] = {"enabled": True, "term": "3d", "max": 1, "period": "90d",
                                              "reasons": ["overdue"]}
    lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
    lab.portal_url = PORTAL_URL
    with lab.serving():
        yield lab


@pytest.fixture
def browser(topo: Topology, reach_lab: Lab) -> Iterator[Browser]:
    """Subscriber 1's browser; portal.isp.example is the gateway's address on its link."""
    handle = Browser(topo, topo.subscribers[0].netns, {PORTAL_HOST: topo.gateway_addr4(1)})
    try:
        yield handle
    finally:
        handle.close()


def redirected_to_the_portal(browser: Browser, lab: Lab, wanted: str) -> dict[str, Any]:
    """Browse ``wanted`` while walled in: 302 to portal.url, follow it, the page (200)."""
    answer = step(browser.get(wanted), f"GET {wanted} while restricted", 302, lab)
    assert answer["headers"]["location"] == PORTAL_URL, answer["headers"]
    return step(browser.get(answer["headers"]["location"]), "follow the 302 to portal.url", 200, lab)


def reload_says_active(browser: Browser, lab: Lab, what: str) -> None:
    """``portal.url`` reloaded, on a fresh connection (a refused one would fail here): service active."""
    page = step(browser.get(PORTAL_URL, fresh=True), f"reload portal.url {what}", 200, lab)
    assert ACTIVE in page["body"], f"reload {what}: {page['body'][:2000]}"


def test_promise_through_portal_url_confirmation_arrives_on_the_pages_connection(
        topo: Topology, reach_lab: Lab, browser: Browser) -> None:
    lab, sub = reach_lab, topo.subscribers[0]
    upstream = f"http://{topo.upstream.addr4}/news?id=7"
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="subscriber restricted")
    page = redirected_to_the_portal(browser, lab, upstream)
    action, fields = form_of(page["body"], "/promise")
    assert action == PORTAL_URL + "promise" and "csrf" in fields, (action, fields)

    confirmation = step(browser.post(action, fields), "POST the promise on the page's connection", 200, lab)
    assert confirmation["conn"] == page["conn"] and not confirmation["fresh"], \
        "the POST must ride the keep-alive connection that carried the page"
    assert PROMISED in confirmation["body"], confirmation["body"][:2000]
    assert lab.lookup(sub.addr4)["restricted"] is False

    assert step(browser.get(upstream), "browse upstream after the promise", 200, lab)["body"] == "UPSTREAM OK"
    reload_says_active(browser, lab, "after the promise")


def test_continue_in_notice_mode_through_portal_url(topo: Topology, reach_lab: Lab, browser: Browser) -> None:
    lab, sub = reach_lab, topo.subscribers[0]
    lab.write_list([{"id": SUB1, "addresses": [sub.addr4], "mode": "notice", "reason": "overdue"}])
    lab.wait_for(lambda: lab.lookup(sub.addr4)["mode"] == "notice", timeout=5, what="notice mode applied")
    wanted = f"http://{topo.upstream.addr4}/some/page?x=1"
    page = redirected_to_the_portal(browser, lab, wanted)
    action, fields = form_of(page["body"], "/continue")
    answer = step(browser.post(action, fields), "POST Continue on the page's connection", 303, lab)
    assert answer["conn"] == page["conn"] and not answer["fresh"], "Continue rides the page's connection"
    assert answer["headers"]["location"] == wanted
    assert step(browser.get(wanted), "the page asked for, after Continue", 200, lab)["body"] == "UPSTREAM OK"
    again = step(browser.get(PORTAL_URL, fresh=True), "reload portal.url after Continue", 200, lab)
    assert "/continue" not in again["body"] or ACTIVE in again["body"], again["body"][:2000]


def test_a_payment_while_the_page_is_open_then_reload_shows_service_active(
        topo: Topology, reach_lab: Lab, browser: Browser) -> None:
    lab, sub = reach_lab, topo.subscribers[0]
    upstream = f"http://{topo.upstream.addr4}/"
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="subscriber restricted")
    page = redirected_to_the_portal(browser, lab, upstream)
    answer = lab.send_event("payment.received", SUB1)
    assert answer.get("restricted") is False or "error" not in answer, answer
    lab.wait_for(lambda: not lab.lookup(sub.addr4)["restricted"], timeout=5, what="payment lifted")
    # The page is open on a keep-alive connection: a reload on it (what a browser does first) ...
    reload = step(browser.get(PORTAL_URL), "reload portal.url on the page's connection", 200, lab)
    assert reload["conn"] == page["conn"], "the flush spared the portal connection"
    assert ACTIVE in reload["body"], reload["body"][:2000]
    # ... and on a new one.
    reload_says_active(browser, lab, "after the payment")
    assert step(browser.get(upstream), "browse upstream after the payment", 200, lab)["body"] == "UPSTREAM OK"


def test_captive_api_through_portal_url_before_during_and_after(topo: Topology, reach_lab: Lab,
                                                                  browser: Browser) -> None:
    lab, sub = reach_lab, topo.subscribers[0]
    api = PORTAL_URL + "api/captive"
    accept = "application/captive+json"

    def captive(what: str) -> bool:
        answer = step(browser.get(api, fresh=True, accept=accept), f"/api/captive {what}", 200, lab)
        assert answer["headers"]["content-type"].startswith(accept), answer["headers"]
        return json.loads(answer["body"])["captive"]

    lab.write_list([])
    lab.wait_for(lambda: not lab.lookup(sub.addr4)["restricted"], timeout=5, what="free before")
    assert captive("before the restriction") is False
    lab.write_list([{"id": SUB1, "addresses": [sub.addr4, "2001:db8:100:1::/64"], "reason": "overdue"}])
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="restricted")
    assert captive("during the restriction") is True
    answer = lab.send_event("payment.received", SUB1)
    lab.wait_for(lambda: not lab.lookup(sub.addr4)["restricted"], timeout=5, what=f"lifted ({answer})")
    assert captive("after the restriction") is False
    # a subscriber who was never restricted gets it too
    other = Browser(topo, topo.subscribers[1].netns, {PORTAL_HOST: topo.gateway_addr4(2)})
    try:
        answer = step(other.get(api, accept=accept), "/api/captive of a free subscriber", 200, lab)
        assert json.loads(answer["body"])["captive"] is False
    finally:
        other.close()


# -- headless Chromium, driven over the DevTools protocol -----------------------------------------
#: Runs in the subscriber's namespace: starts Chromium with a DevTools port on loopback there,
#: browses upstream (302 to portal.url), screenshots the page, presses the promise button,
#: screenshots the answer, then loads upstream again. Prints one JSON line of what it saw.
CHROMIUM_DRIVER = r"""
import asyncio, base64, json, os, shutil, socket, subprocess, sys, tempfile, time
import aiohttp
chromium, portal_host, gateway, upstream, before_png, after_png, timeout = sys.argv[1:8]
timeout = float(timeout)
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
profile = tempfile.mkdtemp(prefix="wg-chromium-")
flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--disable-features=NetworkTimeServiceQuerying,HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
         f"--host-resolver-rules=MAP {portal_host} {gateway}, MAP * ~NOTFOUND, EXCLUDE {upstream}",
         "--proxy-server=127.0.0.1:9", f"--proxy-bypass-list={portal_host};{upstream}",
         f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
         f"--user-data-dir={profile}", "--window-size=412,915", "--hide-scrollbars", "about:blank"]
proc = subprocess.Popen([chromium, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True)
result = {}

async def drive():
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    targets = [t for t in await answer.json() if t.get("type") == "page"]
                if targets:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium's DevTools port did not answer")
            await asyncio.sleep(0.2)
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=1 << 26) as ws:
            ids = iter(range(1, 10 ** 6))
            async def call(method, **params):
                number = next(ids)
                await ws.send_json({"id": number, "method": method, "params": params})
                while True:
                    message = await asyncio.wait_for(ws.receive_json(), timeout)
                    if message.get("id") == number:
                        if "error" in message:
                            raise RuntimeError(f"{method}: {message['error']}")
                        return message.get("result", {})
            async def load(action):
                await call("Page.enable")
                await action()
                end = time.monotonic() + timeout
                while time.monotonic() < end:
                    state = await call("Runtime.evaluate", expression="document.readyState + ' ' + location.href",
                                       returnByValue=True)
                    value = state["result"].get("value", "")
                    if value.startswith("complete") and "about:blank" not in value:
                        return value.split(" ", 1)[1]
                    await asyncio.sleep(0.2)
                raise TimeoutError("page did not finish loading")
            async def text():
                answer = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                    returnByValue=True)
                return answer["result"].get("value", "")
            async def shot(path):
                data = await call("Page.captureScreenshot", format="png")
                with open(path, "wb") as out:
                    out.write(base64.b64decode(data["data"]))
            result["before_url"] = await load(lambda: call("Page.navigate", url=f"http://{upstream}/"))
            result["before_text"] = await text()
            await shot(before_png)
            await call("Runtime.evaluate", expression="window.__marker = 1", returnByValue=True)
            clicked = await call("Runtime.evaluate", returnByValue=True, expression=
                "(() => { const f = [...document.forms].find(f => f.action.endsWith('/promise'));"
                " if (!f) return false; const b = f.querySelector('button, input[type=submit]');"
                " if (b) b.click(); else f.submit(); return true; })()")
            result["clicked"] = clicked["result"].get("value")
            end = time.monotonic() + timeout
            while time.monotonic() < end:   # the old document (with the marker) is gone when the answer renders
                state = await call("Runtime.evaluate", returnByValue=True,
                                   expression="(window.__marker ? 'old' : document.readyState) + ' ' + location.href")
                value = state["result"].get("value", "")
                if value.startswith("complete"):
                    break
                await asyncio.sleep(0.2)
            result["after_state"] = value
            result["after_text"] = await text()
            await shot(after_png)
            result["upstream_url"] = await load(lambda: call("Page.navigate", url=f"http://{upstream}/"))
            result["upstream_text"] = await text()

try:
    asyncio.run(asyncio.wait_for(drive(), timeout * 4))
except Exception as exc:   # reported to the test with whatever was seen so far
    result["error"] = f"{type(exc).__name__}: {exc}"
finally:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(10)
    shutil.rmtree(profile, ignore_errors=True)
print(json.dumps(result), flush=True)
"""


def test_promise_in_headless_chromium_with_screenshots(topo: Topology, reach_lab: Lab) -> None:
    chromium = tool("chromium", "chromium")
    lab, sub = reach_lab, topo.subscribers[0]
    lab.wait_for(lambda: lab.lookup(sub.addr4)["restricted"], timeout=5, what="subscriber restricted")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    before, after = OUTPUT / "promise-before.png", OUTPUT / "promise-after.png"
    for shot in (before, after):
        shot.unlink(missing_ok=True)
    run = topo.run(sub.netns, sys.executable, "-c", CHROMIUM_DRIVER, chromium, PORTAL_HOST, topo.gateway_addr4(1),
                   topo.upstream.addr4, str(before), str(after), "20", timeout=150)
    lines = run.stdout.strip().splitlines()
    assert lines, f"the Chromium driver printed nothing: {run.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    where = f"Chromium saw: {json.dumps(seen)[:3000]}\n--- daemon log ---\n{lab.log()}"
    assert before.is_file() and before.stat().st_size > 5 * 1024, where
    assert seen.get("before_url") == PORTAL_URL, where
    assert "I promise" in seen.get("before_text", "") or "promise" in seen.get("before_text", "").lower(), where
    assert seen.get("clicked") is True, where
    assert "error" not in seen, where
    assert after.is_file() and after.stat().st_size > 5 * 1024, where
    assert PROMISED in seen.get("after_text", ""), where
    assert seen.get("upstream_text") == "UPSTREAM OK", where
