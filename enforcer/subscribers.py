"""The restricted-subscriber list from billing (docs/reference.md, Restricted list): data model and parsing.

A list is all-or-nothing: one bad line rejects the whole list, so a truncated or corrupted
export can never lift or restrict anybody by accident. Every problem is reported with
``file:line`` so the billing team can fix the export without guessing.
"""

from __future__ import annotations

import csv
import functools
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import FrozenInstanceError, dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from . import yamlsource
from .address_space import AddressSpace, Span, find_span_overlaps, span, special_use_problem
from .gc_pause import gc_paused
from .issues import Issue, IssuesError
from .match import MATCH_KEYS, NO_MATCH, Match, parse_match
from .model import Mode, Network

log = logging.getLogger(__name__)

#: Broadest prefix one subscriber may hold; anything wider is almost surely an export bug (or
#: one event walling a whole network). IPv6: /48 is the largest end-site assignment (RFC 6177).
MIN_PREFIX = {4: 16, 6: 48}
_MIN_PREFIX_WHY = {4: "", 6: " (/48 is the largest end-site assignment, RFC 6177)"}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")      # used with fullmatch: "$" would take "C-1\n"
#: A reason once normalised (``_normal_reason``): a slug of at most 32 characters; one written
#: as words (with spaces) also of at most ``_REASON_WORDS`` words and no digit (free text with
#: an amount, a date or an account number in it).
_REASON = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_REASON_WORDS = 3
#: Nodes a YAML/JSON list may have (about 7 per entry): far above any real export, and with
#: anchors and aliases refused it bounds nothing but absurd documents.
LIST_MAX_NODES = 20_000_000
#: Fields of an entry; also the CSV column order when there is no header (``match`` came last,
#: so exports written before it still read the same).
_FIELDS = ("id", "addresses", "mode", "reason", "exempt_until", "exempt_category", "match")
#: The columns a CSV row without a line ending may end in: a cut ``mode`` is no mode (refused),
#: a cut ``reason`` is harmless; any other cut cell could name another address or subscriber.
_SAFE_LAST = ("mode", "reason")
#: A CSV first row that starts with ``id`` and holds only bare words is a header (a data row's
#: addresses or match hold digits, dots or ``=``): an unknown word in it is an error, not an id.
_HEADER_WORD = re.compile(r"[a-z_]*")
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


Key = tuple[int, int, str]   # (IP version, prefix length, address text as nft prints it)


def network_key(network: Network) -> Key:
    """One address or prefix as the kernel's sets key it: (version, prefix length, text)."""
    version = network.version
    return version, network.prefixlen, socket.inet_ntop(_FAMILIES[version], network.network_address.packed)


def key_network(key: Key) -> Network:
    """``network_key``'s inverse (the text is ``inet_ntop``'s own, so ``inet_pton`` takes it)."""
    version, plen, text = key
    value = int.from_bytes(socket.inet_pton(_FAMILIES[version], text), "big")
    return ipaddress.IPv4Network((value, plen)) if version == 4 else ipaddress.IPv6Network((value, plen))


def saved_key(text: str) -> Key:
    """The key of an address as ``key_text`` wrote it into the state (``a/len``), read back
    without an ``ipaddress`` network (a restart reads 125k; a third of its load was networks).
    Only a text that is exactly what ``inet_ntop`` writes, with no host bits, takes the short
    way; anything else (an older spelling, an embedded IPv4) goes through ``network_key`` of
    the parsed network, which refuses what is wrong (ValueError), as before."""
    address, slash, length = text.partition("/")
    if slash and length.isascii() and length.isdigit() and len(length) <= 3:
        version = 6 if ":" in address else 4
        family, width, plen = _FAMILIES[version], 32 if version == 4 else 128, int(length)
        try:
            packed = socket.inet_pton(family, address)
        except OSError:
            packed = b""
        if (packed and plen <= width and socket.inet_ntop(family, packed) == address
                and not int.from_bytes(packed, "big") & ((1 << (width - plen)) - 1)):
            return version, plen, address
    return network_key(_network(text))


def key_text(key: Key) -> str:
    """``str(key_network(key))`` without building the network: ``inet_ntop`` writes an address
    as ``ipaddress`` does (RFC 5952), except IPv6 with an embedded IPv4 (``::ffff:1.2.3.4``)."""
    version, plen, text = key
    if version == 6 and "." in text:
        return str(key_network(key))
    return f"{text}/{plen}"


@dataclass(init=False, eq=False, repr=False)   # a dataclass for ``dataclasses.replace`` and ``fields``
class Subscriber:
    """One restricted subscriber as billing names it.

    There is one per list entry, 100k and more, alive as long as the list: so slots, and the
    addresses kept only as the kernel's keys (``keys``: version, prefix length, text). An
    ``ipaddress`` network costs ~430 bytes (a /32 carries a closure of its own), ten times
    its key; ``addresses`` builds them when asked (``key_network``, ~1 us each), which the
    bulk paths avoid (``keys``, ``key_text``).
    """

    __slots__ = ("exempt_category", "exempt_until", "id", "keys", "match", "mode", "reason")

    id: str
    addresses: tuple[Network, ...]   # not stored: the property below
    mode: Mode
    reason: str
    exempt_until: float | None       # billing's own exemption (e.g. an agreed arrangement)
    exempt_category: str
    match: Match                     # identifiers a session may carry (sessions); empty: none
    if TYPE_CHECKING:   # stored, but not a field: the constructor takes ``addresses``
        keys: tuple[Key, ...]

    def __init__(self, id: str, addresses: Iterable[Network] = (), mode: Mode = Mode.WALLED_GARDEN,
                 reason: str = "", exempt_until: float | None = None, exempt_category: str = "",
                 match: Match = NO_MATCH) -> None:
        assign = object.__setattr__
        assign(self, "id", id)
        assign(self, "keys", tuple(network_key(n) for n in addresses))
        assign(self, "mode", mode)
        assign(self, "reason", sys.intern(reason))     # a few categories shared by 100k entries
        assign(self, "exempt_until", exempt_until)
        assign(self, "exempt_category", sys.intern(exempt_category))
        assign(self, "match", match or NO_MATCH)

    @classmethod
    def from_keys(cls, id: str, keys: tuple[Key, ...], mode: Mode, reason: str, exempt_until: float | None = None,
                  exempt_category: str = "", match: Match = NO_MATCH) -> Subscriber:
        """An entry with addresses given as kernel keys: what the bulk parser (``_fast_entry``)
        and a restart's load of the saved list (``saved_key``) build without an ``ipaddress``
        network per address."""
        self = cls.__new__(cls)
        assign = object.__setattr__
        assign(self, "id", id)
        assign(self, "keys", keys)
        assign(self, "mode", mode)
        assign(self, "reason", sys.intern(reason))
        assign(self, "exempt_until", exempt_until)
        assign(self, "exempt_category", sys.intern(exempt_category))
        assign(self, "match", match or NO_MATCH)
        return self

    @property   # type: ignore[no-redef]
    def addresses(self) -> tuple[Network, ...]:
        """The addresses and prefixes as networks, built anew on each call (see the class)."""
        return tuple(key_network(key) for key in self.keys)

    def address_texts(self) -> list[str]:
        """``[str(a) for a in self.addresses]``, without building the networks."""
        return [key_text(key) for key in self.keys]

    def _fields(self) -> tuple[Any, ...]:
        return (self.id, self.keys, self.mode, self.reason, self.exempt_until, self.exempt_category, self.match)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Subscriber)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:   # copy and pickle, as of a frozen dataclass
        return (Subscriber, (self.id, self.addresses, self.mode, self.reason, self.exempt_until,
                             self.exempt_category, self.match))

    def __repr__(self) -> str:
        return (f"Subscriber(id={self.id!r}, addresses={self.addresses!r}, mode={self.mode!r}, "
                f"reason={self.reason!r}, exempt_until={self.exempt_until!r}, "
                f"exempt_category={self.exempt_category!r}, match={self.match!r})")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "addresses": self.address_texts(),
               "mode": self.mode.value, "reason": self.reason}
        if self.exempt_until:
            out.update(exempt_until=self.exempt_until, exempt_category=self.exempt_category)
        if self.match:
            out["match"] = self.match.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Subscriber:
        """The inverse of ``to_json``; rows written before ``match`` existed have none."""
        return cls(data["id"], tuple(_network(a) for a in data.get("addresses") or ()),
                   Mode(data["mode"]), data.get("reason", ""), data.get("exempt_until"),
                   data.get("exempt_category", ""), Match.from_json(data.get("match") or {}))


ListIssue = Issue  # location is "file:line"


class ListError(IssuesError):
    """The list was rejected; nothing from it may be applied."""


def _network(text: str) -> Network:
    """``ip_network(text, strict=True)``, 3x faster for well-formed text: the C parser
    (100k-line lists, restores and every webhook spend most of their parsing time here)."""
    address, slash, length = text.partition("/")
    try:
        if slash and not (length.isascii() and length.isdigit()):   # int() would take " 24", "+24"
            raise ValueError(length)
        if ":" in address:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
            return ipaddress.IPv6Network((value, int(length)) if slash else value)
        value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        return ipaddress.IPv4Network((value, int(length)) if slash else value)
    except (OSError, ValueError):
        return ipaddress.ip_network(text, strict=True)  # let ipaddress word the error


#: The public name of ``_network`` for the other modules that turn text into networks in bulk
#: (restored sessions, changed kernel keys).
parse_network = _network


def id_problem(ident: Any) -> str | None:
    """Why ``ident`` is not a subscriber id, or None."""
    if not isinstance(ident, (str, int)) or isinstance(ident, bool) or not _ID.fullmatch(str(ident)):
        return (f"id {ident!r} is missing or not a subscriber id "
                "(letters, digits and . _ : / -, at most 64)")
    return None


def breadth_problem(network: Network, text: str = "") -> str | None:
    """Why ``network`` is too broad to be one subscriber's (wider than /16 or /48), or None.
    Every door checks it: lists, events, the CLI, and the sessions leases and RADIUS report."""
    if network.prefixlen >= MIN_PREFIX[network.version]:
        return None
    return (f"{text or network} is broader than /{MIN_PREFIX[network.version]}; refusing a prefix that wide "
            f"for one subscriber{_MIN_PREFIX_WHY[network.version]}")


def parse_address(text: str, space: AddressSpace | None = None) -> Network:
    """An address or prefix as billing writes it; host bits in a prefix are an error, and so
    are addresses never a subscriber's (loopback, multicast, ...: ``special_use_problem``) and,
    given ``space``, addresses outside ``gateway.subscriber_prefixes`` or covering one of its
    entries whole (``AddressSpace.problem``)."""
    text = text.strip()
    if "%" in text:    # ``ipaddress`` takes fe80::1%eth0 and the kernel's sets would drop the zone
        raise ValueError(f"{text} carries a zone (%...); a subscriber's address is written without one")
    network = _network(text)
    problem = breadth_problem(network, text) or (space.problem(network) if space is not None
                                                 else special_use_problem(network))
    if problem:
        raise ValueError(problem)
    return network


def validate_entry(raw: Any, where: str, issues: list[ListIssue],
                   space: AddressSpace | None = None) -> Subscriber | None:
    """Check one list/event entry (a mapping); append issues, return the subscriber if clean.

    An entry needs ``addresses``, ``match`` keys, or both: with match keys only, the addresses
    come from the subscriber's sessions. ``space`` (``AddressSpace.from_config``) also refuses
    addresses outside ``gateway.subscriber_prefixes``; without it only special-use addresses
    are refused.
    """
    checked = _validated(raw, where, issues, space)
    return checked[0] if checked is not None else None


def _validated(raw: Any, where: str, issues: list[ListIssue],
               space: AddressSpace | None) -> tuple[Subscriber, list[Network]] | None:
    """``validate_entry``, with the networks it parsed (a list's overlap check needs them; the
    entry keeps only their keys)."""
    if not isinstance(raw, dict):
        issues.append(ListIssue(where, f"expected a mapping with id and addresses or match, "
                                       f"got {type(raw).__name__}"))
        return None
    before = len(issues)
    raw, nulls = _without_nulls(raw)
    for key in raw:
        if key not in _FIELDS:
            shown = "null" if key is None else repr(key)
            issues.append(ListIssue(where, f"unknown field {shown}; expected {', '.join(_FIELDS)}"))
    ident = raw.get("id")
    problem = "id is empty (null); every entry needs its subscriber id" if "id" in nulls else id_problem(ident)
    if problem:
        issues.append(ListIssue(where, problem))
    match = _entry_match(raw, where, issues)
    addresses_raw = raw.get("addresses")
    if isinstance(addresses_raw, str):
        addresses_raw = addresses_raw.split()
    networks: list[Network] = []
    if addresses_raw is None or addresses_raw == []:
        if "match" not in raw:   # a given but bad match has its own issue
            empty = "".join(f"{key} is empty (null); " for key in ("addresses", "match") if key in nulls)
            issues.append(ListIssue(where, f"{empty}addresses (an IPv4/IPv6 address or prefix) or match "
                                           f"({', '.join(MATCH_KEYS)}): at least one is required"))
    elif not isinstance(addresses_raw, list):
        issues.append(ListIssue(where, "addresses must be a list of IPv4/IPv6 addresses or prefixes, "
                                       f"got {type(addresses_raw).__name__}"))
    else:
        for item in addresses_raw:
            if item is None:   # an unquoted null in the list (YAML ~, JSON null): say it as written
                issues.append(ListIssue(where, "address null: an empty item in addresses"))
                continue
            try:
                network = parse_address(str(item), space)
            except ValueError as exc:
                issues.append(ListIssue(where, f"address {item!r}: {exc}"))
                continue
            if network in networks:
                issues.append(ListIssue(where, f"address {network} is listed twice"))
            networks.append(network)
    mode = Mode.WALLED_GARDEN
    mode_raw = raw.get("mode")
    if mode_raw not in (None, ""):
        try:
            mode = Mode(str(mode_raw))
            if mode is Mode.FREE:
                raise ValueError
        except ValueError:
            issues.append(ListIssue(where, f"mode {mode_raw!r} is not one of "
                                           f"{', '.join(m.value for m in Mode.restricting())}"))
    reason_raw = raw.get("reason") or ""
    reason = _normal_reason(reason_raw) if isinstance(reason_raw, str) else None
    if reason is None:
        reason = ""
        issues.append(ListIssue(where, f"reason {reason_raw!r} must be a short category such as 'overdue' "
                                       "(letters, digits, - and _, at most 32; written as words: at most "
                                       f"{_REASON_WORDS} and no digits; no names, amounts or dates)"))
    exempt_until, exempt_category = _entry_exemption(raw, where, issues)
    if len(issues) > before:
        return None
    # The kernel keys are rendered here, in the parsing thread, not later under the daemon's lock.
    return Subscriber(str(ident), networks, mode, reason, exempt_until, exempt_category, match), networks


def _without_nulls(raw: dict[Any, Any]) -> tuple[dict[Any, Any], set[Any]]:
    """The entry without its null fields, and their names: a JSON ``null`` (``json.dumps`` of
    None) or YAML's ``~``/``null``/empty value says "not given", so an optional field that is
    null is one left out. ``id`` and ``addresses`` are kept out too, but named, so their
    refusal can say they were null. Null match keys are left out likewise; a match of nothing
    but nulls is a null match."""
    nulls = {key for key, value in raw.items() if value is None}
    match = raw.get("match")
    if isinstance(match, dict) and any(value is None for value in match.values()):
        kept = {key: value for key, value in match.items() if value is not None}
        raw = {**raw, "match": kept or None}
        if not kept:
            nulls.add("match")
    if not nulls:
        return raw, nulls
    return {key: value for key, value in raw.items() if key not in nulls}, nulls


@functools.lru_cache(maxsize=1024)    # a list of 100k lines holds a handful of categories
def _normal_reason(text: str) -> str | None:
    """A reason as stored: stripped, lower case, each run of spaces one ``-`` (``Payment
    overdue`` -> ``payment-overdue``, which the portal reads as it reads ``payment_overdue``);
    ``""``: no reason. None when it is no short category (``_REASON``) or, written as words,
    looks like free text: more than ``_REASON_WORDS`` words, or a digit (``owes 120 EUR``,
    ``Owes-120-EUR``, ``unpaid since 2026-01-01``), or anything but ASCII (a Kelvin sign lower-
    cases to ``k``). A reason already written as a slug is checked as it always was, so a list
    accepted before (``overdue-30``) still is; one that needed normalising meets the limits."""
    if not text.isascii():
        return None
    words = text.split()
    reason = "-".join(words).lower()
    if not _REASON.fullmatch(reason) and reason:
        return None
    if reason != text and (len(words) > _REASON_WORDS or any(c.isdigit() for c in reason)):
        return None
    return reason


def _entry_match(raw: dict[str, Any], where: str, issues: list[ListIssue]) -> Match:
    """The entry's ``match`` keys, normalised (``parse_match``); none when the key is absent.

    A ``match`` key that is present but empty (``{}``, a CSV cell of ``;``) is an error, not
    "no match": it looks like an export that lost its values. A null one (``match: ~``, JSON
    ``null``) never gets here: ``_without_nulls`` left it out.
    """
    if "match" not in raw:
        return NO_MATCH
    value = raw["match"]
    try:
        return parse_match({} if value is None else value)
    except ValueError as exc:
        message = str(exc)
        if not message.startswith(("match", "unknown match")):
            message = f"match {message}"      # normal_mac's "mac 'zz' is not ..."
        issues.append(ListIssue(where, message))
        return NO_MATCH


def _entry_exemption(raw: dict[str, Any], where: str, issues: list[ListIssue]) -> tuple[float | None, str]:
    """``exempt_until`` (a date or RFC 3339 time) and ``exempt_category`` of a list entry.

    A date in the past is not an error (the exemption simply ended); a date more than the
    maximum away is, as is a category we do not know.
    """
    until_raw, category_raw = raw.get("exempt_until"), raw.get("exempt_category")
    if until_raw in (None, "") and category_raw in (None, ""):   # most entries: no import, no checks
        return None, ""
    from .exemptions import CATEGORIES, MAX_SECONDS, parse_instant
    if until_raw in (None, ""):
        if category_raw not in (None, ""):
            issues.append(ListIssue(where, "exempt_category without exempt_until (every exemption needs an end)"))
        return None, ""
    category = str(category_raw or "other").strip().lower()
    if category not in CATEGORIES:
        issues.append(ListIssue(where, f"exempt_category {category_raw!r} is not one of {', '.join(CATEGORIES)}"))
    try:
        until = parse_instant(until_raw)
    except ValueError as exc:
        issues.append(ListIssue(where, f"exempt_until: {exc}"))
        return None, ""
    if until - time.time() > MAX_SECONDS:
        issues.append(ListIssue(where, f"exempt_until {until_raw!r} is more than {int(MAX_SECONDS // 86400)} "
                                       "days away; exemptions must be renewed"))
    return until, category


def detect_format(name: str, text: str, content_type: str = "") -> str:
    """``yaml``, ``json`` or ``csv`` from the content type, file suffix, or the text itself."""
    return _content_type_format(content_type) or _name_or_text_format(name, text)


def _content_type_format(content_type: str) -> str | None:
    """The format an HTTP ``Content-Type`` names, or None."""
    content_type = content_type.split(";")[0].strip().lower()
    if content_type.endswith("json"):
        return "json"
    if content_type.endswith(("yaml", "yml")):
        return "yaml"
    if content_type in ("text/csv", "application/csv"):
        return "csv"
    return None


def _name_or_text_format(name: str, text: str) -> str:
    """The format the file suffix names, else the one the text looks like."""
    suffix = PurePath(name.split("?")[0]).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    head = text.lstrip()[:200]
    if head.startswith(("{", "[")):
        return "json"
    if head.startswith(("subscribers:", "---", "#")) and "subscribers:" in text[:4096]:
        return "yaml"
    return "csv"


def parse_list(text: str, name: str, content_type: str = "", *,
               space: AddressSpace | None = None) -> list[Subscriber]:
    """Parse a whole list; raises ``ListError`` naming every bad line, or returns all entries.

    ``space`` (``AddressSpace.from_config``) refuses the whole list when one entry names an
    address outside ``gateway.subscriber_prefixes``; None accepts any unicast address.
    ``ListError`` is the only exception: whatever the bytes, a bad list must never become a
    crash of whoever reads it (docs/reference.md, Safety rules 5).
    """
    try:
        with gc_paused():
            return _parse_list(text, name, content_type, space)
    except ListError:
        raise
    except RecursionError:
        raise ListError([ListIssue(f"{name}:1", "nested too deeply to be a list")]) from None
    except Exception as exc:  # a bug of ours on odd input: refuse the list, say so, keep running
        log.error("event=list_parser_failed name=%s error=%r", name, exc, exc_info=True)
        raise ListError([ListIssue(f"{name}:1", f"the list could not be read ({type(exc).__name__}: "
                                                f"{exc}); nothing of it is used")]) from None


def _parse_list(text: str, name: str, content_type: str, space: AddressSpace | None) -> list[Subscriber]:
    text = text.removeprefix("\ufeff")  # spreadsheet "CSV UTF-8" exports start with a BOM
    if not text.strip():
        raise ListError([ListIssue(f"{name}:1", "the list is empty (a truncated export?); "
                                                "an empty list must be written explicitly")])
    declared = _content_type_format(content_type)
    fmt = declared or _name_or_text_format(name, text)
    if fmt == "csv":
        return _check_unique(_parse_csv(text, name, space), name)
    try:
        entries = _parse_document(text, name, fmt, space)
    except _NoSubscribers:
        # A CSV export saved as restricted.yaml (or .json): the suffix chose wrong and the
        # content says which. Only for a text whose first line is a CSV header we accept:
        # anything else is not guessed at, and keeps the YAML/JSON error.
        if declared is not None or not _starts_with_csv_header(text):
            raise
        try:
            entries = _parse_csv(text, name, space)
        except ListError as exc:   # say why CSV errors come back for a .yaml/.json name
            raise ListError([ListIssue(i.location, f"read as CSV (its first line is a CSV header): {i.message}")
                             for i in exc.issues]) from None
        if not entries:   # an empty CSV lifts everyone: under a YAML/JSON name, only `subscribers: []` does
            raise ListError([ListIssue(f"{name}:1", f"a CSV header and no row under a .{fmt} name; an empty "
                                                    "list is written `subscribers: []`")]) from None
    return _check_unique(entries, name)


class _NoSubscribers(ListError):
    """The text is no YAML/JSON document with a ``subscribers:`` mapping at all (not one
    with a bad entry): ``_parse_list`` then asks whether it is a CSV list instead."""


def _starts_with_csv_header(text: str) -> bool:
    """Whether the first line that is neither blank nor a ``#`` comment is a CSV header row
    ``_parse_csv`` accepts, naming ``id`` and ``addresses`` or ``match`` (a header without
    them heads no valid row: not worth a guess)."""
    for line in io.StringIO(text, newline=""):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            cells = [c.strip() for c in next(csv.reader([line], strict=True), [])]
        except csv.Error:
            return False
        if not cells or not _is_header(cells):
            return False
        scratch: list[ListIssue] = []
        columns = _header_columns(cells, "", scratch)
        return not scratch and ("addresses" in columns or "match" in columns)
    return False


Entry = tuple[Subscriber, int, list[Span]]   # a list line's subscriber, its line, its keys' spans


def _checked_entry(raw: Any, where: str, issues: list[ListIssue],
                   space: AddressSpace | None) -> tuple[Subscriber, list[Span]] | None:
    """One list line: ``_fast_entry`` when it can vouch for it, else ``_validated`` (which
    names every problem). An unexpected error is that line's issue (and logged: it is a bug
    to fix), so the line is named and the other lines still checked."""
    try:
        fast = _fast_entry(raw, space)
        if fast is not None:
            return fast
        checked = _validated(raw, where, issues, space)
        return None if checked is None else (checked[0], [span(network) for network in checked[1]])
    except Exception as exc:
        log.error("event=list_entry_check_failed where=%s error=%r", where, exc, exc_info=True)
        issues.append(ListIssue(where, f"this entry could not be checked ({type(exc).__name__}: {exc})"))
        return None


#: Modes by their list text, and the empty/absent mode's default (``_validated``'s rule).
_MODES: dict[Any, Mode] = {None: Mode.WALLED_GARDEN, "": Mode.WALLED_GARDEN,
                           **{m.value: m for m in Mode.restricting()}}
#: The fields ``_fast_entry`` handles; an entry with any other (match, an exemption) takes
#: the full path.
_FAST_FIELDS = frozenset(("id", "addresses", "mode", "reason"))
_BITS = {socket.AF_INET: (4, 32), socket.AF_INET6: (6, 128)}
_ANY_SPACE = AddressSpace()     # no subscriber_prefixes: special-use addresses refused only


def _fast_entry(raw: Any, space: AddressSpace | None) -> tuple[Subscriber, list[Span]] | None:
    """The common list line (id, addresses, mode, reason; nothing odd) checked without an
    ``ipaddress`` network or an issue list: ``_validated`` per line was most of a 100k list's
    parse (``parse_list`` of 100k CSV lines 1.32 -> 0.87 s). It returns a result only where ``_validated`` would
    return the same subscriber with no issue (a property test holds it to that), and None
    for anything else, unusual or wrong: the full path then decides and words the problems.
    Hand-written rather than a library's: the rules are ``_validated``'s own."""
    if not isinstance(raw, dict) or not raw.keys() <= _FAST_FIELDS:
        return None
    ident, addresses, reason_raw = raw.get("id"), raw.get("addresses"), raw.get("reason") or ""
    mode = _MODES.get(raw.get("mode"), Mode.FREE) if isinstance(raw.get("mode"), (str, type(None))) else Mode.FREE
    reason = _normal_reason(reason_raw) if isinstance(reason_raw, str) else None
    if mode is Mode.FREE or not isinstance(ident, str) or not _ID.fullmatch(ident) or reason is None:
        return None
    items = addresses.split() if isinstance(addresses, str) else addresses
    if not isinstance(items, list) or not items:
        return None
    keys: list[Key] = []
    spans: list[Span] = []
    for item in items:
        if not isinstance(item, str):
            return None
        address, slash, length = item.strip().partition("/")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        version, width = _BITS[family]
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError):     # ValueError: an embedded NUL
            return None
        if slash:
            if not (length.isascii() and length.isdigit()) or len(length) > 3:
                return None
            plen = int(length)
        else:
            plen = width
        host = (1 << (width - plen)) - 1 if plen <= width else -1
        first = int.from_bytes(packed, "big")
        if plen < MIN_PREFIX[version] or host < 0 or first & host:
            return None
        last = first | host
        if not (space or _ANY_SPACE).accepts(version, first, last):
            return None
        key = (version, plen, socket.inet_ntop(family, packed))
        if key in keys:
            return None
        keys.append(key)
        spans.append((version, first, last))
    return Subscriber.from_keys(ident, tuple(keys), mode, reason), spans


def _parse_document(text: str, name: str, fmt: str, space: AddressSpace | None) -> list[Entry]:
    """A YAML or JSON list; ``_NoSubscribers`` when the text is not such a document at all.

    Values are read as written (``plain_strings``), except an unquoted null (JSON ``null``,
    YAML ``~``, ``null`` or an empty value), which is None: not given (``_without_nulls``).
    """
    if fmt == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise _NoSubscribers([ListIssue(f"{name}:{exc.lineno}", f"not valid JSON: {exc.msg}")]) from None
        except RecursionError:
            raise ListError([ListIssue(f"{name}:1", "not valid as a list: JSON nested too deeply")]) from None
    try:
        located = yamlsource.load(text, plain_strings=True, nulls=True, aliases=False, max_nodes=LIST_MAX_NODES)
    except yamlsource.YamlSyntaxError as exc:
        raise _NoSubscribers([ListIssue(f"{name}:{exc.line or 1}", f"not valid {fmt.upper()}: {exc}")]) from None
    data = located.data
    if not isinstance(data, dict) or "subscribers" not in data:
        raise _NoSubscribers([ListIssue(f"{name}:1", "expected a top-level 'subscribers:' list")])
    extra = [k for k in data if k != "subscribers"]
    issues: list[ListIssue] = [ListIssue(f"{name}:{located.line((k,))}", f"unknown top-level key {k!r}")
                               for k in extra]
    entries = data["subscribers"]
    if not isinstance(entries, list):
        issues.append(ListIssue(f"{name}:{located.line(('subscribers',))}",
                                "'subscribers' must be a list (write 'subscribers: []' for an empty list; "
                                "an empty value looks like a truncated export)"))
        raise ListError(issues)
    out: list[Entry] = []
    for i, raw in enumerate(entries):
        line = located.line(("subscribers", i)) or 1
        checked = _checked_entry(raw, f"{name}:{line}", issues, space)
        if checked is not None:
            out.append((checked[0], line, checked[1]))
    if issues:
        raise ListError(issues)
    return out


def _parse_csv(text: str, name: str, space: AddressSpace | None) -> list[Entry]:
    """Rows in ``_FIELDS`` order, or in the order a header row names (any order, e.g.
    ``id,match,reason``). Trailing cells may be left out; an empty cell is an absent field.

    The last line may lack its line ending (RFC 4180) only when a cut there cannot change
    anything that matters (``_cut_risk``): an export cut off mid-line still parses, and
    ``100.64.0.12`` cut to ``100.64.0.1`` is a valid address, someone else's."""
    issues: list[ListIssue] = []
    out: list[Entry] = []
    columns: tuple[str, ...] | None = None   # from the header row; None: positional
    # The last row read: its line, and why it may be cut short ("": harmless), or its cells
    # (a data row: ``_cut_risk`` weighs them once the reader is done, not for every row).
    last: tuple[int, str | list[str]] = (1, "")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                last = (line, "")    # a blank line or a comment: cut or not, nobody changes
                continue
            cells = [c.strip() for c in row]
            if not out and not issues and columns is None and _is_header(cells):
                columns = _header_columns(cells, f"{name}:{line}", issues)
                last = (line, "the header row has no line ending and no row follows it (a truncated export?); "
                              "an empty list is the header row and a line ending")
                if issues:
                    last = (line, "")
                    break        # rows cannot be read without their column names
                continue
            last = (line, cells)
            order = columns or _FIELDS
            if not 2 <= len(cells) <= len(order):
                issues.append(ListIssue(f"{name}:{line}", f"expected 2 to {len(order)} columns "
                                                          f"({','.join(order)}), got {len(cells)}"))
                continue
            raw = dict(zip(order, cells, strict=False))
            if raw.get("match") == "":
                del raw["match"]     # an empty cell: no match keys (a present but empty match is an error)
            checked = _checked_entry(raw, f"{name}:{line}", issues, space)
            if checked is not None:
                out.append((checked[0], line, checked[1]))
    except csv.Error as exc:
        issues.append(ListIssue(f"{name}:{reader.line_num}", f"not valid CSV: {exc}"))
        last = (reader.line_num, "the last line has no line ending and could have been cut short "
                                 "(a truncated export?)")
    if last[1] and not text.endswith(("\n", "\r")):
        risk = last[1] if isinstance(last[1], str) else _cut_risk(last[1], columns)
        if risk:
            issues.append(ListIssue(f"{name}:{last[0]}", risk))
    if issues:
        raise ListError(issues)
    return out


def _cut_risk(cells: list[str], columns: tuple[str, ...] | None) -> str:
    """Why a data row, were it the last line and without a line ending, could have been cut
    short in a way that matters; "" when it could not.

    Harmless only under a header row: the row holds every column the header names and ends in
    ``mode`` (a cut mode is no mode: the list is refused; an empty one could be a whole mode cut
    away, so it must be written) or ``reason`` (only the portal's sentence could change). Any
    other last cell, cut, could be another id, address, match or exemption date, and still be
    valid. Without a header a row may run to seven columns, so any row could be a longer one cut
    after a comma (an exemption date and its category lost: a subscriber billing exempted walled).
    """
    if columns is None:
        return ("the last line has no line ending and the list has no header row, so it could be a "
                "longer row cut short (a truncated export?); end the file with a line ending")
    if len(cells) == len(columns) and columns[-1] in _SAFE_LAST and (cells[-1] or columns[-1] == "reason"):
        return ""
    column = columns[len(cells) - 1] if len(cells) <= len(columns) else "last"
    shown = f"{column}, empty" if not cells[-1] else column
    return (f"the last line has no line ending and its last cell ({shown}) could have been cut short "
            f"(a truncated export?); end the file with a line ending (a last line without one must hold "
            f"every column of the header, {','.join(columns)}, and end in mode or reason)")


def _is_header(cells: list[str]) -> bool:
    """Whether a first CSV row names columns: only field names, or ``id`` then bare words
    (so a misspelt name is reported as one rather than read as a subscriber called "id")."""
    names = [c.lower() for c in cells]
    return all(n in _FIELDS for n in names) or (names[0] == "id" and all(_HEADER_WORD.fullmatch(n) for n in names))


def _header_columns(cells: list[str], where: str, issues: list[ListIssue]) -> tuple[str, ...]:
    """The column order a header row gives; issues for unknown, empty, repeated or missing names."""
    names = tuple(c.lower() for c in cells)
    for position, column in enumerate(names, start=1):
        if column not in _FIELDS:
            issues.append(ListIssue(where, f"header column {position} {cells[position - 1]!r} is not a field; "
                                           f"expected some of {', '.join(_FIELDS)}"))
        elif column in names[:position - 1]:
            issues.append(ListIssue(where, f"header names {column} twice"))
    if "id" not in names:
        issues.append(ListIssue(where, "header has no id column"))
    return names


def _check_unique(entries: Iterable[Entry], name: str) -> list[Subscriber]:
    """Reject duplicate ids, addresses of two subscribers that are equal or nest (one
    restriction would wall the other), and a match value (same key) of two subscribers (one
    session would belong to both): each conflict names both lines."""
    issues: list[ListIssue] = []
    lines: dict[str, int] = {}
    result: list[Subscriber] = []
    spans: list[tuple[str, Span, Key]] = []
    for sub, line, parsed in entries:
        if sub.id in lines:
            issues.append(ListIssue(f"{name}:{line}", f"subscriber {sub.id} is listed again (first at line "
                                                      f"{lines[sub.id]}, {name}:{lines[sub.id]})"))
            continue
        lines[sub.id] = line
        result.append(sub)
        spans += [(sub.id, address_span, key) for address_span, key in zip(parsed, sub.keys, strict=True)]
    found = []
    for (outer_id, outer_key), (inner_id, inner_key) in find_span_overlaps(spans):
        outer_line, inner_line = lines[outer_id], lines[inner_id]
        outer, inner = key_text(outer_key), key_text(inner_key)
        if outer_key == inner_key:
            first, later = sorted(((outer_id, outer_line), (inner_id, inner_line)), key=lambda o: o[1])
            found.append((later[1], f"address {inner} of {later[0]} is also held by {first[0]} "
                                    f"(line {first[1]}, {name}:{first[1]})"))
        else:
            found.append((max(outer_line, inner_line),
                          f"address {inner} of {inner_id} (line {inner_line}, {name}:{inner_line}) lies inside "
                          f"{outer} of {outer_id} (line {outer_line}, {name}:{outer_line})"))
    holders: dict[tuple[str, str], str] = {}
    for sub in result:
        if sub.match is NO_MATCH:       # most entries (the shared empty one): no call
            continue
        for pair in sub.match.pairs():
            holder = holders.setdefault(pair, sub.id)
            if holder != sub.id:
                found.append((lines[sub.id], f"match {pair[0]}={pair[1]} of {sub.id} is also held by {holder} "
                                             f"(line {lines[holder]}, {name}:{lines[holder]})"))
    issues += [ListIssue(f"{name}:{line}", message) for line, message in sorted(found)]
    if issues:
        raise ListError(issues)
    return result
