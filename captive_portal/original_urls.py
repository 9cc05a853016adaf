"""Where a redirected subscriber was going, so "Continue to the internet" can take them back.

When the gateway sends a subscriber's plain HTTP request here and we answer ``302`` to the
portal, we first note the URL they asked for (``http://`` + Host + path and query, exactly
as sent), keyed by the device: its address and a hash of its ``User-Agent``. One per device,
the latest wins, forgotten after 15 minutes, at most 65536 in all (oldest dropped) and at
most 16 devices per IPv4 address or IPv6 /64, so one subscriber cannot push out everyone
else's. No enforcer lookup is involved, so this costs a few dict operations and a short hash
on the redirect path.

Why the ``User-Agent``: behind one NAT'd IPv4 address a whole household (a clinic's waiting
room, a block of flats) is one address. Keyed by address alone, the phone that pressed
"Continue" after the laptop was redirected went to the laptop's page, query string and all
(``/results?patient=...``). Devices differ in their ``User-Agent`` and one browser keeps
its own between the redirect, the page and the button, so the URL goes back only to the
device that asked; any other device finds nothing and goes to the portal page. Two devices
with the very same ``User-Agent`` behind one address remain indistinguishable to us.

Only plausible page loads are noted: GET requests for a well-formed host, not the operating
systems' captive-portal probes (returning someone to ``/generate_204`` would show a blank
page), not requests that ask for something other than HTML (``Accept`` without ``text/html``
or ``*/*``: app APIs, images), not static assets by file extension. An over-long URL is
replaced by the site's front page. The URL is only ever handed back to the device that
asked for it, in a ``Location`` header or a link's target (never as text on the page), so it
must be printable ASCII without spaces.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import quote

from .ratelimit import bucket_key

TTL = 15 * 60.0
MAX_ENTRIES = 65536
#: Devices remembered per subscriber key (an IPv4 address, an IPv6 /64).
PER_KEY = 16
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
#: What a path keeps as it is: RFC 3986's unreserved and reserved characters and "%".
_URL_SAFE = "/:@!$&'()*+,;=?%~-._[]#"


def device_key(address: str, user_agent: str | None) -> str:
    """The device a request came from, as far as we can tell: its address and a hash of its
    ``User-Agent`` (none sent hashes like an empty one). The hash only keeps memory small and
    the header out of memory; it is no secret."""
    agent = (user_agent or "").encode("utf-8", "surrogatepass")
    return f"{address} {hashlib.blake2b(agent, digest_size=8).hexdigest()}"


class OriginalUrls:
    """Remembered URLs, at most ``per_key`` devices per subscriber key and ``max_entries`` in all.

    The key is ``ratelimit.bucket_key``: the address for IPv4, its /64 for IPv6. One subscriber's
    devices pick IPv6 addresses from a whole /64 at will, so keyed by full address one /64 could
    write thousands of entries and push everyone else's out. Within a key each device (address
    and ``User-Agent``, ``device_key``) keeps its own URL (two devices of one household go back
    to their own pages, and never to each other's), but a key holds at most ``per_key`` of them,
    its own oldest dropped first; the global bound then only ever drops the least recently
    written keys' entries, and one key can never hold more than ``per_key`` of the ``max_entries``.
    """

    def __init__(self, *, ttl: float = TTL, max_entries: int = MAX_ENTRIES, per_key: int = PER_KEY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or per_key < 1:
            raise ValueError("max_entries and per_key must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self.per_key = per_key
        self.clock = clock
        # key → (device → (noted at, url)); both levels in write order, oldest first.
        self._keys: OrderedDict[str, OrderedDict[str, tuple[float, str]]] = OrderedDict()
        self._count = 0

    def remember(self, address: str, url: str, *, user_agent: str | None) -> None:
        """Note ``url`` for the device at ``address`` with this ``User-Agent`` (None: none sent)."""
        now = self.clock()
        key = bucket_key(address)
        device = device_key(address, user_agent)
        entries = self._keys.pop(key, None)
        if entries is None:
            entries = OrderedDict()
        elif entries.pop(device, None) is not None:
            self._count -= 1
        entries[device] = (now, url)
        self._count += 1
        while len(entries) > self.per_key:  # this subscriber's own oldest
            entries.popitem(last=False)
            self._count -= 1
        self._keys[key] = entries  # the most recently written key goes last
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Drop expired entries and, over the bound, the oldest keys' oldest entries."""
        # Keys are in order of their latest write and entries within a key in time order, so the
        # front is the oldest key's oldest entry. Expired entries behind a fresh one wait for a
        # later sweep: peek and pop never hand them out, and they count against the bound.
        while self._keys:
            key, entries = next(iter(self._keys.items()))
            noted, _ = next(iter(entries.values()))
            if self._count <= self.max_entries and now - noted < self.ttl:
                break
            entries.popitem(last=False)
            self._count -= 1
            if not entries:
                del self._keys[key]

    def peek(self, address: str, *, user_agent: str | None) -> str | None:
        """The URL noted for this device within the TTL, kept (the page links to it)."""
        entries = self._keys.get(bucket_key(address))
        entry = entries.get(device_key(address, user_agent)) if entries is not None else None
        if entry is None or self.clock() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def pop(self, address: str, *, user_agent: str | None) -> str | None:
        """The URL noted for this device within the TTL, forgotten as it is handed out."""
        key = bucket_key(address)
        entries = self._keys.get(key)
        entry = entries.pop(device_key(address, user_agent), None) if entries is not None else None
        if entry is None:
            return None
        self._count -= 1
        if not entries:
            del self._keys[key]
        if self.clock() - entry[0] >= self.ttl:
            return None
        return entry[1]

    def __len__(self) -> int:
        return self._count


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
    if _PATH.fullmatch(raw_path):
        # Characters RFC 3986 does not allow in a URL (", <, >, `, {, }, |, \, ^) percent-encoded:
        # the URL goes back out in a Location header and a link.
        raw_path = quote(raw_path, safe=_URL_SAFE)
    url = f"http://{host}{raw_path}"
    if len(url) > MAX_URL or raw_path.startswith("//") or not _PATH.fullmatch(raw_path):
        return f"http://{host}/"
    return url
