"""Which question names the forwarder watches: the walled garden's allowed names.

Only answers for these names are parsed and their addresses admitted; every other answer passes
through unparsed (cheap, and a name outside the garden can never open it). A wildcard
``*.psp.example`` arrives as the suffix ``psp.example`` and allows names strictly below it:
``a.psp.example`` and ``x.y.psp.example``, not ``psp.example`` itself (the operator did not list
it) nor ``xpsp.example`` (a label boundary is required). Names compare case-insensitively (DNS
does, RFC 4343) and a trailing dot (the root label) is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.exception
import dns.name

__all__ = ["AllowedNames", "normalize", "wire_name"]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def normalize(name: str) -> str:
    """``name`` as the forwarder compares it: ASCII lower case, no trailing dot.

    DNS folds ASCII letters only (RFC 4343); ``str.lower`` would also fold other letters, so a
    name that DNS tells apart from an allowed one could match it.
    """
    if name.endswith("."):
        name = name[:-1]
    return name.lower() if name.isascii() else name.translate(_ASCII_LOWER)


def wire_name(name: str) -> bytes:
    """``name`` in DNS wire form, lower case (``b"\\x03pay\\x07example\\x00"``); ValueError names it."""
    try:
        wire = dns.name.from_text(normalize(name) or ".").canonicalize().to_wire()
    except dns.exception.DNSException as exc:
        raise ValueError(f"allowed name {name!r} is not a valid DNS name: {exc}") from exc
    assert wire is not None   # to_wire() without a file returns the bytes
    return wire


class AllowedNames:
    """Exact names and wildcard suffixes; ``allows`` answers one question name in O(labels)."""

    __slots__ = ("_names", "_suffixes", "_wire_names", "_wire_suffixes")

    def __init__(self, names: Iterable[str] = (), suffixes: Iterable[str] = ()) -> None:
        self._names = frozenset(normalize(name) for name in names if normalize(name))
        self._suffixes = frozenset(normalize(suffix) for suffix in suffixes if normalize(suffix))
        # The forwarder's hot path compares wire forms: no text decoding per query, and a label
        # holding a "." (possible on the wire) can never pass for two labels.
        self._wire_names = frozenset(wire_name(name) for name in self._names)
        self._wire_suffixes = frozenset(wire_name(suffix) for suffix in self._suffixes)

    def __bool__(self) -> bool:
        return bool(self._names or self._suffixes)

    def allows(self, qname: str) -> bool:
        """True when ``qname`` is an allowed name or lies strictly below an allowed suffix."""
        name = normalize(qname)
        if not name:
            return False
        if name in self._names:
            return True
        if not self._suffixes:
            return False
        # Each proper parent of the name: "x.y.psp.example" -> "y.psp.example", "psp.example", "example".
        dot = name.find(".")
        while dot != -1:
            parent = name[dot + 1:]
            if parent in self._suffixes:
                return True
            dot = name.find(".", dot + 1)
        return False

    def allows_wire(self, name: bytes) -> bool:
        """``allows`` for an uncompressed wire-form name (as in a query's question), any case."""
        name = name.lower()   # bytes.lower folds ASCII only, as DNS does
        if name in self._wire_names:
            return True
        if not self._wire_suffixes:
            return False
        # Each proper parent: skip the first label, then the next... ; the root alone is no suffix.
        pos, end = 0, len(name) - 1
        while pos < end:
            pos += name[pos] + 1
            if pos < end and name[pos:] in self._wire_suffixes:
                return True
        return False
