"""Is a request addressed to the portal, or to some other site the gateway redirected here?

The gateway's nftables rule redirects a restricted subscriber's TCP port 80 (and every
subscriber's port 80 to the gateway itself) to us but leaves the request untouched, so the Host
header still names the site they wanted. Only requests
whose Host is the host[:port] of ``portal.url`` are the portal's own; every other one gets
the redirect. The comparison is pure string work (no name resolution) because it runs on
every redirected request.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


_ADDRESSED: dict[tuple[PortalUrl, str], bool] = {}
_ADDRESSED_MAX = 4096


@dataclass(frozen=True)
class PortalUrl:
    """``portal.url`` taken apart once, at start-up."""

    url: str
    scheme: str
    host: str   # lower case, no brackets, no trailing dot
    port: int   # explicit, or the scheme's default
    path: str   # where the page lives, at least "/"

    @classmethod
    def parse(cls, url: str) -> PortalUrl:
        """Config validation already checked this is an http(s) URL with a host."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return cls(url=url, scheme=scheme, host=_normal_host(parts.hostname),
                   port=parts.port or DEFAULT_PORTS[scheme], path=parts.path or "/")

    def is_addressed_by(self, host_header: str | None) -> bool:
        """True when a Host header names the portal itself (host and port, case-insensitive)."""
        if not host_header:
            return False
        known = _ADDRESSED.get((self, host_header))
        if known is None:  # redirected traffic repeats a few hosts: remember recent answers
            # A Host without a port means the scheme's default, not necessarily the portal's port.
            known = parse_host_header(host_header, DEFAULT_PORTS[self.scheme]) == (self.host, self.port)
            if len(_ADDRESSED) >= _ADDRESSED_MAX:
                _ADDRESSED.clear()
            _ADDRESSED[(self, host_header)] = known
        return known

    def names_host(self, host_header: str | None) -> bool:
        """True when a Host header names the portal's host, on whatever port.

        Enough for requests on the portal's HTTPS listener: the gateway redirects only the
        gateway's own port 443 there, and only the portal holds its certificate, so a TLS
        connection naming our host came to us on purpose.
        """
        parsed = parse_host_header(host_header, 0) if host_header else None
        return parsed is not None and parsed[0] == self.host

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port): what an ``Origin`` header of the portal's own page parses to."""
        return self.scheme, self.host, self.port


def parse_host_header(value: str, default_port: int) -> tuple[str, int] | None:
    """``"Example.COM:8080"`` → ``("example.com", 8080)``; ``"[2001:db8::1]"`` → (addr, default).

    Returns None for anything malformed, which callers treat as "not the portal".
    """
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = value.partition(":")
        if sep and not port_text:
            return None
    if not host:
        return None
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        return _normal_host(host), int(port_text)
    return _normal_host(host), default_port


def _normal_host(host: str) -> str:
    return host.lower().rstrip(".")


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """``Origin: https://Portal.example`` → ``("https", "portal.example", 443)``; "null", junk → None."""
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS or "/" in rest:
        return None
    parsed = parse_host_header(rest, DEFAULT_PORTS[scheme])
    return None if parsed is None else (scheme, *parsed)
