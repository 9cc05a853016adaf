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
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from .config import Config

log = logging.getLogger("walled_garden.enforcer")
#: Every chain of ours is named so (``iptables_rules.CHAINS``).
CHAIN_MARK = ":WALLED-GARDEN-"


def remove_other_backend(config: Config) -> list[str]:
    """Remove what the backend not configured left in the kernel; what was removed, for the log.
    Runs the tools as subprocesses (call it from a thread); never raises for a tool that is
    missing (then nothing of that backend can be there) or fails (logged)."""
    if config.gateway.backend == "ipset":
        return _remove_nftables_table(config.gateway.table)
    return _remove_ipset_objects(config.gateway.table)


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


def _remove_ipset_objects(table: str) -> list[str]:
    """One ``ipset list -n`` and one ``iptables-save`` per family and variant (the daemon's
    start pays for it when the ipset tools are installed: a few ms each)."""
    from .dataplane.ipset import IpsetDataplane
    from .dataplane.ipset_sets import ours, ours_temporary

    if shutil.which("ipset") is None:
        return []
    listed = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=60)
    sets = [n for n in listed.stdout.split() if ours(n) or ours_temporary(n)] if listed.returncode == 0 else []
    removed: list[str] = []
    for variant in ("nft", "legacy"):
        saves = [tool for tool in (f"iptables-{variant}-save", f"ip6tables-{variant}-save") if shutil.which(tool)]
        if not saves:
            continue
        chained = any(CHAIN_MARK in subprocess.run([save], capture_output=True, text=True, timeout=60).stdout
                      for save in saves)
        if chained or sets:
            IpsetDataplane(table, "own", variant).remove_everything()
            removed.append(f"iptables-{variant} chains and ipsets {sets}" if chained else f"ipsets {sets}")
            sets = []
    if removed:
        log.warning("event=other_backend_removed backend=ipset removed=%s why=gateway.backend_is_nftables",
                    "; ".join(removed))
    return removed
