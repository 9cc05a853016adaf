"""Run a benchmark script inside a network namespace of its own, removed afterwards.

The benchmarks load nftables tables and bind ports; in a private namespace they can touch
neither the machine's ruleset nor its services, and two runs cannot collide.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

ENV = "WG_BENCH_NETNS"


def reexec_in_private_netns(script: str) -> int | None:
    """In the parent: run ``script`` again inside a fresh namespace and return its exit code.

    In the child (already inside), return None so the caller goes on with the benchmark.
    """
    if os.environ.get(ENV):
        return None
    if os.geteuid() != 0:
        print("run as root (it creates a private network namespace)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the namespace is removed on timeout
    name = f"wgbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, script, *sys.argv[1:]],
                              env={**os.environ, ENV: name}).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name])
