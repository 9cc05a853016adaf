"""The real backend: our table in the kernel, through libnftables."""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from .backend import DataplaneError
from .layout import CALLER_SET, SENTINELS, TAG_SET, Layout, carried_set, sentinel_family, tag_address
from .libnftables import Nftables, NftError
from .nfnetlink import ElementLookup, TableStructure
from .state import Expiring, Structure, TableState
from .transaction import Transaction

_TAG = re.compile(r"walled-garden layout ([0-9a-f]+)")
_MISSING = "No such file or directory"
_SENTINEL_KEYS = frozenset(SENTINELS.values())
#: What every table of ours has carried since the first release (the table's comment and the
#: ``layout`` chain's rule), in ``nft list table`` text: the marks of a table from before
#: ``layouttag`` existed.
_OURS_TEXT = ('comment "managed by walled-garden', 'comment "walled-garden layout ')


class Ownership(enum.Enum):
    """Whose ``inet <gateway.table>`` is in the kernel (``table_owner``)."""

    ABSENT = "absent"     # no such table: ours to create
    OURS = "ours"         # a table we made, this release or an earlier one
    EMPTY = "empty"       # a table with nothing in it: nobody's rules to lose
    FOREIGN = "foreign"   # someone else's: a sync would replace it and wipe their rules


def table_owner(table: str, nft: Nftables | None = None) -> Ownership:
    """Is ``inet <table>`` ours? Asked once at start, before anything writes to the kernel
    (SPEC 7: own exactly one table, never touch another): ``gateway.table: filter`` names
    Debian's own ``inet filter``, which the first full sync would replace.

    Ours: the ``layouttag`` set (every release since 0.1.0; one small listing, ~0.3 ms whatever
    the table holds), else the table's comment or the ``layout`` chain's comment, which every
    table of ours has carried since the first commit (a text listing: only for an old table of
    ours or someone else's). Raises ``DataplaneError`` when the kernel cannot be asked."""
    if nft is None:
        own = Nftables()
        try:
            return table_owner(table, own)
        finally:
            own.close()
    try:
        listed = nft.run_json("list tables inet")
    except NftError as exc:
        raise DataplaneError(f"list tables inet: {exc}") from None
    names = {body.get("name") for obj in _objects(listed) if isinstance(body := obj.get("table"), dict)
             and body.get("family", "inet") == "inet"}
    if table not in names:
        return Ownership.ABSENT
    try:
        nft.run_json(f"list set inet {table} {TAG_SET}")
        return Ownership.OURS
    except NftError as exc:
        if _MISSING not in str(exc):
            raise DataplaneError(f"list set inet {table} {TAG_SET}: {exc}") from None
    try:
        whole = nft.run_json(f"list table inet {table}")
        text = nft.run(f"list table inet {table}")
    except NftError as exc:
        if _MISSING in str(exc):
            return Ownership.ABSENT   # deleted between the two listings
        raise DataplaneError(f"list table inet {table}: {exc}") from None
    if any(mark in text for mark in _OURS_TEXT):
        return Ownership.OURS
    if all(set(obj) <= {"metainfo", "table"} for obj in _objects(whole)):
        return Ownership.EMPTY
    return Ownership.FOREIGN


class KernelDataplane:
    """Owns exactly one ``inet`` table; never touches the rest of the ruleset."""

    def __init__(self, table: str, nft: Nftables | None = None) -> None:
        keep_big_blocks_apart()
        self.table = table
        self._nft = nft or Nftables()
        self._reader: KernelDataplane | None = None
        self._lookup = ElementLookup(table)
        self._structure = TableStructure(table, self._lookup.session)

    def reader(self) -> KernelDataplane:
        """The same table through a libnftables context of its own, for reads made off the
        kernel thread (checks, counters, caller lookups). With nft 1.0.6 the first read after
        any write reloads every set's elements (~0.7 s at 100k subscribers, measured): on the
        kernel thread every webhook would wait behind it; here they do not."""
        if self._reader is None:
            self._reader = KernelDataplane(self.table, Nftables())
        return self._reader

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        try:
            self._nft.run(tx.render())
        except NftError as exc:
            raise DataplaneError(str(exc)) from None

    def read(self) -> TableState | None:
        return self._listing(f"list table inet {self.table}")

    def _listing(self, command: str) -> TableState | None:
        """One ``nft -j list ...`` of ours, parsed; None when the table (or set) is gone."""
        try:
            data = self._nft.run_json(command)
        except NftError as exc:
            if _MISSING in str(exc):
                return None
            raise DataplaneError(str(exc)) from None
        return parse_listing(data, self.table)

    def layout_tag(self) -> str | None:
        """The layout tag of our table in the kernel, listing one small chain; None if the table is gone."""
        state = self._listing(f"list chain inet {self.table} layout")
        return state.layout_tag if state is not None else None

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        """The tag's element (and ``mark``) in ``layouttag`` and every container's sentinel, each
        one exact lookup by the kernel (``ElementLookup``)."""
        marks = [tag_address(tag)] + ([mark] if mark is not None else [])
        lookups = [(TAG_SET, address) for address in marks]
        lookups += [(name, SENTINELS[sentinel_family(name)]) for name in containers]
        return all(self._lookup.holds(name, address) for name, address in lookups)

    def structure(self, layout: Layout) -> Structure | None:
        """The table's structure over netlink (``nfnetlink.TableStructure``), with the fingerprint
        the layout tag's element carries as its comment (``transaction.MarkStructure``)."""
        return self._structure.read(layout.static_sets(), (TAG_SET, tag_address(layout.tag)))

    def expected_structure(self, layout: Layout) -> str:
        """Unknown before an install: how the kernel holds a rule is libnftables' translation of
        the rendered text, which differs between nft versions (the reconciler reads it back)."""
        return ""

    def generation(self) -> int:
        """The ruleset's generation id (``ElementLookup.generation``)."""
        return self._lookup.generation()

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        """One ``list set`` per name (~0.3 ms each for a small set, whatever the table holds)."""
        out = TableState(layout_tag=None)
        for name in names:
            state = self._listing(f"list set inet {self.table} {name}")
            if state is None:
                return None
            out.elements.update(state.elements)
            out.sealed |= state.sealed
        return out

    def read_timeouts(self, names: Iterable[str]) -> Expiring:
        """One ``list set`` per name (``read_sets``), the expiry ``parse_listing`` keeps."""
        out: Expiring = {}
        for name in names:
            state = self._listing(f"list set inet {self.table} {name}")
            if state is not None and name in state.elements:
                out[name] = state.expiring.get(name, {})
        return out

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        """The sets whose sentinel the kernel does not find (a lookup each, whatever the set's size)."""
        return [name for name in containers if not self._lookup.holds(name, SENTINELS[sentinel_family(name)])]

    def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of our named counters, cheap: no set contents are listed."""
        try:
            data = self._nft.run_json(f"list counters table inet {self.table}")
        except NftError:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for obj in _objects(data):
            counter = obj.get("counter")
            if (isinstance(counter, dict) and counter.get("table") == self.table
                    and isinstance(counter.get("name"), str)):
                try:
                    out[counter["name"]] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
                except (TypeError, ValueError):
                    raise DataplaneError(f"counter {counter['name']!r}: packets/bytes are not numbers") from None
        return out

    def recent_caller(self, address: str) -> bool:
        """Is ``address`` in ``portalcallerV`` (a packet to the portal's ports within
        ``CALLER_TIMEOUT``)? Absent, or no table, is False, never an error.

        A listing of that small set, not ``get element``: with nft 1.0.6 a ``get element`` that
        misses costs a full cache load (~1 s at 100k subscribers, and the next command pays
        again; measured with tests/bench/bench_table_check.py's table), while listing one set
        of recent portal visitors takes ~0.3 ms."""
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"recent_caller: {address!r} is not an IP address") from None
        name = CALLER_SET[parsed.version]
        state = self._listing(f"list set inet {self.table} {name}")
        return state is not None and any(_same_address(key, parsed) for key in state.elements.get(name, {}))


#: glibc's ``mallopt`` parameter for the size from which a block gets a mapping of its own.
_M_MMAP_THRESHOLD = -3
#: 128 KiB, glibc's own starting value, kept fixed (see ``keep_big_blocks_apart``).
MMAP_THRESHOLD = 128 * 1024


def keep_big_blocks_apart() -> None:
    """Every C heap block of ``MMAP_THRESHOLD`` or more in a mapping of its own, for good.

    glibc starts so, but raises the threshold to the size of each such block freed (up to 32
    MiB), and the daemon frees many: a sync's 125k-entry dicts and lists, libnftables' parse of
    the transaction, the listing of a table. From then on those blocks come from the main heap,
    where the long-lived entries and decisions allocated between them keep the freed space from
    going back: measured at 100k subscribers, 318 MB of daemon RSS after a cold start against
    215 MB with the threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``), no slower. Setting it
    with ``mallopt`` also turns glibc's raising off. Elsewhere than glibc nothing happens.
    Called by the real backend, so once in the daemon, before it reads its state.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):   # not glibc
        pass


def _same_address(key: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(key) == address
    except ValueError:
        return False


def parse_listing(data: Any, table: str) -> TableState:
    """``nft -j list table`` output → layout tag and elements of every set and map.

    The layout's sentinels are not elements: they are taken out and their sets listed in
    ``sealed``. The sets a replace carries over (``layout.carried_set``) also have their
    elements' expiry kept (``TableState.expiring``). Anything not shaped like nft's JSON raises
    ``DataplaneError`` naming what.
    """
    state = TableState(layout_tag=None)
    for obj in _objects(data):
        rule = obj.get("rule")
        if isinstance(rule, dict) and rule.get("chain") == "layout":
            comment = rule.get("comment", "")
            match = _TAG.search(comment) if isinstance(comment, str) else None
            if match:
                state.layout_tag = match.group(1)
        for kind in ("set", "map"):
            body = obj.get(kind)
            if not isinstance(body, dict) or body.get("table") != table:
                continue
            name = body.get("name")
            if not isinstance(name, str):
                raise DataplaneError(f"nft listing: a {kind} of table {table} without a name")
            raw = body.get("elem", [])
            if not isinstance(raw, list):
                raise DataplaneError(f"nft listing: {kind} {name}: 'elem' is not a list")
            items = dict(_element(e, name) for e in raw)
            if _SENTINEL_KEYS.intersection(items):
                for key in _SENTINEL_KEYS:
                    items.pop(key, None)
                state.sealed.add(name)
            state.elements[name] = items
            if kind == "set" and carried_set(name):
                state.expiring[name] = _expiring(raw, body.get("timeout"))
    return state


def _expiring(raw: list[Any], default: Any) -> dict[str, tuple[int, int]]:
    """Key → (timeout, seconds left) of the elements that expire, from ``nft -j``: an element
    lists ``expires`` (whole seconds, rounded down) and its ``timeout`` unless it is the set's
    own (``default``). The others (the DNS forwarder's marker) are left out, the sentinels too."""
    out: dict[str, tuple[int, int]] = {}
    for item in raw:
        elem = item.get("elem") if isinstance(item, dict) else None
        if not isinstance(elem, dict):
            continue
        left, timeout, key = elem.get("expires"), elem.get("timeout", default), elem.get("val")
        if isinstance(left, (int, float)) and not isinstance(left, bool) and isinstance(key, str) \
                and key not in _SENTINEL_KEYS and left >= 1:
            span = int(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else 0
            out[key] = (max(span, int(left)), int(left))
    return out


def _objects(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        raise DataplaneError("nft listing: not a JSON object")
    objects = data.get("nftables", [])
    if not isinstance(objects, list):
        raise DataplaneError("nft listing: 'nftables' is not a list")
    return [obj for obj in objects if isinstance(obj, dict)]


def _element(raw: Any, container: str = "?") -> tuple[str, str | None]:
    if isinstance(raw, list):  # map element: [key, verdict]
        if len(raw) != 2 or not isinstance(raw[1], dict) or len(raw[1]) != 1:
            raise DataplaneError(f"nft listing: {container}: map element {raw!r:.80} is not [key, {{verdict}}]")
        key, value = raw
        (verb, arg), = value.items()
        target = arg.get("target") if isinstance(arg, dict) else None
        return _key(key, container), f"{verb} {target}" if target else str(verb)
    return _key(raw, container), None


def _key(raw: Any, container: str = "?") -> str:
    while isinstance(raw, dict) and "elem" in raw:   # an element with attributes (counter, expiry)
        elem = raw["elem"]
        if not isinstance(elem, dict) or "val" not in elem:
            raise DataplaneError(f"nft listing: {container}: element {raw!r:.80} without a value")
        raw = elem["val"]
    if isinstance(raw, dict) and "prefix" in raw:
        prefix = raw["prefix"]
        if not isinstance(prefix, dict) or "addr" not in prefix or "len" not in prefix:
            raise DataplaneError(f"nft listing: {container}: prefix {raw!r:.80} without addr and len")
        return f"{_scalar(prefix['addr'], container)}/{_scalar(prefix['len'], container)}"
    return _scalar(raw, container)


def _scalar(raw: Any, container: str) -> str:
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        return str(raw)
    raise DataplaneError(f"nft listing: {container}: unexpected element {raw!r:.80}")
