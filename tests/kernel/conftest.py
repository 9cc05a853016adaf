"""Kernel tests: real namespaces, real nftables, real traffic.

They need root, nft, conntrack and curl. Outside CI a machine without them skips these
tests; with CI set, a missing capability is an error, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import SUB1

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology


def _missing() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [tool for tool in ("nft", "conntrack", "curl", "ip") if shutil.which(tool) is None]
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing()
    for item in items:
        if "tests/kernel/" not in str(item.fspath).replace(os.sep, "/"):
            continue
        item.add_marker(pytest.mark.kernel)
        if missing:
            if os.environ.get("CI"):
                raise pytest.UsageError(f"kernel tests cannot run, missing: {', '.join(missing)} (CI refuses to skip)")
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(subscribers=2) as topology:
        topology.serve_http(topology.upstream, "UPSTREAM OK", ports=(80, 443, 8000))
        topology.serve_http(topology.garden, "GARDEN OK", ports=(80, 443))
        yield topology


@pytest.fixture
def lab(topo: Topology, tmp_path: Path) -> Iterator[Lab]:
    """Subscriber 1 restricted (IPv4 address and its IPv6 /64), subscriber 2 free."""
    entries = [{"id": SUB1, "addresses": [topo.subscribers[0].addr4, "2001:db8:100:1::/64"], "reason": "overdue"}]
    gateway = Lab(topo, tmp_path, entries)
    gateway.start_daemon()
    gateway.start_portal()
    try:
        yield gateway
    finally:
        gateway.stop_daemon()
        (tmp_path / "daemon.log").exists() and print(gateway.log())
