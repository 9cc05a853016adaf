"""The ipset backend (``gateway.backend: ipset``): the reconciler's containers as ipsets, and with
``gateway.ipset.rules: own`` our own iptables chains (``iptables_rules``) that use them.

For gateways whose firewall is iptables (docs/ipset.md). The sets and their names are in
``ipset_sets``; the reconciler, policy and portal see the same ``Dataplane`` Protocol as with
nftables (``tests/unit/test_dataplane_conformance.py`` holds both to it).

What is atomic (``apply``), precisely:

* A diff (payments, restrictions, acknowledgements) is one ``ipset restore`` process whatever
  its size. ipset applies it line by line, not as one commit: a packet may meet the first lines
  applied and not yet the last (microseconds). When a line fails (an element already there or
  missing, a set gone), the lines before it are undone by a second ``restore`` of their inverses,
  so the sets are left as they were, and ``DataplaneError`` is raised. Not undone: an
  acknowledgement's timeout refreshed (``-exist``), which expires by itself.
* A full sync (``ReplaceTable``: start-up, a layout change, a repair) fills a fresh temporary set
  for every set of the layout (one ``restore``); a failure there destroys them and changes
  nothing. Then one ``restore`` swaps each into place (``ipset swap``: each set's contents change
  at one instant, the rules referencing it never see it missing or half-filled; across sets the
  swaps follow each other within microseconds). With ``rules: own`` our chains are then replaced,
  per family and table in one atomic ``iptables-restore --noflush`` commit, and the jumps inserted
  once. Old contents are destroyed last. A failure after the first swap leaves the new sets and
  raises ``DataplaneError``; the reconciler then re-reads and syncs again.
* Growing a set past its ``maxelem`` (``capacity``): a bigger set is filled with the current
  elements and swapped in before the diff that needs the room.

No generation. nftables numbers every committed transaction in the namespace (the digest mark's
proof that nobody changed the table since, ``Reconciler._carries``); ipset has no such number.
``generation()`` therefore returns a number that is new on every call, and ``holds_layout`` with
a digest mark answers False: a start never trusts the mark and always reads the sets back (~0.3 s
at 100k subscribers, ``ipset save``), and no mark survives the first diff after a full sync.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import shutil
import subprocess
from collections.abc import Iterable

from . import iptables_rules
from .backend import DataplaneError
from .ipset_lookup import SetLookup
from .ipset_sets import (
    PREFIX,
    TEMP,
    UMBRELLA_KINDS,
    SetSpec,
    capacity,
    container_of,
    element,
    key_of,
    members,
    prefix_of,
    sentinel_of,
    set_name,
    specs,
    umbrella,
)
from .kernel import keep_big_blocks_apart
from .layout import CALLER_SET, COUNTERS, SENTINELS, TAG_SET, Layout, sentinel_family, tag_address
from .state import TableState
from .transaction import AddElements, DeleteElements, ReplaceTable, Transaction

_LINE = re.compile(r"Error in line (\d+)")
_PROMPT = re.compile(r"^(?:ipset> )+")
_SENTINEL_KEYS = frozenset(SENTINELS.values())
_FULL = {4: 32, 6: 128}
_PER_PREFIX_SET = re.compile(rf"^{PREFIX}portal([46])-(\d+)$")
RULES = ("own", "external")
IPTABLES = ("auto", "nft", "legacy")


def iptables_variant(choice: str) -> str:
    """``nft`` or ``legacy``: ``auto`` follows what ``iptables`` is on this system (Debian's
    alternatives: ``iptables -V`` says ``nf_tables`` or ``legacy``), so our rules land in the
    same tables as the operator's own."""
    if choice != "auto":
        return choice
    try:
        out = subprocess.run(["iptables", "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "nft"
    return "legacy" if "legacy" in out else "nft"


def _run(argv: list[str], data: str | None = None, timeout: float = 120.0) -> str:
    """Run one tool; its stdout, or ``DataplaneError`` with its stderr."""
    try:
        done = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataplaneError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split())[:2000] or f"exit {done.returncode}"
        raise DataplaneError(f"{' '.join(argv[:3])}: {message}")
    return done.stdout


class IpsetDataplane:
    """Owns the ``walled-*`` ipsets and, with ``rules == "own"``, the ``WALLED-GARDEN-*`` chains of
    iptables and ip6tables; never touches another set or chain (but the three jumps)."""

    def __init__(self, table: str, rules: str = "own", iptables: str = "auto", base: Layout | None = None) -> None:
        """``base``: the configuration's layout (``table_layout.base_layout``), so that a start can
        tell whether the chains in the kernel are the ones this release renders for it (``read``)."""
        if rules not in RULES or iptables not in IPTABLES:
            raise ValueError(f"rules {rules!r} / iptables {iptables!r}")
        keep_big_blocks_apart()
        self.table = table
        self.rules = rules
        self.variant = iptables_variant(iptables)
        self.base = base
        #: The layout our last full sync installed (None before the first).
        self._installed: Layout | None = None
        self._lookup = SetLookup()
        self._reader: IpsetDataplane | None = None
        self._ticks = itertools.count(1)
        #: set name → (elements, maxelem) as of our last write or read; a set not here is asked.
        self._sizes: dict[str, tuple[int, int]] = {}

    # -- tools ---------------------------------------------------------------------------------
    def _ipt(self, version: int, tool: str = "") -> str:
        base = "iptables" if version == 4 else "ip6tables"
        return f"{base}-{self.variant}{'-' + tool if tool else ''}"

    def _names(self) -> list[str]:
        return _run(["ipset", "list", "-n"], timeout=30).split()

    def _save(self, names: Iterable[str]) -> list[str]:
        """``ipset save`` of these sets only, in one process (``ipset -``: a batch of commands)."""
        wanted = list(names)
        if not wanted:
            return []
        out = _run(["ipset", "-"], "".join(f"save {name}\n" for name in wanted))
        return [_PROMPT.sub("", line) for line in out.splitlines()]

    # -- the Protocol ----------------------------------------------------------------------------
    def reader(self) -> IpsetDataplane:
        """Another instance with its own netlink socket, for reads off the kernel thread."""
        if self._reader is None:
            self._reader = IpsetDataplane(self.table, self.rules, self.variant, self.base)
        return self._reader

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        ops = tx.operations
        last = max((i for i, op in enumerate(ops) if isinstance(op, ReplaceTable)), default=None)
        if last is None:
            self._diff([op for op in ops if not isinstance(op, ReplaceTable)])
            return
        replace = ops[last]
        assert isinstance(replace, ReplaceTable)
        self._replace(replace.layout, [op for op in ops[last + 1:] if not isinstance(op, ReplaceTable)])

    def generation(self) -> int:
        """Not a generation: ipset has none (module docstring). New on every call, so the
        reconciler never takes the sets as unchanged since it last looked."""
        return next(self._ticks)

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        """The tag in ``walled-layouttag`` and each container's sentinel, one netlink test each, and
        with ``rules: own`` our jumps and stamp (``_rules_hold``: a few iptables processes, so a
        firewall reload that rewrote FORWARD is repaired at the next quick check, as a deleted
        nftables table is). With a digest mark: False, always (no generation proves the mark;
        module docstring)."""
        if mark is not None:
            return False
        containers = list(containers)
        if not self._lookup.holds(set_name(TAG_SET), tag_address(tag)) or self.missing_sentinels(containers):
            return False
        return self.rules != "own" or self._rules_hold(self._expected_stamp(tag, map(set_name, containers)))

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        return [name for name in containers
                if not self._lookup.holds(set_name(name), sentinel_of(name), _FULL[sentinel_family(name)])]

    def layout_tag(self) -> str | None:
        """The tag in ``walled-layouttag``; with ``rules: own`` and our jumps or stamp not in place, the
        tag with what is wrong after it, so the check that asked reports it and repairs."""
        names = self._names()
        state = self._parse(self._save([set_name(TAG_SET)]) if set_name(TAG_SET) in names else [])
        tag = state.layout_tag if state is not None else None
        if tag is not None and self.rules == "own" and not self._rules_hold(self._expected_stamp(tag, names)):
            return f"{tag} (our iptables jumps or chains missing or not as this release renders them)"
        return tag

    def read(self) -> TableState | None:
        """Every set of ours (one ``ipset save`` batch); None when ``walled-layouttag`` is gone. With
        ``rules: own`` and our chains or jumps missing, or stamped with another layout or other
        rules than this release renders for it (``_expected_stamp``), no set counts as sealed:
        the reconciler's next sync replaces everything, rules included."""
        names = [n for n in self._names() if n.startswith(PREFIX)]
        if set_name(TAG_SET) not in names:
            return None
        lines = self._save([n for n in names if not _is_umbrella(n)])
        state = self._parse(lines)
        if state is None:
            return None
        if self.rules == "own" and not self._rules_hold(self._expected_stamp(state.layout_tag, names)):
            state.sealed.clear()
        return state

    def _expected_stamp(self, tag: str | None, names: Iterable[str]) -> str:
        """The stamp (``iptables_rules.stamp``) our chains must carry for the sets' layout tag:
        the layout with that tag is the one we installed last, or the configuration's with the
        prefix lengths the sets have (a start); its rules rendered by this release. When neither
        has the tag, only the tag can be checked (the reconciler replaces a layout it does not
        want anyway)."""
        prefixes = {(int(m.group(1)), int(m.group(2))) for m in map(_PER_PREFIX_SET.match, names) if m}
        candidates = [self._installed, self.base.with_prefixes(prefixes) if self.base else None]
        for layout in candidates:
            if layout is not None and layout.tag == tag:
                return iptables_rules.stamp(layout)
        return f"{tag} rules "

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        wanted = [set_name(name) for name in names]
        if not set(wanted) <= set(self._names()):
            return None
        state = self._parse(self._save(wanted), want_tag=False)
        return state

    def counters(self) -> dict[str, tuple[int, int]]:
        """Our rules' counters (comment ``walled-garden counter <name>``), both families summed;
        zero with ``rules: external`` (the rules are the operator's); none without our sets."""
        try:
            if set_name(TAG_SET) not in self._names():
                return {}
        except DataplaneError:
            return {}
        out = dict.fromkeys(COUNTERS, (0, 0))
        if self.rules != "own":
            return out
        pattern = re.compile(r'^\[(\d+):(\d+)\] -A WALLED-GARDEN-\S+ .*--comment "?'
                             + re.escape(iptables_rules.COUNTER_COMMENT) + r'(\w+)')
        for version in (4, 6):
            for table in ("filter", "nat"):
                try:
                    text = _run([self._ipt(version, "save"), "-c", "-t", table], timeout=30)
                except DataplaneError:
                    continue
                for line in text.splitlines():
                    match = pattern.match(line)
                    if match and match.group(3) in out:
                        packets, bytes_ = out[match.group(3)]
                        out[match.group(3)] = (packets + int(match.group(1)), bytes_ + int(match.group(2)))
        return out

    def recent_caller(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"recent_caller: {address!r} is not an IP address") from None
        return self._lookup.holds(set_name(CALLER_SET[parsed.version]), str(parsed))

    # -- reading -----------------------------------------------------------------------------------
    def _parse(self, lines: list[str], want_tag: bool = True) -> TableState | None:
        """``ipset save`` lines of our sets → elements by container, sentinels taken out (``sealed``)."""
        state = TableState(layout_tag=None)
        tag_seen = False
        for line in lines:
            parts = line.split()
            if len(parts) < 3 or parts[0] not in ("create", "add"):
                continue
            container = container_of(parts[1])
            if container is None:
                continue
            if parts[0] == "create":
                state.elements.setdefault(container, {})
                if "maxelem" in parts:
                    self._sizes[parts[1]] = (0, int(parts[parts.index("maxelem") + 1]))
                tag_seen = tag_seen or container == TAG_SET
                continue
            text = parts[2]
            if text in _SENTINEL_KEYS and (prefix_of(container) is not None or container.startswith("allowhost")):
                state.sealed.add(container)
                continue
            state.elements.setdefault(container, {})[key_of(container, text)] = None
            if container == TAG_SET:
                value = int(ipaddress.IPv6Address(text))
                if value < 1 << 64:
                    state.layout_tag = f"{value:016x}"
        for name, (_, maxelem) in list(self._sizes.items()):
            container = container_of(name)
            if container in state.elements:
                self._sizes[name] = (len(state.elements[container]) + (container in state.sealed), maxelem)
        if want_tag and not tag_seen:
            return None
        return state

    def _rules_hold(self, stamp: str) -> bool:
        """Our jumps are in place and ``WALLED-GARDEN-FWD`` carries ``stamp``, both families."""
        for version in (4, 6):
            for table, builtin, ours in iptables_rules.JUMPS:
                if subprocess.run([self._ipt(version), "-w", "5", "-t", table, "-C", builtin, "-j", ours],
                                  capture_output=True, timeout=30).returncode != 0:
                    return False
            listing = subprocess.run([self._ipt(version), "-w", "5", "-S", "WALLED-GARDEN-FWD"],
                                     capture_output=True, text=True, timeout=30)
            if listing.returncode != 0 or f"{iptables_rules.TAG_COMMENT}{stamp}" not in listing.stdout:
                return False
        return True

    # -- writing -----------------------------------------------------------------------------------
    def _diff(self, ops: list[AddElements | DeleteElements]) -> None:
        """One ``ipset restore``; a failed line undoes the lines before it (module docstring)."""
        lines: list[str] = []
        undo: list[str | None] = []
        growth: dict[str, int] = {}
        for op in ops:
            name = set_name(op.container)
            if isinstance(op, AddElements):
                growth[name] = growth.get(name, 0) + len(op.items)
                for key, _ in op.items:
                    item = element(op.container, key)
                    if op.timeout:
                        lines.append(f"add {name} {item} timeout {op.timeout} -exist")
                        undo.append(None)
                    else:
                        lines.append(f"add {name} {item}")
                        undo.append(f"del {name} {item}")
            else:
                growth[name] = growth.get(name, 0) - len(op.keys)
                for key in op.keys:
                    item = element(op.container, key)
                    lines.append(f"del {name} {item}")
                    undo.append(f"add {name} {item}")
        for name, more in growth.items():
            if more > 0:
                self._make_room(name, more)
        try:
            _run(["ipset", "restore"], "".join(line + "\n" for line in lines))
        except DataplaneError as exc:
            self._sizes.clear()
            match = _LINE.search(str(exc))
            done = int(match.group(1)) - 1 if match else 0
            back = [line for line in reversed(undo[:done]) if line is not None]
            if back:
                try:
                    _run(["ipset", "restore"], "".join(line + "\n" for line in back))
                except DataplaneError as again:
                    raise DataplaneError(f"{exc}; undoing the lines before it failed too: {again}") from None
            raise DataplaneError(str(exc).replace("The set with the given name does not exist",
                                                  "No such file or directory: the set does not exist")) from None
        for name, more in growth.items():
            if name in self._sizes:
                count, maxelem = self._sizes[name]
                self._sizes[name] = (count + more, maxelem)

    def _make_room(self, name: str, more: int) -> None:
        """Grow ``name`` (a bigger copy swapped in) when ``more`` elements would pass its maxelem."""
        if name not in self._sizes:
            header = _run(["ipset", "list", "-t", name], timeout=30) if name in self._names() else ""
            size_match = re.search(r"maxelem (\d+)", header)
            entries = re.search(r"Number of entries: (\d+)", header)
            if not (size_match and entries):
                return   # a missing set: the restore fails and says so
            self._sizes[name] = (int(entries.group(1)), int(size_match.group(1)))
        count, maxelem = self._sizes[name]
        if count + more <= maxelem:
            return
        lines = self._save([name])
        create = next((line for line in lines if line.startswith(f"create {name} ")), None)
        if create is None:
            return
        size = capacity(count + more)
        temp = TEMP + name[len(PREFIX):]
        head = re.sub(r"maxelem \d+", f"maxelem {size}", create.replace(f"create {name} ", f"create {temp} ", 1))
        body = [line.replace(f"add {name} ", f"add {temp} ", 1) for line in lines if line.startswith(f"add {name} ")]
        try:
            _run(["ipset", "restore"], "".join(line + "\n" for line in [head, *body, f"swap {temp} {name}"]))
        finally:
            subprocess.run(["ipset", "destroy", temp], capture_output=True, timeout=30)
        self._sizes[name] = (count, size)

    def _replace(self, layout: Layout, ops: list[AddElements | DeleteElements]) -> None:
        """A full sync: fresh sets filled and swapped in, then our rules (module docstring)."""
        wanted, contents = _contents(layout, ops)
        existing = set(self._names())
        fill: list[str] = [f"destroy {name}" for name in sorted(existing) if name.startswith(TEMP)]
        for name, items in contents.items():
            temp = TEMP + name[len(PREFIX):]
            fill.append(wanted[name].create(temp, len(items)))
            fill += [f"add {temp} {item}" if timeout is None else f"add {temp} {item} timeout {timeout}"
                     for item, timeout in items.items()]
        try:
            _run(["ipset", "restore"], "".join(line + "\n" for line in fill))
        except DataplaneError:
            self._destroy([TEMP + name[len(PREFIX):] for name in contents])
            raise
        switch: list[str] = []
        for name in contents:
            temp = TEMP + name[len(PREFIX):]
            switch.append(f"swap {temp} {name}" if name in existing else f"rename {temp} {name}")
        obsolete = sorted(n for n in existing if n.startswith(PREFIX) and n not in wanted)
        for version in (4, 6):
            for kind in UMBRELLA_KINDS:
                top = umbrella(kind, version)
                if top not in existing:
                    switch.append(wanted[top].create(top, 0))
                switch += [f"del {top} {name} -exist" for name in obsolete if name.startswith(f"{top}-")]
                switch += [f"add {top} {name} -exist" for name in members(layout, kind, version)]
        _run(["ipset", "restore"], "".join(line + "\n" for line in switch))
        if self.rules == "own":
            self._install_rules(layout)
        self._installed = layout
        self._destroy([TEMP + name[len(PREFIX):] for name in contents if name in existing] + obsolete)
        self._sizes = {name: (len(items), wanted[name].max_size or capacity(len(items)))
                       for name, items in contents.items()}

    def _install_rules(self, layout: Layout) -> None:
        for version in (4, 6):
            missing = {jump for jump in iptables_rules.JUMPS
                       if subprocess.run([self._ipt(version), "-w", "5", "-t", jump[0], "-C", jump[1], "-j", jump[2]],
                                         capture_output=True, timeout=30).returncode != 0}
            _run([self._ipt(version, "restore"), "--noflush", "-w", "5"],
                 iptables_rules.restore_text(layout, version, missing))

    def _destroy(self, names: list[str]) -> None:
        """Best effort: a set still referenced (an operator's rule naming an obsolete set) stays."""
        if names:
            subprocess.run(["ipset", "restore"], input="".join(f"destroy {n}\n" for n in names),
                           capture_output=True, text=True, timeout=60)

    # -- taking it all away (tests, ``walled-garden`` uninstall docs) -----------------------------
    def remove_everything(self) -> None:
        """Our jumps, chains and sets gone (the equivalent of ``nft delete table``)."""
        for version in (4, 6):
            for table, builtin, ours in iptables_rules.JUMPS:
                for _ in range(10):   # each jump was inserted once; bounded all the same
                    if subprocess.run([self._ipt(version), "-w", "5", "-t", table, "-D", builtin, "-j", ours],
                                      capture_output=True, timeout=30).returncode != 0:
                        break
            for table, chains in iptables_rules.CHAINS.items():
                for chain in chains:
                    subprocess.run([self._ipt(version), "-w", "5", "-t", table, "-F", chain], capture_output=True,
                                   timeout=30)
                for chain in chains:
                    subprocess.run([self._ipt(version), "-w", "5", "-t", table, "-X", chain], capture_output=True,
                                   timeout=30)
        names = [n for n in self._names() if n.startswith((PREFIX, TEMP))]
        umbrellas = [n for n in names if _is_umbrella(n)]
        self._destroy(umbrellas)
        self._destroy([n for n in names if n not in umbrellas])
        self._sizes.clear()


def _contents(layout: Layout, ops: list[AddElements | DeleteElements]
              ) -> tuple[dict[str, SetSpec], dict[str, dict[str, int | None]]]:
    """The layout's sets and what each holds once ``ops`` are applied to a fresh layout: element
    → timeout (None: none). Fails as the kernel would (a set not in the layout, a missing element)."""
    try:
        wanted = specs(layout)
    except ValueError as exc:
        raise DataplaneError(str(exc)) from None
    contents: dict[str, dict[str, int | None]] = {
        name: dict.fromkeys(spec.static) for name, spec in wanted.items() if spec.kind != "list:set"}
    for op in ops:
        name = set_name(op.container)
        if name not in contents:
            raise DataplaneError(f"No such file or directory: set {name} is not in the layout")
        if isinstance(op, AddElements):
            contents[name].update(dict.fromkeys((element(op.container, k) for k, _ in op.items), op.timeout))
        else:
            for key in op.keys:
                if contents[name].pop(element(op.container, key), "missing") == "missing":
                    raise DataplaneError(f"No such file or directory: {name} {key}")
    return wanted, contents


def render(tx: Transaction, rules: str = "own") -> str:
    """What a full sync installs, as text (``walled-garden render`` with ``gateway.backend:
    ipset``): the sets as ``ipset restore`` input under their final names (the daemon fills
    temporary sets and swaps them in), then with ``rules: own`` our chains as
    ``iptables-restore --noflush`` / ``ip6tables-restore --noflush`` input, jumps included."""
    last = max((i for i, op in enumerate(tx.operations) if isinstance(op, ReplaceTable)), default=None)
    if last is None:
        return ""
    replace = tx.operations[last]
    assert isinstance(replace, ReplaceTable)
    layout = replace.layout
    wanted, contents = _contents(layout, [op for op in tx.operations[last + 1:] if not isinstance(op, ReplaceTable)])
    out = ["# ipset restore -exist"]
    for name, items in contents.items():
        out.append(wanted[name].create(name, len(items)))
        out += [f"add {name} {item}" if t is None else f"add {name} {item} timeout {t}" for item, t in items.items()]
    for version in (4, 6):
        for kind in UMBRELLA_KINDS:
            top = umbrella(kind, version)
            out.append(wanted[top].create(top, 0))
            out += [f"add {top} {name}" for name in members(layout, kind, version)]
    text = "\n".join(out) + "\n"
    if rules == "own":
        for version in (4, 6):
            tool = "iptables-restore" if version == 4 else "ip6tables-restore"
            text += f"# {tool} --noflush\n" + iptables_rules.restore_text(layout, version, set(iptables_rules.JUMPS))
    return text


def _is_umbrella(name: str) -> bool:
    return any(name == umbrella(kind, version) for kind in UMBRELLA_KINDS for version in (4, 6))


def available() -> str:
    """Why the ipset backend cannot run here ("" when it can): the tools it spawns."""
    for tool in ("ipset", "iptables-nft-restore", "ip6tables-nft-restore"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian packages ipset, iptables)"
    return ""
