"""After a switch of ``gateway.backend``: the other backend's objects go, once ours are in place.

The two backends keep restrictions in different kernel objects (the nftables table
``inet <gateway.table>``; the ipsets and ``WALLED-GARDEN-*`` chains of docs/ipset.md). Switching
is a restart; the new backend builds its own from the saved state, and the old objects would
stay behind, still restricting whoever they held when the daemon stopped. A payment then lifts
the subscriber in the new objects only, and the old ones keep them walled: the one thing the
product must never do. So the daemon removes the other backend's objects itself, right after
its first sync put every current restriction in place with the backend now configured (no
moment without enforcement, no moment with a paid customer held by stale objects beyond the
start). Only our own objects are touched: the table named ``gateway.table``, the ipsets with
our prefix, our chains and the three jumps to them.

One thing may stop it: an ipset an iptables rule not ours still names (the operator's lines of
``gateway.ipset.rules: external``, which docs/ipset.md asks to delete before the switch) cannot
be destroyed. Such a set is emptied instead (``IpsetDataplane.remove_everything``), so the stale
rule walls nobody, logged (``event=other_backend_left``) and shown in ``status`` under
``backend_switch`` (``BackendSwitch.status``) until a later start destroys it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from .config import Config

log = logging.getLogger("walled_garden.enforcer")
#: Every chain of ours is named so (``iptables_rules.CHAINS``).
CHAIN_MARK = ":WALLED-GARDEN-"


@dataclass(frozen=True)
class Outcome:
    """What a switch's clean-up did: what it removed, and the ipsets of ours it could not destroy
    (a rule not ours names them): ``emptied`` wall nobody; ``not_emptied`` may still."""

    removed: tuple[str, ...] = ()
    emptied: tuple[str, ...] = ()
    not_emptied: tuple[str, ...] = ()


class BackendSwitch:
    """The clean-up, run once after the start (``run``, in a thread), and its ``status`` section."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: None until ``run`` finished; then what it did and when (replaced at once: read by ``status``
        #: on the event loop while ``run`` writes it from its thread).
        self._done: tuple[float, Outcome] | None = None

    def run(self) -> list[str]:
        """Remove what the backend not configured left in the kernel; what was removed and what
        stayed, for the log. Runs the tools as subprocesses (call it from a thread); never raises
        for a tool that is missing (then nothing of that backend can be there) or fails (logged)."""
        gateway = self.config.gateway
        if gateway.backend == "ipset":
            outcome = Outcome(tuple(_remove_nftables_table(gateway.table)))
        else:
            outcome = _remove_ipset_objects(gateway.table)
        self._done = (time.time(), outcome)
        said = list(outcome.removed)
        if outcome.emptied:
            said.append(f"ipsets {list(outcome.emptied)} emptied, not destroyed: a rule not ours names them")
        if outcome.not_emptied:
            said.append(f"ipsets {list(outcome.not_emptied)} NOT removed nor emptied: a rule not ours names them")
        return said

    def status(self) -> dict[str, Any]:
        """``status``'s ``backend_switch``: whether the clean-up ran, what it removed, and the sets of
        ours it had to leave because a rule not ours names them (empty: nothing to do)."""
        done = self._done
        if done is None:
            return {"done": False}
        at, outcome = done
        return {"done": True, "at": at, "removed": list(outcome.removed),
                "sets_left_emptied": list(outcome.emptied), "sets_left_not_emptied": list(outcome.not_emptied)}


def remove_other_backend(config: Config) -> list[str]:
    """``BackendSwitch(config).run()``, for a caller that needs no ``status`` section."""
    return BackendSwitch(config).run()


def _remove_nftables_table(table: str) -> list[str]:
    if shutil.which("nft") is None:
        return []
    if subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, timeout=60).returncode != 0:
        return []
    from .dataplane.backend import DataplaneError
    from .dataplane.kernel import Ownership, table_owner
    try:
        owner = table_owner(table)
    except DataplaneError as exc:
        log.error("event=other_backend_not_removed backend=nftables table=%s error=%s", table, exc)
        return []
    if owner is not Ownership.OURS:   # the start refuses a foreign one; never delete someone's table
        log.warning("event=other_backend_not_removed backend=nftables table=%s why=not_ours owner=%s",
                    table, owner.value)
        return []
    done = subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        log.error("event=other_backend_not_removed backend=nftables table=%s error=%s", table, done.stderr.strip())
        return []
    log.warning("event=other_backend_removed backend=nftables table=%s why=gateway.backend_is_ipset", table)
    return [f"nftables table inet {table}"]


def _remove_ipset_objects(table: str) -> Outcome:
    """One ``ipset list -n`` and one ``iptables-save`` per family and variant (the daemon's
    start pays for it when the ipset tools are installed: a few ms each)."""
    from .dataplane.ipset import IpsetDataplane
    from .dataplane.ipset_sets import ours, ours_temporary

    if shutil.which("ipset") is None:
        return Outcome()
    listed = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=60)
    sets = [n for n in listed.stdout.split() if ours(n) or ours_temporary(n)] if listed.returncode == 0 else []
    removed: list[str] = []
    emptied: dict[str, None] = {}
    not_emptied: dict[str, None] = {}
    for variant in ("nft", "legacy"):
        saves = [tool for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save") if shutil.which(tool)]
        if not saves:
            continue
        chained = any(CHAIN_MARK in subprocess.run([save], capture_output=True, text=True, timeout=60).stdout
                      for save in saves)
        if chained or sets:
            left = IpsetDataplane(table, "own", variant).remove_everything()
            gone = [name for name in sets if name not in left.emptied and name not in left.not_emptied]
            removed.append(f"iptables-{variant} chains and ipsets {gone}" if chained else f"ipsets {gone}")
            emptied = dict.fromkeys(left.emptied)        # the last attempt's word
            not_emptied = dict.fromkeys(left.not_emptied)
            sets = []
    if removed:
        log.warning("event=other_backend_removed backend=ipset removed=%s why=gateway.backend_is_nftables",
                    "; ".join(removed))
    if emptied or not_emptied:
        log.error("event=other_backend_left backend=ipset emptied=%s not_emptied=%s why=named_by_a_rule_not_ours "
                  "action=delete_those_iptables_lines_then_restart see=docs/ipset.md#switching",
                  ",".join(emptied) or "-", ",".join(not_emptied) or "-")
    return Outcome(tuple(removed), tuple(emptied), tuple(not_emptied))
