"""Small helpers shared by the kernel tests."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator

from enforcer.demo.topology import Topology

SUB1 = "C-1001"


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A bare network namespace of the test's own (a unique name; only ``lo``, so no route out),
    deleted with whatever the test put in it (tables, sets) however the test ends."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def python_in(topo: Topology, netns: str, code: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a short Python snippet inside a namespace."""
    return topo.run(netns, sys.executable, "-c", textwrap.dedent(code), timeout=timeout)


def tcp_connect(topo: Topology, netns: str, host: str, port: int) -> tuple[str, float]:
    """Try one TCP connect from a namespace: ("connected" | errno name, seconds)."""
    code = f"""
        import errno, socket, time
        family = socket.AF_INET6 if ":" in {host!r} else socket.AF_INET
        s = socket.socket(family); s.settimeout(3)
        start = time.monotonic()
        try:
            # getaddrinfo keeps a link-local address's %scope (a literal: no resolver asked)
            s.connect(socket.getaddrinfo({host!r}, {port}, family, socket.SOCK_STREAM)[0][4]); result = "connected"
        except socket.timeout: result = "timeout"
        except OSError as exc: result = errno.errorcode.get(exc.errno, str(exc))
        print(result, time.monotonic() - start)
    """
    out = python_in(topo, netns, code).stdout.split()
    return out[0], float(out[1])
