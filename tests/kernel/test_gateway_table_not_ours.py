"""Start-up refusals on a real kernel (SPEC 7: own exactly one table, never touch another).

* ``gateway.table: filter`` with the operator's ``inet filter`` in the kernel: ``run`` exits 1
  with one line and the operator's table, rules and all, is exactly as before.
* A table of ours, from the previous run or from a release made before ``layouttag`` existed,
  is ours: the daemon starts and makes it today's.
* A second ``run`` on the same state directory exits 1 naming the first one's pid; the first
  one's table and control socket are untouched.

Each test builds its own topology (namespaces with a random tag, documentation addresses only)
and tears it down, daemons included, whatever happens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kernel_helpers import SUB1

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

#: Bound of every wait for a refusing daemon to exit (seconds).
EXIT_TIMEOUT = 20.0
OPERATORS_TABLE = """
table inet filter {
    set admins { type ipv4_addr; elements = { 192.0.2.7 } }
    chain input {
        type filter hook input priority filter; policy accept;
        ip saddr @admins tcp dport 22 counter accept
    }
}
"""
#: A table as the first releases made it: the table's comment and the ``layout`` chain, no ``layouttag``.
EARLY_TABLE = """
table inet {table} {{
    comment "managed by walled-garden; do not edit: changes are overwritten"
    set portal4_32 {{ type ipv4_addr; }}
    chain layout {{
        counter comment "walled-garden layout 00000000000000aa"
    }}
}}
"""


@pytest.fixture
def small_topo() -> Iterator[Topology]:
    with Topology(subscribers=1) as topology:
        yield topology


@pytest.fixture
def gateway(small_topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """A configured gateway, not started; every daemon it starts is stopped at the end."""
    entries = [{"id": SUB1, "addresses": [small_topo.subscribers[0].addr4], "reason": "overdue"}]
    lab = Lab(small_topo, tmp_path, entries)
    try:
        yield lab
    finally:
        lab.stop_daemon(kill=True)


def nft(topo: Topology, *argv: str) -> str:
    return topo.run(topo.gateway.netns, "nft", *argv, check=True).stdout


def load(topo: Topology, text: str) -> None:
    done = topo.run(topo.gateway.netns, "sh", "-c", f"nft -f - <<'EOF'\n{text}\nEOF\n")
    assert done.returncode == 0, done.stderr


def refused(lab: Lab, log: str) -> str:
    """Start ``run`` on the lab's config, expect exit 1 within the bound; what it said."""
    proc = lab._start("run", log)
    try:
        code = proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(EXIT_TIMEOUT)
        raise AssertionError(f"run did not refuse within {EXIT_TIMEOUT}s:\n{lab.log(log)}") from None
    assert code == 1, lab.log(log)
    return lab.log(log)


def test_someone_elses_table_refuses_the_start_and_keeps_every_rule(small_topo: Topology, gateway: Lab) -> None:
    load(small_topo, OPERATORS_TABLE)
    before = nft(small_topo, "list", "ruleset")
    assert "ip saddr @admins tcp dport 22" in before
    gateway.config["gateway"]["table"] = gateway.table = "filter"
    gateway.config_path.write_text(yaml.safe_dump(gateway.config, sort_keys=False))

    said = refused(gateway, "daemon.log")
    assert said.strip() == ("gateway.table: table inet filter exists and is not walled-garden's (its first sync would "
                            "replace it, wiping its rules); set gateway.table to a table of our own (default "
                            "walled_garden)"), said
    assert nft(small_topo, "list", "ruleset") == before   # the operator's table, rules and set, as it was
    state = Path(gateway.config["state_dir"])
    assert sorted(p.name for p in state.iterdir()) == ["lock"]   # nothing of the state opened
    assert not Path(gateway.socket).exists()


def test_a_table_of_ours_from_an_earlier_release_or_run_is_taken(small_topo: Topology, gateway: Lab) -> None:
    load(small_topo, EARLY_TABLE.format(table=gateway.table))
    gateway.start_daemon()
    assert gateway.lookup(small_topo.subscribers[0].addr4)["restricted"]
    assert "layouttag" in nft(small_topo, "list", "sets", "table", "inet", gateway.table)   # today's layout now
    gateway.stop_daemon()
    gateway.start_daemon()   # the table the previous run left
    assert gateway.lookup(small_topo.subscribers[0].addr4)["restricted"]


def test_a_second_run_on_the_same_state_leaves_the_first_and_its_table_alone(small_topo: Topology,
                                                                            gateway: Lab) -> None:
    gateway.start_daemon()
    assert gateway.daemon is not None
    table = nft(small_topo, "list", "table", "inet", gateway.table)
    socket_inode = Path(gateway.socket).stat().st_ino

    said = refused(gateway, "second.log")
    state = gateway.config["state_dir"]
    assert said.strip() == f"another walled-garden run (pid {gateway.daemon.pid}) holds {state}; stop it first"
    assert nft(small_topo, "list", "table", "inet", gateway.table) == table
    assert Path(gateway.socket).stat().st_ino == socket_inode
    assert gateway.status() is not None and gateway.daemon.poll() is None
