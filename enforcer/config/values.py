"""Checks for single config values that are not quantities: strings, URLs, names, colours,
files, flags, counts, shares, modes.

Each takes the raw YAML value and returns it typed, or raises ``ValueError`` whose text becomes
the issue at the key (``KeyReader.get``); the section readers combine them.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..model import Mode, Network
from .schema import MAX_LOGO_BYTES

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
#: What Linux accepts as an interface name.
IFNAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.@+-]{1,15}$")
#: An interface name prefix and ``*`` (``ppp*``, ``vlan1*``): nftables matches every interface
#: whose name starts so, as a PPPoE BNG needs with one interface per session.
IFNAME_WILDCARD = re.compile(r"^[A-Za-z0-9_.@+-]{1,14}\*$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}\.?$")
_COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_EMAIL = re.compile(r"^[^@\s<>\"']+@[^@\s<>\"']+\.[^@\s<>\"']+$")


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def string_list(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i for i in items):
        raise ValueError("expected a string or a non-empty list of strings")
    return items


def http_url(value: Any) -> str:
    text = string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


def email(value: Any) -> str:
    text = string(value)
    if not _EMAIL.match(text):
        raise ValueError(f"{text!r} is not an e-mail address")
    return text


def group(value: Any) -> str:
    """A group that exists on this machine (``groupadd --system walled-garden`` creates ours)."""
    text = string(value)
    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError(f"no group {text!r} on this machine (the Debian package makes walled-garden; "
                         f"else create it: groupadd --system {text})") from None
    return text


def table_name(value: Any) -> str:
    text = string(value)
    if not _TABLE.match(text):
        raise ValueError(f"{text!r} is not a valid nftables table name (letters, digits, _; max 32)")
    return text


def color(value: Any) -> str:
    text = string(value)
    if not _COLOR.match(text):
        raise ValueError(f"{text!r} is not a colour like '#0b5394'")
    return text


def readable_file(value: Any) -> str:
    text = string(value)
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text}: not a readable file")
    return text


def relative_to(config_path: str, text: str) -> str:
    """``text`` as a path: absolute as given, relative against the config file's directory.

    Every path key is read so (docs/reference.md, Configuration): the daemon runs from ``/``
    under systemd and ``check-config`` from wherever the operator stands, so a path taken
    relative to the current directory would name another file in each."""
    if text.startswith("/"):
        return text
    return str((Path(config_path).parent / text).resolve())


def at_config(config_path: str, convert: Callable[[str], str] = string) -> Callable[[Any], str]:
    """A path key's converter: a non-empty string, made absolute (``relative_to``), then ``convert``."""
    def converted(value: Any) -> str:
        return convert(relative_to(config_path, string(value)))
    return converted


def directory_to_be(text: str) -> str:
    """A directory that exists, or that ``mkdir -p`` can make: neither the path nor any
    directory above it is a file. Write permission is the start's to find out (it creates
    the directory at once and names ``state_dir`` when it cannot); a check run by a user who
    may not look does not guess."""
    probe = text
    while True:
        try:
            info = os.stat(probe)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return text        # cannot look (permissions): not known to be wrong
            parent = os.path.dirname(probe)
            if parent == probe:
                return text
            probe = parent
            continue
        if stat.S_ISDIR(info.st_mode):
            return text
        if probe == text:
            raise ValueError(f"{text}: exists and is not a directory")
        raise ValueError(f"{text}: cannot be created: {probe} is not a directory")


def logo(value: Any) -> str:
    text = readable_file(value)
    size = os.path.getsize(text)
    if size > MAX_LOGO_BYTES:
        raise ValueError(f"{text}: {size} bytes; the logo is inlined into the page and may be at most "
                         f"{MAX_LOGO_BYTES} bytes")
    if not text.lower().endswith((".png", ".svg", ".jpg", ".jpeg", ".webp", ".gif")):
        raise ValueError(f"{text}: use a .png, .svg, .jpg, .webp or .gif logo")
    return text


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a whole number greater than zero")
    return value


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError("expected a number greater than zero")
    return float(value)


def port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError("expected a port number between 1 and 65535")
    return value


def share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError("expected a share between 0 and 1, e.g. 0.25")
    return float(value)


def restricting_mode(value: Any) -> Mode:
    try:
        mode = Mode(str(value))
    except ValueError:
        mode = Mode.FREE
    if mode is Mode.FREE:
        raise ValueError(f"{value!r} is not one of {', '.join(m.value for m in Mode.restricting())}")
    return mode


_SOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def session_source_name(value: Any) -> str:
    """A session source's label in status and metrics (not ``event`` or ``cli``: those are the
    daemon's own doors)."""
    text = string(value)
    if not _SOURCE_NAME.fullmatch(text) or text in ("event", "cli"):
        raise ValueError(f"{text!r} is not a source name (lowercase letters, digits, - and _; not event or cli)")
    return text


_NATS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def nats_name(value: Any) -> str:
    """A gateway or stream name: it becomes a JetStream consumer or stream name, where dots,
    wildcards and spaces are not allowed."""
    text = string(value)
    if not _NATS_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a name NATS takes (letters, digits, - and _, at most 64)")
    return text


def nats_urls(value: Any) -> list[str]:
    """``nats://host:port`` or ``tls://host:port``, one or a list (the nodes of a cluster)."""
    urls = string_list(value)
    for url in urls:
        parsed = urlsplit(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in ("nats", "tls") or not parsed.hostname or port is None or parsed.path not in ("", "/"):
            raise ValueError(f"{url!r} is not nats://host:port or tls://host:port")
    return urls


def secret_file(value: Any) -> str:
    """A readable file whose first line is a non-empty secret."""
    text = readable_file(value)
    with open(text, encoding="utf-8", errors="replace") as handle:
        if not handle.readline().strip():
            raise ValueError(f"{text}: the first line is empty (it holds the shared secret)")
    return text


def networks(value: Any) -> list[Network]:
    """A list of addresses or prefixes (``[192.0.2.1, 198.51.100.0/24]``)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError("expected a list of addresses or prefixes")
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item), strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return out
