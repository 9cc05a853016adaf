"""The portal page in a real browser: headless Chromium renders it, in English and in Czech.

The portal runs as ``walled-garden portal`` would (``python -m enforcer.cli portal``) on
127.0.0.1, asking a fake enforcer on a Unix socket that says every caller is restricted.
Chromium (Debian's ``chromium`` package, installed by ``.ci/install``) then

* dumps the rendered DOM: the ``<h1>`` must be the catalogue's heading for the language, the
  provider's phone number must be there, and ``<html lang>`` must name the language;
* takes a phone-sized screenshot (412x915) kept in ``test-output/browser/portal-<lang>.png``
  for a human to look at.

Czech is reached twice: through the page's own language switcher (``?lang=cs``, with the
browser still asking for English) and through the browser's ``Accept-Language: cs``. The Czech
strings come from ``captive_portal.messages`` at test time, so the test follows the catalogue.

Only loopback traffic, by construction: the portal and Chromium run in a network namespace of
their own that has nothing but ``lo`` (the fake enforcer's Unix socket is a file, reachable from
there). Chromium also gets a fresh profile, background networking off, every host name resolved
to "not found" but 127.0.0.1, and a proxy on a closed loopback port, because even with
``--disable-background-networking`` it still tries update.googleapis.com, accounts.google.com
and clients2.google.com. Every wait is bounded; processes are killed, the namespace deleted and
temp dirs removed however the test ends. Lives with the kernel tests because it needs root and
root-installed system packages.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
from aiohttp import web

from enforcer.config import parse_config
from required import tool

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "browser"
#: Upper bound for any single wait: server start, one Chromium run, shutdown.
TIMEOUT = 30.0
PHONE = "+420 800 123 456"
PROVIDER = {"name": "Example ISP", "phone": PHONE, "email": "billing@isp.example",
            "website": "https://pay.example.net/", "hours": "Mon-Fri 8:00-18:00"}
LOOKUP_ANSWER = {"address": "127.0.0.1", "restricted": True, "mode": "walled-garden", "reason": "overdue",
                 "subscriber": "C-1", "reference": "WG-ABCD-EFGH", "ack_until": None}
#: A phone: 412x915 CSS pixels (a common Android viewport).
WINDOW = (412, 915)
MIN_PNG_BYTES = 5 * 1024
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--disable-component-update", "--disable-sync",
                  # Belt and braces inside the loopback-only namespace: no DNS at all, and any
                  # request for another host goes to a closed local port and fails at once.
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                  "--proxy-server=127.0.0.1:9", "--disable-extensions",
                  "--disable-features=NetworkTimeServiceQuerying"]
CURL = shutil.which("curl") or "curl"


def _chromium() -> str:
    return tool("chromium", "chromium")


def _catalogue(language: str) -> dict[str, str]:
    """The portal's strings for ``language``, read now from its shipped gettext catalogue."""
    from captive_portal.catalogues import MESSAGES

    if language not in MESSAGES:
        pytest.fail(f"captive_portal/locale has no {language!r} catalogue (docs/reference.md, Portal, requires it); "
                    f"languages there: {sorted(MESSAGES)}")
    return dict(MESSAGES[language])


def _free_port() -> int:
    """A port for the namespace's 127.0.0.1 (fresh namespace: only our own servers use it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackNamespace:
    """A network namespace with only ``lo`` up; ``argv()`` prefixes a command to run inside it."""

    def __init__(self) -> None:
        self.name = f"wgbrowser{secrets.token_hex(3)}"
        self._created = False

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=TIMEOUT)
        self._created = True
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=TIMEOUT)

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def delete(self) -> None:
        if not self._created:
            return
        pids = subprocess.run(["ip", "netns", "pids", self.name], check=False, capture_output=True, text=True,
                              timeout=TIMEOUT).stdout.split()
        for pid in pids:  # only ours can be in there; normally none is left
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "delete", self.name], check=False, timeout=TIMEOUT)
        self._created = False

    def curl(self, url: str, *options: str) -> subprocess.CompletedProcess[str]:
        """``curl`` inside the namespace (the test process itself lives outside it)."""
        return subprocess.run(self.argv(CURL, "-sS", "--noproxy", "*", "--max-time", "5", *options, url),
                              check=False, capture_output=True, text=True, timeout=TIMEOUT)


# --- the fake enforcer ------------------------------------------------------------------------

class FakeEnforcer:
    """``GET /v1/lookup?address=..`` on a Unix socket, served from a thread of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.asked: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-enforcer", daemon=True)
        self._runner: web.AppRunner | None = None

    async def _lookup(self, request: web.Request) -> web.Response:
        self.asked.append(request.query.get("address", ""))
        return web.json_response(LOOKUP_ANSWER)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/lookup", self._lookup)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.path).start()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(TIMEOUT)

    def stop(self) -> None:
        try:
            if self._runner is not None and self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()


# --- the portal -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Portal:
    url: str
    netns: LoopbackNamespace
    process: subprocess.Popen[bytes]
    enforcer: FakeEnforcer
    log: Path


def _wait_for_page(netns: LoopbackNamespace, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"portal exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        answer = netns.curl(url, "-o", "/dev/null", "-w", "%{http_code}")
        if answer.stdout.strip() == "200":
            return
        last = answer.stdout.strip() or answer.stderr.strip()
        time.sleep(0.1)
    pytest.fail(f"portal did not answer {url} within {TIMEOUT:.0f} s ({last}):\n{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL; the whole process group (Chromium leaves helpers behind)."""
    for signum, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
            if signum == signal.SIGTERM:
                # The leader is gone; sweep up any helper still in its group.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def portal() -> Iterator[Portal]:
    _chromium()
    tmp = Path(tempfile.mkdtemp(prefix="wg-browser-"))
    enforcer = FakeEnforcer(str(tmp / "enforcer.sock"))
    netns = LoopbackNamespace()
    process: subprocess.Popen[bytes] | None = None
    try:
        enforcer.start()
        netns.create()
        port, metrics_port = _free_port(), _free_port()
        url = f"http://127.0.0.1:{port}/"
        (tmp / "restricted.yaml").write_text("subscribers: []\n")
        config_text = json.dumps({  # JSON is YAML
            "state_dir": str(tmp / "state"),
            "subscribers": {"source": str(tmp / "restricted.yaml")},
            "gateway": {"subscriber_interfaces": [], "table": "wg_browser"},
            "portal": {"listen": f"127.0.0.1:{port}", "url": url, "provider": PROVIDER},
            "api": {"socket": enforcer.path, "listen": None, "webhook_secret_file": str(tmp / "secret")},
            "metrics": {"listen": None, "portal_listen": f"127.0.0.1:{metrics_port}"},
        }, indent=2)
        parse_config(config_text, str(tmp / "config.yaml"))  # a config error shows here, not as a hang
        (tmp / "config.yaml").write_text(config_text)
        log = tmp / "portal.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                netns.argv(sys.executable, "-m", "enforcer.cli", "portal", "--config", str(tmp / "config.yaml")),
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        _wait_for_page(netns, url, process, log)
        yield Portal(url, netns, process, enforcer, log)
    finally:
        try:
            if process is not None:
                _stop(process)
            netns.delete()
        finally:
            enforcer.stop()
            shutil.rmtree(tmp, ignore_errors=True)


# --- Chromium ---------------------------------------------------------------------------------

def _run_chromium(portal: Portal, url: str, accept_language: str, *extra: str) -> str:
    """One headless Chromium run in the portal's namespace with a fresh profile; its stdout.

    Killed (with its helper processes) after ``TIMEOUT``.
    """
    chromium = _chromium()
    profile = tempfile.mkdtemp(prefix="wg-chromium-")
    lang = accept_language.split(",")[0]
    command = portal.netns.argv(chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--lang={lang}",
                                f"--accept-lang={accept_language}", *extra, url)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"chromium took longer than {TIMEOUT:.0f} s: {' '.join(command)}")
        if process.returncode != 0:
            pytest.fail(f"chromium exited with {process.returncode}: {' '.join(command)}\n"
                        f"{stderr.decode(errors='replace')[-3000:]}")
        return stdout.decode("utf-8", errors="replace")
    finally:
        _stop(process)
        shutil.rmtree(profile, ignore_errors=True)


class _Dom(HTMLParser):
    """What the assertions need from a rendered DOM: ``<html lang>``, the ``<h1>``, all text, links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lang: str | None = None
        self.h1: list[str] = []
        self.text: list[str] = []
        self.links: list[dict[str, str]] = []
        self._in_h1 = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "html" and self.lang is None:
            self.lang = attributes.get("lang")
        elif tag == "h1":
            self._in_h1 += 1
        elif tag == "a":
            self.links.append(attributes)
        elif tag in ("style", "script", "title"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1" and self._in_h1:
            self._in_h1 -= 1
        elif tag in ("style", "script", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._in_h1:
            self.h1.append(data)

    @property
    def heading(self) -> str:
        return " ".join("".join(self.h1).split())

    @property
    def body_text(self) -> str:
        return " ".join("".join(self.text).split())


def _parse(dom: str) -> _Dom:
    parser = _Dom()
    parser.feed(dom)
    parser.close()
    return parser


def _switcher_url(portal: Portal, language: str) -> str:
    """The page's own link to ``language`` if it has one, else ``?lang=<language>`` on portal.url."""
    answer = portal.netns.curl(portal.url, "-H", "Accept-Language: en-US")
    assert answer.returncode == 0, f"cannot fetch {portal.url}: {answer.stderr.strip()}"
    page = _parse(answer.stdout)
    for link in page.links:
        href = link.get("href", "")
        if link.get("hreflang", "").lower() == language or parse_qs(urlsplit(href).query).get("lang") == [language]:
            return urljoin(portal.url, href)
    return f"{portal.url}?lang={language}"


def _check_dom(dom: str, language: str, url: str) -> None:
    page = _parse(dom)
    heading = _catalogue(language)["heading_restricted"]
    where = f"{url} rendered by Chromium"
    assert page.lang is not None and page.lang.lower().split("-")[0] == language, \
        f"{where}: <html lang={page.lang!r}>, expected {language!r}"
    assert page.heading == heading, f"{where}: <h1> is {page.heading!r}, expected {heading!r}"
    assert PHONE in page.body_text, f"{where}: no provider phone {PHONE!r} in {page.body_text[:500]!r}"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("language", ["en", "cs"])
def test_page_renders_in_chromium_with_screenshot(portal: Portal, language: str) -> None:
    """English as the browser asks for it; Czech through the page's switcher, browser still English."""
    url = portal.url if language == "en" else _switcher_url(portal, language)
    dom = _run_chromium(portal, url, "en-US", "--dump-dom")
    # The screenshot first: when the text checks fail it shows what the browser got instead.
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / f"portal-{language}.png"
    shot.unlink(missing_ok=True)
    _run_chromium(portal, url, "en-US", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                  "--hide-scrollbars")
    assert shot.is_file(), f"chromium wrote no screenshot at {shot}"
    size = shot.stat().st_size
    assert size > MIN_PNG_BYTES, f"{shot} is only {size} bytes: a blank page?"
    assert _png_size(shot) == WINDOW, f"{shot} is {_png_size(shot)}, expected {WINDOW}"

    _check_dom(dom, language, url)
    assert portal.enforcer.asked, "the portal never asked the (fake) enforcer about the caller"


def test_browser_asking_for_czech_gets_czech(portal: Portal) -> None:
    """``Accept-Language: cs`` from the browser itself (Chromium's ``--accept-lang``)."""
    dom = _run_chromium(portal, portal.url, "cs", "--dump-dom")
    _check_dom(dom, "cs", portal.url)
