"""Can subscribers reach ``portal.url`` as configured? (``walled-garden check-config``)

How a subscriber gets to the portal (docs/portal.md, "Reachability"): the gateway's table maps
TCP 80 to any of the gateway's own addresses onto ``portal.listen``, and with ``portal.tls`` TCP
443 onto ``portal.tls.listen``, for every subscriber, restricted or not; a restricted subscriber's
port 80 to anywhere else lands there too. ``redirect`` delivers to the primary address of the
interface the packet came in on. So ``portal.url`` works when:

* its scheme has a listener: ``https`` needs ``portal.tls``;
* its port is one the table maps or a listener has: ``http`` on 80 or ``portal.listen``'s port,
  ``https`` on 443 or ``portal.tls.listen``'s port;
* the listeners are not on loopback (a redirected connection arrives at an interface address);
* its host is one of the gateway's own addresses, or a name that resolves to one.

``problems(config)`` returns what is wrong whatever machine it runs on (errors: the portal cannot
work as configured). ``warnings(config)`` returns what looks wrong on *this* machine: an address
literal not assigned here, a name that does not resolve here or resolves elsewhere. Those are
hints, not errors: check-config may run on another machine than the gateway, and the gateway's
resolver may answer differently from the subscribers'. Every line names ``portal.url`` or the
listener it is about.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from enforcer.config import Config, Listen

#: The ports the gateway's table maps onto the portal's listeners, per scheme.
MAPPED_PORTS = {"http": 80, "https": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def problems(config: Config) -> list[str]:
    """What makes ``portal.url`` unreachable on any machine; empty when the config adds up."""
    portal = config.portal
    parts = urlsplit(portal.url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # config validation already refuses this; say it once more rather than crash
        return [f"portal.url: {portal.url!r} has an invalid port"]
    host = (parts.hostname or "").rstrip(".")
    found: list[str] = []
    if scheme not in MAPPED_PORTS or not host:
        return [f"portal.url: {portal.url!r} is not an http(s) URL with a host"]
    tls_port = portal.tls.listen.port if portal.tls is not None else None
    if scheme == "https" and portal.tls is None:
        found.append(f"portal.url: {portal.url} is https but portal.tls is not set: nothing answers TLS "
                     "for the portal; set portal.tls (listen, cert, key) or use an http:// URL")
    port = port or MAPPED_PORTS[scheme]
    if scheme == "http" and port not in (80, portal.listen.port):
        found.append(f"portal.url: port {port} is neither 80 (mapped to portal.listen for every subscriber) "
                     f"nor portal.listen's port {portal.listen.port}: nothing answers there; drop the port "
                     "from the URL")
    if scheme == "https" and portal.tls is not None and port not in (443, tls_port):
        found.append(f"portal.url: port {port} is neither 443 (mapped to portal.tls.listen for every "
                     f"subscriber) nor portal.tls.listen's port {tls_port}: nothing answers there; drop the "
                     "port from the URL")
    literal = _address(host)
    if literal is not None and (literal.is_loopback or literal.is_unspecified or literal.is_multicast):
        found.append(f"portal.url: {host} is a loopback, unspecified or multicast address that subscribers "
                     "cannot reach; use an address of the gateway on the subscriber side, or a name for it")
    elif host.lower() == "localhost" or host.lower().endswith(".localhost"):
        found.append(f"portal.url: {host} names each subscriber's own machine, not the gateway")
    listeners = [("portal.listen", portal.listen)]
    if portal.tls is not None:
        listeners.append(("portal.tls.listen", portal.tls.listen))
    for key, listen in listeners:
        if _is_loopback(listen):
            found.append(f"{key}: {listen} is a loopback address; the gateway redirects subscribers to the "
                         "primary address of the interface they come in on, so portal.url cannot reach it; "
                         "listen on 0.0.0.0 (both families) or that interface's address")
    return found


def warnings(config: Config, *, resolve: Callable[[str], list[Address]] | None = None,
             is_local: Callable[[Address], bool] | None = None) -> list[str]:
    """Hints about ``portal.url``'s host as seen from this machine (run on the gateway).

    ``resolve`` and ``is_local`` default to the system resolver and "can a socket bind this
    address here"; tests pass their own.
    """
    resolve = resolve or resolve_host
    is_local = is_local or is_local_address
    host = (urlsplit(config.portal.url).hostname or "").rstrip(".")
    if not host:
        return []
    literal = _address(host)
    if literal is not None:
        if literal.is_loopback or literal.is_unspecified or literal.is_multicast or is_local(literal):
            return []  # loopback and such are errors (problems); a local address is right
        return [f"portal.url: {host} is not an address of this machine; only the gateway's own addresses "
                "are mapped to the portal for every subscriber (ignore this if check-config is not running "
                "on the gateway)"]
    try:
        addresses = resolve(host)
    except OSError as exc:
        return [f"portal.url: {host} does not resolve on this machine ({_why(exc)}); subscribers must "
                "resolve it to an address of the gateway (the gateway's resolver may differ from theirs)"]
    if not addresses:
        return [f"portal.url: {host} resolves to no address on this machine; subscribers must resolve it "
                "to an address of the gateway"]
    if not any(is_local(address) for address in addresses):
        shown = ", ".join(sorted({str(a) for a in addresses})[:4])
        return [f"portal.url: {host} resolves to {shown} on this machine, none of them an address of this "
                "machine; only the gateway's own addresses are mapped to the portal for every subscriber "
                "(the gateway's resolver may differ from the subscribers')"]
    return []


def resolve_host(host: str) -> list[Address]:
    """The addresses the system resolver gives for ``host`` (OSError when it gives none)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = _address(str(sockaddr[0]).partition("%")[0])
            if address is not None:
                addresses.append(address)
    return addresses


def is_local_address(address: Address) -> bool:
    """Is ``address`` assigned to this machine? Binding a UDP socket to it succeeds only then.

    No privilege and no ``ip`` tool needed. With ``net.ipv4.ip_nonlocal_bind`` (or the IPv6
    equivalent) set, every address binds, so this answers True and the hint stays silent.
    """
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError:  # EADDRNOTAVAIL above all; no family support; a link-local without a scope
        return False
    return True


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_loopback(listen: Listen) -> bool:
    address = _address(listen.host)
    return address is not None and address.is_loopback


def _why(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return str(exc)

