"""Small helpers shared by the kernel tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from enforcer.demo.topology import Topology

SUB1 = "C-1001"


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
