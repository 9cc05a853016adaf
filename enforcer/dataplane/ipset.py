"""The ipset backend (``gateway.backend: ipset``): the reconciler's containers as ipsets, and with
``gateway.ipset.rules: own`` our own iptables chains (``iptables_rules``) that use them.

For gateways whose firewall is iptables (docs/ipset.md). The sets and their names are in
``ipset_sets``; the reconciler, policy and portal see the same ``Dataplane`` Protocol as with
nftables (``tests/unit/test_dataplane_conformance.py`` holds both to it).

Only names ``ipset_sets`` generates are ours (``ours``, ``ours_temporary``): only they are read
back, and only they are ever destroyed. Another ``walled-something`` set is left alone.

What is atomic (``apply``), precisely:

* A diff (payments, restrictions, acknowledgements) is one ``ipset restore`` process whatever
  its size, its additions written before its deletions: a subscriber moved from one mode to
  another is in the new mode's set before it leaves the old one's, never in neither. ipset
  applies it line by line, not as one commit: a packet may meet the first lines applied and not
  yet the last (microseconds). When a line fails (an element already there or missing, a set
  gone), the lines before it are undone by a second ``restore`` of their inverses, so the sets
  are left as they were, and ``DataplaneError`` is raised. Not undone: an acknowledgement's
  timeout refreshed (``-exist``), which expires by itself.
* A full sync (``ReplaceTable``: start-up, a layout change, a repair) fills a fresh temporary set
  for every set of the layout (one ``restore``; a failure destroys them and changes nothing).
  Then one ``restore`` prepares the live sets: the subscriber keys that enter a live portal,
  notice or throttle set are added to it, a set new to the layout is renamed into place, and
  each umbrella is swapped for a copy listing its members and the new ones. Then one ``restore``
  swaps each filled set into place (``ipset swap``: each set's contents change at one instant,
  the rules referencing it never see it missing or half-filled) and takes the members the
  layout no longer has out of the umbrellas. So throughout, every key the new contents restrict
  is restricted (a moved subscriber is in both sets a moment, never in neither). A failure in
  either of the last two undoes the lines before it, the first's included: nothing changed.
  With ``rules: own`` our chains are then replaced, per family and table in one atomic
  ``iptables-restore --noflush`` commit, and the jumps inserted once (a failure there leaves
  the new sets and raises; the reconciler re-reads and syncs again). The old contents and sets
  the layout no longer has are destroyed last.
* Growing a set past its ``maxelem`` (``capacity``): a bigger set is filled with the current
  elements and swapped in before the diff that needs the room.

Every tool runs through ``_run`` / ``_succeeds``: a tool that is missing, hangs or fails raises
``DataplaneError`` (the reconciler then sets ``needs_full``), never another exception; clean-ups
that may fail without harm (``_destroy``, ``remove_everything``) log instead. A set of ours that
cannot be destroyed (a rule not ours names it) is emptied instead (``_destroy_or_empty``): it
must not keep walling whoever it held.

The structure (``structure``, ``expected_structure``): with ``rules: own`` our chains and jumps,
compared every few seconds by the table check (``reconciler.structure_problem``) with what this
release renders for the layout, as ``_shape`` reads both: a rule deleted inside our chains is
repaired within seconds, not at the next full check. Known from the render, it needs no mark on
the sets (nftables needs one: its rules are known only as the kernel holds them).

No generation. nftables numbers every committed transaction in the namespace (the digest mark's
proof that nobody changed the table since, ``Reconciler._carries``); ipset has no such number.
``generation()`` therefore returns a number that is new on every call, and ``holds_layout`` with
a digest mark answers False: a start never trusts the mark and always reads the sets back (~0.3 s
at 100k subscribers, ``ipset save``), and no mark survives the first diff after a full sync.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

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
    is_umbrella,
    key_of,
    members,
    ours,
    ours_temporary,
    per_prefix,
    prefix_of,
    sentinel_of,
    set_name,
    specs,
    temporary,
    umbrella,
)
from .kernel import keep_big_blocks_apart
from .layout import CALLER_SET, COUNTERS, SENTINELS, TAG_SET, Layout, carried_set, sentinel_family, tag_address
from .state import Expiring, Structure, TableState, fingerprint
from .transaction import AddElements, AddExpiring, DeleteElements, DropElements, ReplaceTable, Transaction

log = logging.getLogger("walled_garden.enforcer")

_LINE = re.compile(r"Error in line (\d+)")
_PROMPT = re.compile(r"^(?:ipset> )+")
_SENTINEL_KEYS = frozenset(SENTINELS.values())
_FULL = {4: 32, 6: 128}
#: The per-prefix sets whose keys restrict: a key entering one is added to the live set before
#: a full sync's swaps (module docstring).
_RESTRICTING = ("portal", "notice", "throttle")
#: What a rule's shape keeps (``_shape``): option → how many values follow it. These are printed
#: back by ``iptables -S`` / ``-save`` as written; the rest (``-m tcp`` added, ICMP types as
#: numbers, hashlimit's rate rounded) is not, so it is left out of the comparison.
_SHAPE_OPTIONS = {"-A": 1, "-i": 1, "-o": 1, "-p": 1, "--match-set": 2, "-j": 1, "-g": 1, "--comment": 1,
                  "--hashlimit-name": 1, "--dport": 1, "--dports": 1, "--to-ports": 1, "--reject-with": 1,
                  "--add-set": 2}
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


def _spawn(argv: list[str], data: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """The one place a tool is started: a tool missing or hanging is a ``DataplaneError``, so
    the reconciler's ``_apply`` (which catches only that) sets ``needs_full``."""
    try:
        return subprocess.run(argv, input=data, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataplaneError(f"{argv[0]}: {exc}") from None


def _run(argv: list[str], data: str | None = None, timeout: float = 120.0) -> str:
    """Run one tool; its stdout, or ``DataplaneError`` with its stderr."""
    done = _spawn(argv, data, timeout)
    if done.returncode != 0:
        message = " ".join(done.stderr.split())[:2000] or f"exit {done.returncode}"
        raise DataplaneError(f"{' '.join(argv[:3])}: {message}")
    return done.stdout


def _succeeds(argv: list[str], timeout: float = 30.0) -> bool:
    """Does the tool exit 0? For questions answered by the exit status (``iptables -C``)."""
    return _spawn(argv, None, timeout).returncode == 0


def _restore(lines: list[str], undo: list[str | None], before: list[str | None] | None = None) -> None:
    """One ``ipset restore`` of ``lines``. When line N fails, the inverses of the lines before it
    (``undo``, None: nothing to undo) and then of ``before`` (an earlier restore's, already
    applied) are applied in reverse, and ``DataplaneError`` raised: the sets are as before.
    A failure without a line number (the tool hung or is missing) undoes nothing: what it
    applied is unknown, and the reconciler re-reads."""
    if not lines:
        return
    try:
        _run(["ipset", "restore"], "".join(line + "\n" for line in lines))
    except DataplaneError as exc:
        match = _LINE.search(str(exc))
        done = int(match.group(1)) - 1 if match else 0
        back = [line for line in [*reversed(undo[:done]), *reversed(before or [])] if line is not None] \
            if match else []
        if back:
            try:
                _run(["ipset", "restore"], "".join(line + "\n" for line in back))
            except DataplaneError as again:
                raise DataplaneError(f"{exc}; undoing the lines before it failed too: {again}") from None
        raise DataplaneError(str(exc).replace("The set with the given name does not exist",
                                              "No such file or directory: the set does not exist")) from None


def _is_list(name: str) -> bool:
    """An umbrella or an umbrella's temporary: destroyed before the sets it may list."""
    return is_umbrella(PREFIX + name[len(TEMP):] if name.startswith(TEMP) else name)


def _shape(line: str) -> tuple[str, ...]:
    """What of a rule ``iptables -S`` prints back as we wrote it (``_SHAPE_OPTIONS``): its chain,
    interfaces, protocol, sets, ports, comment and target. Enough to see a rule deleted, added,
    moved or pointed at another set or target in our chains."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return (line,)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        count = _SHAPE_OPTIONS.get(tokens[i])
        if count is None:
            i += 1
            continue
        negated = "! " if i > 0 and tokens[i - 1] == "!" else ""
        out.append(negated + " ".join(tokens[i:i + 1 + count]))
        i += 1 + count
    return tuple(out)


def _shapes(lines: Iterable[str]) -> dict[str, list[tuple[str, ...]]]:
    """Our chains' rules (``-A WALLED-GARDEN-...`` lines) by chain, in order, as ``_shape``s."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for line in lines:
        if line.startswith("-A WALLED-GARDEN-"):
            out.setdefault(line.split()[1], []).append(_shape(line))
    return out


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
        #: The instance whose ``reader`` this is: its ``_installed`` is ours too.
        self._origin: IpsetDataplane = self
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
            self._reader._origin = self
        return self._reader

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        ops = tx.operations
        last = max((i for i, op in enumerate(ops) if isinstance(op, ReplaceTable)), default=None)
        if last is None:
            self._diff([op for op in ops if isinstance(op, (AddElements, DeleteElements, DropElements))])
            return
        replace = ops[last]
        assert isinstance(replace, ReplaceTable)
        # ``MarkStructure`` is for nftables: the structure here is known from the render; a
        # ``DropElements`` (an acknowledgement) has nothing to drop from fresh sets
        self._replace(replace.layout, [op for op in ops[last + 1:]
                                       if isinstance(op, (AddElements, AddExpiring, DeleteElements))])

    def generation(self) -> int:
        """Not a generation: ipset has none (module docstring). New on every call, so the
        reconciler never takes the sets as unchanged since it last looked."""
        return next(self._ticks)

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        """The quick check (every few seconds): netlink tests, no listing. It catches a set
        destroyed or flushed (the tag in ``walled-layouttag``, each container's sentinel), an
        umbrella flushed or missing a member (``walled-portal4`` must list ``walled-portal4-32``
        for every prefix length the containers have: the rules match only the umbrellas), and
        with ``rules: own`` our jumps missing or our chains stamped for other rules
        (``_rules_hold``: a few iptables processes, so a firewall reload that rewrote FORWARD is
        repaired within seconds). Not seen here, but at the full check (``read``): single
        elements added or deleted, an umbrella listing a set it should not. A rule deleted or
        changed inside our chains is seen by the same quick check's next step, the structure
        (``structure``, compared with ``expected_structure``). With a digest mark: False,
        always (no generation proves the mark; module docstring)."""
        if mark is not None:
            return False
        containers = list(containers)
        if not self._lookup.holds(set_name(TAG_SET), tag_address(tag)) or self.missing_sentinels(containers):
            return False
        prefixes = {where for where in map(prefix_of, containers) if where is not None}
        for version, plen in prefixes:
            for kind in UMBRELLA_KINDS:
                if not self._lookup.holds_member(umbrella(kind, version), set_name(f"{kind}{version}_{plen}")):
                    return False
        return self.rules != "own" or self._rules_hold(self._expected_stamp(tag, map(set_name, containers)))

    def structure(self, layout: Layout) -> Structure | None:
        """With ``rules: own``, our chains (declared or not, and their rules as ``_shape`` keeps
        them, in order) and our three jumps (each exactly ``-A <built-in> -j <ours>``), both
        families: one ``-save`` per family and table, four processes. With ``rules: external``
        nothing to fingerprint (the rules are the operator's; the sets are checked by
        ``holds_layout``). None when ``walled-layouttag`` lacks this layout's tag."""
        if not self._lookup.holds(set_name(TAG_SET), tag_address(layout.tag)):
            return None
        if self.rules != "own":
            return Structure("")
        listed = {(version, table): _run([self._ipt(version, "save"), "-t", table], timeout=30).splitlines()
                  for version in (4, 6) for table in iptables_rules.CHAINS}
        return _rules_structure(listed)

    def expected_structure(self, layout: Layout) -> str:
        """With ``rules: own``: the fingerprint of our chains as this release renders them for
        ``layout``, every jump in place (``structure`` of an untouched install); else ""."""
        if self.rules != "own":
            return ""
        rendered: dict[tuple[int, str], list[str]] = {}
        for version in (4, 6):
            for table, lines in iptables_rules.chains(layout, version).items():
                rendered[(version, table)] = ([f":{chain} - [0:0]" for chain in iptables_rules.CHAINS[table]] + lines
                                              + [f"-A {builtin} -j {target}"
                                                 for t, builtin, target in iptables_rules.JUMPS if t == table])
        return _rules_structure(rendered).fingerprint

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        return [name for name in containers
                if not self._lookup.holds(set_name(name), sentinel_of(name), _FULL[sentinel_family(name)])]

    def layout_tag(self) -> str | None:
        """The tag in ``walled-layouttag``; with an umbrella not listing exactly its members, or
        with ``rules: own`` and our jumps or stamp not in place, the tag with what is wrong after
        it, so the check that asked reports it and the reconciler repairs."""
        names = [name for name in self._names() if ours(name)]
        lists = [name for name in names if is_umbrella(name)]
        lines = self._save([set_name(TAG_SET), *lists] if set_name(TAG_SET) in names else [])
        state = self._parse([line for line in lines if not _names_a_list(line)])
        tag = state.layout_tag if state is not None else None
        if tag is None:
            return None
        problem = self._umbrella_problem(tag, names, lines)
        if not problem and self.rules == "own" and not self._rules_hold(self._expected_stamp(tag, names)):
            problem = "our iptables jumps or chains missing or not as this release renders them"
        return f"{tag} ({problem})" if problem else tag

    def read(self) -> TableState | None:
        """Every set of ours (one ``ipset save`` batch); None when ``walled-layouttag`` is gone.
        Also the full check of what ``holds_layout`` cannot see: an umbrella that does not list
        exactly the sets it must, and with ``rules: own`` our chains and jumps (jumps, stamp, and
        each chain's rules compared with what this release renders, ``_chains_match``). When
        either is wrong, the tag read back carries what is wrong after it, so it is not the
        reconciler's tag: the reconciler reports it and its next sync replaces everything, rules
        and umbrellas included."""
        names = [n for n in self._names() if ours(n)]
        if set_name(TAG_SET) not in names:
            return None
        lines = self._save(names)
        state = self._parse([line for line in lines if not _names_a_list(line)])
        if state is None or state.layout_tag is None:
            return state
        problem = self._umbrella_problem(state.layout_tag, names, lines)
        if not problem and self.rules == "own":
            layout = self._layout_for(state.layout_tag, names)
            stamp = iptables_rules.stamp(layout) if layout else f"{state.layout_tag} rules "
            if not self._rules_hold(stamp, layout):
                problem = "our iptables jumps or chains missing or not as this release renders them"
        if problem:
            state.layout_tag = f"{state.layout_tag} ({problem})"
        return state

    def _layout_for(self, tag: str, names: Iterable[str]) -> Layout | None:
        """The layout whose tag the sets carry: the one we installed last, or the configuration's
        with the prefix lengths the sets have (a start); None when neither has that tag."""
        prefixes = {(where[1], where[2]) for where in map(per_prefix, names) if where is not None}
        for layout in (self._origin._installed, self.base.with_prefixes(prefixes) if self.base else None):
            if layout is not None and layout.tag == tag:
                return layout
        return None

    def _expected_stamp(self, tag: str | None, names: Iterable[str]) -> str:
        """The stamp (``iptables_rules.stamp``) our chains must carry for the sets' layout tag,
        rendered by this release for ``_layout_for``'s layout. When no layout has the tag, only
        the tag can be checked (the reconciler replaces a layout it does not want anyway)."""
        layout = self._layout_for(tag, names) if tag is not None else None
        return iptables_rules.stamp(layout) if layout is not None else f"{tag} rules "

    def _umbrella_problem(self, tag: str, names: list[str], lines: list[str]) -> str:
        """What is wrong with the umbrellas (``lines``: ``ipset save`` lines including theirs), ""
        when nothing: each must exist and list exactly the per-prefix sets of its kind and family
        for the layout's prefix lengths (those of ``_layout_for``, or when unknown those of the
        per-prefix sets present), no more (someone else's set listed restricts its members)."""
        layout = self._layout_for(tag, names)
        if layout is not None:
            prefixes = set(layout.prefixes)
        else:
            prefixes = {(where[1], where[2]) for where in map(per_prefix, names) if where is not None}
        listed: dict[str, list[str]] = {}
        for line in lines:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("create", "add") and is_umbrella(parts[1]):
                listed.setdefault(parts[1], [])
                if parts[0] == "add" and len(parts) >= 3:
                    listed[parts[1]].append(parts[2])
        problems: list[str] = []
        for version in (4, 6):
            for kind in UMBRELLA_KINDS:
                top = umbrella(kind, version)
                want = {set_name(f"{kind}{version}_{plen}") for v, plen in prefixes if v == version}
                if top not in listed:
                    problems.append(f"umbrella {top} missing")
                    continue
                have = set(listed[top])
                problems += [f"umbrella {top} lacks {name}" for name in sorted(want - have)]
                problems += [f"umbrella {top} lists {name}" for name in sorted(have - want)]
        return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        wanted = [set_name(name) for name in names]
        if not set(wanted) <= set(self._names()):
            return None
        state = self._parse(self._save(wanted), want_tag=False)
        return state

    def read_timeouts(self, names: Iterable[str]) -> Expiring:
        """One ``ipset save`` batch of those of these sets that exist. ipset keeps one time per
        element, what it has left: that is its timeout too."""
        wanted = [name for name in names if carried_set(name)]
        present = set(self._names())
        state = self._parse(self._save([set_name(name) for name in wanted if set_name(name) in present]),
                            want_tag=False)
        return {} if state is None else {name: state.expiring.get(name, {}) for name in wanted
                                         if name in state.elements}

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
            if "timeout" in parts[3:-1] and carried_set(container):
                left = int(parts[parts.index("timeout", 3) + 1])
                if left >= 1:
                    state.expiring.setdefault(container, {})[key_of(container, text)] = (left, left)
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

    def _jump_present(self, version: int, jump: tuple[str, str, str]) -> bool:
        table, builtin, ours_ = jump
        return _succeeds([self._ipt(version), "-w", "5", "-t", table, "-C", builtin, "-j", ours_])

    def _rules_hold(self, stamp: str, layout: Layout | None = None) -> bool:
        """Our jumps are in place and ``WALLED-GARDEN-FWD`` carries ``stamp``, both families. With
        ``layout`` (the full check), also every chain of ours holds the rules this release
        renders for it, in order (``_shape``: one ``-save`` per family and table)."""
        for version in (4, 6):
            if not all(self._jump_present(version, jump) for jump in iptables_rules.JUMPS):
                return False
            if layout is None:
                listing = _spawn([self._ipt(version), "-w", "5", "-S", "WALLED-GARDEN-FWD"], None, 30)
                if listing.returncode != 0 or f"{iptables_rules.TAG_COMMENT}{stamp}" not in listing.stdout:
                    return False
            elif not self._chains_match(layout, version):
                return False
        return True

    def _chains_match(self, layout: Layout, version: int) -> bool:
        """Do our chains of this family hold exactly the rules ``iptables_rules.chains`` renders
        (stamp included), compared by ``_shape``? A chain missing fails the ``-save`` of nothing:
        it shows as no rules."""
        for table, lines in iptables_rules.chains(layout, version).items():
            try:
                listed = _run([self._ipt(version, "save"), "-t", table], timeout=30).splitlines()
            except DataplaneError:
                return False
            if _shapes(listed) != _shapes(lines):
                return False
        return True

    # -- writing -----------------------------------------------------------------------------------
    def _diff(self, ops: list[AddElements | DeleteElements | DropElements]) -> None:
        """One ``ipset restore``, its additions first (module docstring): an addition of an element
        an earlier operation of the same diff deletes keeps its place after that deletion. A
        failed line undoes the lines before it. The drops (``DropElements``: acknowledgements,
        there or not) come last, ``-exist``, not undone, so a failure of any other line leaves
        them in place; one the same diff adds again with a timeout is not dropped (that ``add
        -exist`` sets its new timeout)."""
        first: list[tuple[str, str | None]] = []
        then: list[tuple[str, str | None]] = []
        deleted: set[tuple[str, str]] = set()
        growth: dict[str, int] = {}
        dropped: dict[str, int] = {}
        timed: set[str] = set()
        refreshed: set[tuple[str, str]] = set()
        drops: list[tuple[str, str]] = []
        for op in ops:
            name = set_name(op.container)
            if isinstance(op, AddElements):
                growth[name] = growth.get(name, 0) + len(op.items)
                if op.timeout:
                    timed.add(name)
                for key, _ in op.items:
                    item = element(op.container, key)
                    line: tuple[str, str | None] = (
                        (f"add {name} {item} timeout {op.timeout} -exist", None) if op.timeout
                        else (f"add {name} {item}", f"del {name} {item}"))
                    (then if (name, item) in deleted else first).append(line)
                    if op.timeout:
                        refreshed.add((name, item))
            elif isinstance(op, DropElements):
                timed.add(name)   # how many were there is unknown: the size is read back
                drops += [(name, element(op.container, key)) for key in op.keys]
            else:
                dropped[name] = dropped.get(name, 0) + len(op.keys)
                for key in op.keys:
                    item = element(op.container, key)
                    deleted.add((name, item))
                    then.append((f"del {name} {item}", f"add {name} {item}"))
        for name in timed:
            # An acknowledgement may refresh an element already there (``-exist``), a drop find
            # none: no counting can tell, so the set's size is read back when it is next needed.
            self._sizes.pop(name, None)
        for name, more in growth.items():
            self._make_room(name, more)
        lines = first + then + [(f"del {name} {item} -exist", None) for name, item in drops
                                if (name, item) not in refreshed]
        try:
            _restore([line for line, _ in lines], [back for _, back in lines])
        except DataplaneError:
            self._sizes.clear()
            raise
        for name in growth.keys() | dropped.keys():
            if name in self._sizes and name not in timed:
                count, maxelem = self._sizes[name]
                self._sizes[name] = (count + growth.get(name, 0) - dropped.get(name, 0), maxelem)
            else:
                self._sizes.pop(name, None)

    def _make_room(self, name: str, more: int) -> None:
        """Grow ``name`` (a bigger copy swapped in) when ``more`` elements would pass its maxelem.
        A temporary left by an interrupted growth is destroyed first (its ``create`` would fail
        every time otherwise)."""
        if name not in self._sizes:
            try:
                header = _run(["ipset", "list", "-t", name], timeout=30)
            except DataplaneError:
                return   # a missing set: the restore fails and says so
            size_match = re.search(r"maxelem (\d+)", header)
            entries = re.search(r"Number of entries: (\d+)", header)
            if not (size_match and entries):
                return
            self._sizes[name] = (int(entries.group(1)), int(size_match.group(1)))
        count, maxelem = self._sizes[name]
        if count + more <= maxelem:
            return
        lines = self._save([name])
        create = next((line for line in lines if line.startswith(f"create {name} ")), None)
        if create is None:
            return
        size = capacity(count + more)
        temp = temporary(name)
        if temp in self._names() and self._destroy([temp]):
            raise DataplaneError(f"cannot grow {name}: {temp}, left by an earlier attempt, cannot be destroyed")
        head = re.sub(r"maxelem \d+", f"maxelem {size}", create.replace(f"create {name} ", f"create {temp} ", 1))
        body = [line.replace(f"add {name} ", f"add {temp} ", 1) for line in lines if line.startswith(f"add {name} ")]
        try:
            _run(["ipset", "restore"], "".join(line + "\n" for line in [head, *body, f"swap {temp} {name}"]))
        finally:
            self._destroy([temp])
        self._sizes[name] = (count, size)

    def _replace(self, layout: Layout, ops: list[AddElements | AddExpiring | DeleteElements]) -> None:
        """A full sync: fresh sets filled, the live ones prepared, then swapped in, then our rules
        (module docstring)."""
        wanted, contents = _contents(layout, ops)
        existing = set(self._names())
        # An interrupted sync's temporaries: one that stays makes the fill fail, saying so.
        self._destroy(sorted(name for name in existing if ours_temporary(name)))
        listed, live = self._live(existing, wanted, contents)
        entering = {name: [item for item in contents[name] if item not in keys] for name, keys in live.items()}
        for name, keys in entering.items():
            if keys:   # the live set must hold its keys and the entering ones a moment
                self._make_room(name, len(keys))
        temps = [temporary(name) for name in contents]

        # 1. fill the temporaries: a failure destroys them, nothing else changed.
        fill: list[str] = []
        for name, items in contents.items():
            fill.append(wanted[name].create(temporary(name), len(items)))
            fill += [f"add {temporary(name)} {item}" if timeout is None
                     else f"add {temporary(name)} {item} timeout {timeout}" for item, timeout in items.items()]
        try:
            _run(["ipset", "restore"], "".join(line + "\n" for line in fill))
        except DataplaneError as exc:
            self._destroy(temps)
            raise DataplaneError(f"{exc}{_failed_set(str(exc), fill)}") from None

        # 2. prepare the live sets: entering keys added, new sets renamed in, umbrellas listing both.
        prepare: list[tuple[str, str | None]] = []
        for name, keys in entering.items():
            prepare += [(f"add {name} {item}", f"del {name} {item}") for item in keys]
        prepare += [(f"rename {temporary(name)} {name}", f"rename {name} {temporary(name)}")
                    for name in contents if name not in existing]
        final: dict[str, list[str]] = {}
        for version in (4, 6):
            for kind in UMBRELLA_KINDS:
                top = umbrella(kind, version)
                final[top] = members(layout, kind, version)
                # An umbrella is replaced by a fresh copy (this release's size), never added to.
                target = temporary(top) if top in listed else top
                prepare.append((wanted[top].create(target, 0), f"destroy {target}"))
                prepare += [(f"add {target} {name}", f"del {target} {name}")
                            for name in dict.fromkeys([*final[top], *listed.get(top, [])])]
                if top in listed:
                    prepare.append((f"swap {target} {top}", f"swap {target} {top}"))
        prepare_undo = [back for _, back in prepare]
        try:
            _restore([line for line, _ in prepare], prepare_undo)
        except DataplaneError:
            self._destroy(temps)
            raise

        # 3. swap the filled sets in, then take what the layout no longer has out of the umbrellas.
        switch: list[tuple[str, str | None]] = [(f"swap {temporary(name)} {name}", f"swap {temporary(name)} {name}")
                                                 for name in contents if name in existing]
        for top, keep in final.items():
            switch += [(f"del {top} {name}", f"add {top} {name}")
                       for name in dict.fromkeys(listed.get(top, [])) if name not in keep]
        try:
            _restore([line for line, _ in switch], [back for _, back in switch], prepare_undo)
        except DataplaneError:
            self._destroy(temps)
            raise
        self._sizes = {name: (len(items), wanted[name].max_size or capacity(len(items)))
                       for name, items in contents.items()}
        if self.rules == "own":
            self._install_rules(layout)
        self._installed = layout
        obsolete = sorted(name for name in existing if ours(name) and name not in wanted)
        self._destroy([temporary(top) for top in listed]
                      + [temporary(name) for name in contents if name in existing] + obsolete)

    def _live(self, existing: set[str], wanted: dict[str, SetSpec], contents: dict[str, dict[str, int | None]]
              ) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
        """What a full sync must know of the live sets (one ``ipset save`` batch): each existing
        umbrella's members, and the elements of each live portal, notice and throttle set that
        gets subscribers (its size with them, for ``_make_room``). That listing is the price of
        never leaving a moved subscriber in neither set: ~0.3 s at 100k (docs/benchmarks.md),
        only when such sets exist (not at a cold start)."""
        lists = [umbrella(kind, version) for version in (4, 6) for kind in UMBRELLA_KINDS]
        listed: dict[str, list[str]] = {top: [] for top in lists if top in existing}
        live: dict[str, set[str]] = {name: set() for name, items in contents.items()
                                     if len(items) > len(wanted[name].static) and name in existing
                                     and (per_prefix(name) or ("", 0, 0))[0] in _RESTRICTING}
        maxelem: dict[str, int] = {}
        for line in self._save([*listed, *live]):
            parts = line.split()
            if len(parts) < 3:
                continue
            if parts[0] == "add" and parts[1] in listed:
                listed[parts[1]].append(parts[2])
            elif parts[0] == "add" and parts[1] in live:
                live[parts[1]].add(_as_written(parts[2]))
            elif parts[0] == "create" and parts[1] in live and "maxelem" in parts:
                maxelem[parts[1]] = int(parts[parts.index("maxelem") + 1])
        for name, keys in live.items():
            if name in maxelem:
                self._sizes[name] = (len(keys), maxelem[name])
            else:
                self._sizes.pop(name, None)
        return listed, live

    def _install_rules(self, layout: Layout) -> None:
        for version in (4, 6):
            missing = {jump for jump in iptables_rules.JUMPS if not self._jump_present(version, jump)}
            _run([self._ipt(version, "restore"), "--noflush", "-w", "5"],
                 iptables_rules.restore_text(layout, version, missing))

    def _destroy(self, names: list[str]) -> list[str]:
        """Destroy these sets (umbrellas first: their members cannot go while listed), each on its
        own; returns those that stayed (``_destroy_or_empty``: emptied when they could be)."""
        left = self._destroy_or_empty(names)
        return [*left.emptied, *left.not_emptied]

    def _destroy_or_empty(self, names: list[str]) -> SetsLeft:
        """Destroy these sets; a set that cannot go is emptied instead, so nothing stays restricted by it.

        A set of ours that an iptables rule not ours still names cannot be destroyed: an obsolete
        per-prefix set a ``rules: external`` line names, or every set a switch to nftables leaves
        behind while the operator's lines still name them (docs/ipset.md asks for those lines to
        go first). Left as it was, it would keep walling whoever it held, a customer who paid
        since included, with nothing of ours ever writing it again. So what the tool refused is
        flushed (``ipset flush``: an empty set matches nobody), and destroyed again: a member that
        stayed only because an emptied umbrella listed it goes now. Each set on its own: one that
        cannot go is logged (``event=ipset_destroy_failed``, ``emptied=yes|no``), the rest go all
        the same. A tool that fails as a whole (missing, hung) is logged and nothing more tried."""
        refused, broken = self._each("destroy", sorted(dict.fromkeys(names), key=lambda name: not _is_list(name)))
        if broken is not None:
            log.warning("event=ipset_destroy_failed sets=%s error=%r", " ".join(refused), broken)
            return SetsLeft((), tuple(refused))
        if not refused:
            return SetsLeft((), ())
        not_emptied, broken = self._each("flush", list(refused))
        stayed, _ = self._each("destroy", list(refused))
        emptied: list[str] = []
        for name in stayed:
            empty = name not in not_emptied and broken is None
            log.warning("event=ipset_destroy_failed set=%s emptied=%s error=%r", name, "yes" if empty else "no",
                        stayed[name])
            if empty:
                emptied.append(name)
        return SetsLeft(tuple(emptied), tuple(name for name in stayed if name not in emptied))

    def _each(self, verb: str, names: list[str]) -> tuple[dict[str, str], str | None]:
        """``verb`` (``destroy``, ``flush``) each of ``names``, in that order, in one ``ipset restore``
        when all succeed; a line that fails is passed over (a set that does not exist: as done).
        What failed, by name with the tool's message; and the error when the tool failed as a
        whole (then every name not done yet is in the first)."""
        failed: dict[str, str] = {}
        pending = list(names)
        for _ in range(len(pending) + 1):   # each failure takes one name off: bounded
            if not pending:
                break
            try:
                _run(["ipset", "restore"], "".join(f"{verb} {name}\n" for name in pending), timeout=60)
                break
            except DataplaneError as exc:
                match = _LINE.search(str(exc))
                if match is None:
                    failed.update(dict.fromkeys(pending, str(exc)))
                    return failed, str(exc)
                line = int(match.group(1)) - 1
                if "does not exist" not in str(exc):   # already gone: nothing to say
                    failed[pending[line]] = str(exc)
                pending = pending[line + 1:]
        return failed, None

    # -- taking it all away (tests, ``walled-garden`` uninstall docs) -----------------------------
    def remove_everything(self) -> SetsLeft:
        """Our jumps, chains and sets gone (the equivalent of ``nft delete table``); best effort:
        what cannot be removed is logged. The sets that stayed (``_destroy_or_empty``: a rule not
        ours names them) are returned, emptied when they could be."""
        for version in (4, 6):
            for table, builtin, ours_ in iptables_rules.JUMPS:
                for _ in range(10):   # each jump was inserted once; bounded all the same
                    if not _quietly([self._ipt(version), "-w", "5", "-t", table, "-D", builtin, "-j", ours_]):
                        break
            for table, chains in iptables_rules.CHAINS.items():
                for verb in ("-F", "-X"):
                    for chain in chains:
                        _quietly([self._ipt(version), "-w", "5", "-t", table, verb, chain])
        try:
            names = [n for n in self._names() if ours(n) or ours_temporary(n)]
        except DataplaneError as exc:
            log.warning("event=ipset_remove_failed error=%r", str(exc))
            names = []
        left = self._destroy_or_empty(names)
        self._sizes.clear()
        return left


@dataclass(frozen=True)
class SetsLeft:
    """Sets of ours that could not be destroyed (an iptables rule not ours names them): ``emptied``
    restrict nobody any more; ``not_emptied`` (the flush failed too) may still restrict whoever they hold."""

    emptied: tuple[str, ...]
    not_emptied: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.emptied or self.not_emptied)


def _rules_structure(listed: dict[tuple[int, str], list[str]]) -> Structure:
    """``IpsetDataplane.structure`` of ``-save`` lines by (family, table): per family, each chain
    of ours (absent, or its rules' ``_shape``s in order) and each jump (present or missing)."""
    parts: dict[str, str] = {}
    rules: dict[str, int] = {}
    for (version, table), lines in listed.items():
        shapes = _shapes(lines)
        declared = {line.split()[0][1:] for line in lines if line.startswith(":")}
        for chain in iptables_rules.CHAINS[table]:
            label = f"{chain} ipv{version}"
            found = shapes.get(chain, [])
            parts[f"chain {label}"] = repr(found) if chain in declared else "absent"
            rules[label] = len(found)
        for t, builtin, target in iptables_rules.JUMPS:
            if t == table:
                present = f"-A {builtin} -j {target}" in lines
                parts[f"jump {builtin}->{target} ipv{version}"] = "present" if present else "missing"
    return Structure(fingerprint(parts), parts, rules)


def _quietly(argv: list[str]) -> bool:
    """A clean-up step that may find nothing to do (a chain already gone): its success, never an
    exception."""
    try:
        return _succeeds(argv)
    except DataplaneError as exc:
        log.warning("event=iptables_cleanup_failed error=%r", str(exc))
        return False


def _as_written(text: str) -> str:
    """An element as ``element`` writes it (Python's spelling). ``ipset save`` prints IPv6 with
    ``inet_ntop``, which spells an IPv4-mapped address with dots (``::ffff:1.2.3.4``) where Python
    does not: such an element would look absent, and adding it again would fail the full sync."""
    if "." not in text or ":" not in text:
        return text
    try:
        return str(ipaddress.ip_network(text, strict=False)) if "/" in text else str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _names_a_list(line: str) -> bool:
    """Is this ``ipset save`` line about an umbrella (its ``create`` or a member)?"""
    parts = line.split(maxsplit=2)
    return len(parts) >= 2 and is_umbrella(parts[1])


def _failed_set(message: str, lines: list[str]) -> str:
    """`` (adding to set NAME)`` when the line of ``lines`` that ``ipset restore`` failed at
    (``Error in line N``) adds to our set ``NAME`` (a reconciler container, or its temporary):
    ``ipset`` gives only the number, and ``reconciler.carry_refused`` retries a replace without
    the elements it carried only when the refused element can be theirs. Else ``""``."""
    match = _LINE.search(message)
    number = int(match.group(1)) if match else 0
    parts = lines[number - 1].split() if 0 < number <= len(lines) else []
    if len(parts) < 3 or parts[0] != "add":
        return ""
    name = PREFIX + parts[1][len(TEMP):] if parts[1].startswith(TEMP) else parts[1]
    container = container_of(name)
    return f" (adding to set {container})" if container else ""


def _contents(layout: Layout, ops: list[AddElements | AddExpiring | DeleteElements]
              ) -> tuple[dict[str, SetSpec], dict[str, dict[str, int | None]]]:
    """The layout's sets and what each holds once ``ops`` are applied to a fresh layout: element
    → timeout (None: none; a carried element's, ``AddExpiring``, is the time it has left).
    Fails as the kernel would (a set not in the layout, a missing element)."""
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
        elif isinstance(op, AddExpiring):
            if wanted[name].timeout is None:
                raise DataplaneError(f"Operation not supported: {name} has no timeout (adding to set {op.container})")
            contents[name].update({element(op.container, k): left for k, _, left in op.items})
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
    wanted, contents = _contents(layout, [op for op in tx.operations[last + 1:]
                                          if isinstance(op, (AddElements, DeleteElements))])
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


def available(rules: str = "own", iptables: str = "auto") -> str:
    """Why the ipset backend cannot run here ("" when it can): the tools it spawns for this
    configuration (with ``rules: own``, the variant's iptables, ip6tables and their -save and
    -restore; ``auto`` asks ``iptables -V`` which variant that is)."""
    tools = ["ipset"]
    if rules == "own":
        if iptables == "auto":
            tools.append("iptables")
        variant = iptables_variant(iptables) if iptables != "auto" or shutil.which("iptables") else "nft"
        tools += [f"{base}-{variant}{tool}" for base in ("iptables", "ip6tables") for tool in ("", "-save", "-restore")]
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian packages ipset, iptables)"
    return ""
