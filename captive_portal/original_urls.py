"""Where a redirected subscriber was going, so "Continue to the internet" can take them back.

When the gateway sends a subscriber's plain HTTP request here and we answer ``302`` to the
portal, we first note the URL they asked for (``http://`` + Host + path and query, exactly
as sent), keyed by their address: one per address, the latest wins, forgotten after 15
minutes, at most 65536 addresses (oldest dropped). No enforcer lookup is involved, so this
costs a dict operation on the redirect path.

Only plausible page loads are noted: GET requests for a well-formed host, not the operating
systems' captive-portal probes (returning someone to ``/generate_204`` would show a blank
page), not requests that ask for something other than HTML (``Accept`` without ``text/html``
or ``*/*``: app APIs, images), not static assets by file extension. An over-long URL is
replaced by the site's front page. The URL is only ever handed back to the address that
asked for it, in a ``Location`` header, so it must be printable ASCII without spaces.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

TTL = 15 * 60.0
MAX_ENTRIES = 65536
MAX_URL = 1024

#: Hosts that exist only to detect captive portals (Android, Apple, Windows, Firefox, Linux).
PROBE_HOSTS = frozenset({
    "connectivitycheck.gstatic.com", "connectivitycheck.android.com", "clients3.google.com",
    "captive.apple.com", "www.msftconnecttest.com", "www.msftncsi.com", "ipv6.msftconnecttest.com",
    "detectportal.firefox.com", "nmcheck.gnome.org", "network-test.debian.org",
    "connectivity-check.ubuntu.com",
})
#: Probe paths on hosts that are also ordinary sites.
PROBE_PATHS = frozenset({"/generate_204", "/gen_204", "/hotspot-detect.html", "/library/test/success.html",
                         "/connecttest.txt", "/ncsi.txt", "/success.txt", "/canonical.html"})
_ASSETS = (".ico", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".css", ".js", ".woff", ".woff2",
           ".json", ".xml", ".map")
_HOST = re.compile(r"(?:(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.?"
                   r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
_PATH = re.compile(r"/[\x21-\x7e]*")


class OriginalUrls:
    def __init__(self, *, ttl: float = TTL, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._urls: OrderedDict[str, tuple[float, str]] = OrderedDict()  # address → (noted at, url)

    def remember(self, address: str, url: str) -> None:
        now = self.clock()
        self._urls.pop(address, None)
        self._urls[address] = (now, url)
        # Insertion order is time order: expired entries, if any, are at the front.
        while self._urls:
            oldest, _ = next(iter(self._urls.values()))
            if len(self._urls) <= self.max_entries and now - oldest < self.ttl:
                break
            self._urls.popitem(last=False)

    def pop(self, address: str) -> str | None:
        """The URL noted for ``address`` within the TTL, forgotten as it is handed out."""
        entry = self._urls.pop(address, None)
        if entry is None or self.clock() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._urls)


def page_url(method: str, headers: Mapping[str, str], raw_path: str) -> str | None:
    """The URL a redirected request was for, if it looks like a page someone wanted to see."""
    if method != "GET":
        return None
    host = headers.get("Host", "").strip().lower()
    if not _HOST.fullmatch(host):
        return None
    path, _, _ = raw_path.partition("?")
    if (host.rstrip(".") in PROBE_HOSTS or path in PROBE_PATHS or path.lower().endswith(_ASSETS)):
        return None
    accept = headers.get("Accept")
    if accept is not None and not any(t in accept for t in ("text/html", "*/*", "application/xhtml")):
        return None
    url = f"http://{host}{raw_path}"
    if len(url) > MAX_URL or raw_path.startswith("//") or not _PATH.fullmatch(raw_path):
        return f"http://{host}/"
    return url
