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
#: How long the inner script gets to clean up after a SIGTERM/SIGINT before it is killed.
CLEANUP_SECONDS = 30.0


def reexec_in_private_netns(script: str) -> int | None:
    """In the parent: run ``script`` again inside a fresh namespace and return its exit code.

    In the child (already inside), return None so the caller goes on with the benchmark.
    """
    if os.environ.get(ENV):
        return None
    if os.geteuid() != 0:
        print("run as root (it creates a private network namespace)", file=sys.stderr)
        return 1
    name = f"wgbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        """Pass SIGTERM/SIGINT on, so the benchmark runs its own cleanup (its processes, tables)."""
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    # A timeout's SIGTERM or a Ctrl-C reaches the inner script, which cleans up and exits; the
    # namespace is removed after it (a SIGKILL of this wrapper cannot be caught: `ip netns list`).
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        child = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, script, *sys.argv[1:]],
                                 env={**os.environ, ENV: name})
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:   # only if the handler was not installed yet
                forward(signal.SIGINT, None)
    finally:
        if child is not None and child.poll() is None:
            try:
                child.wait(CLEANUP_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        subprocess.run(["ip", "netns", "del", name])
