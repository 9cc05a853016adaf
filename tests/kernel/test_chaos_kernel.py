"""The chaos test (``chaos_model``) on the real kernel: nftables in a private network namespace.

A shorter run than the unit test's (bounded: < 60 s): the same random steps and invariants,
but the table is a real ``inet`` table loaded through libnftables, another tool's deletion is
``nft delete table``, a reboot is the table gone, and a failed transaction is one the kernel
was never sent. The test re-runs itself under ``ip netns exec`` in a namespace of its own, so
the machine's ruleset is never touched; the namespace is removed even on failure.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from chaos_model import ChaosMachine, machine_settings
from enforcer.dataplane.backend import DataplaneError
from enforcer.dataplane.kernel import KernelDataplane
from enforcer.dataplane.state import TableState
from enforcer.dataplane.transaction import Transaction

ENV = "WG_CHAOS_NETNS"
TABLE = "walled_garden"   # the config's default; alone in its namespace


class FailingKernel(KernelDataplane):
    """The kernel dataplane with one injectable failure: the next transaction is not sent."""

    fail: str | None = None

    def apply(self, tx: Transaction) -> None:
        if self.fail:
            message, self.fail = self.fail, None
            raise DataplaneError(message)
        super().apply(tx)


def nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, timeout=10)


class KernelBackend:
    def make(self) -> FailingKernel:
        """A boot: whatever an earlier run left is gone."""
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, timeout=10)
        return FailingKernel(TABLE)

    def read(self, dataplane: FailingKernel) -> TableState | None:
        return dataplane.read()

    def drop_table(self, dataplane: FailingKernel) -> None:
        nft("delete", "table", "inet", TABLE)

    def fail_next(self, dataplane: FailingKernel, message: str) -> None:
        dataplane.fail = message


class KernelChaos(ChaosMachine):
    backend = KernelBackend()

    @staticmethod
    def tmp_factory() -> Path:
        return Path(tempfile.mkdtemp(prefix="wg-chaos-kernel-"))


KernelChaos.TestCase.settings = settings(
    max_examples=machine_settings()["max_examples"] or 12, stateful_step_count=20, deadline=None,
    derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=True,
    phases=[p for p in Phase if machine_settings()["shrink"] or p is not Phase.shrink])


if os.environ.get(ENV):   # defined (so collected) only inside the namespace test_chaos_on_the_kernel makes
    class TestInsideTheNamespace(KernelChaos.TestCase):  # type: ignore[name-defined,misc]
        pass


def test_chaos_on_the_kernel() -> None:
    """Run ``TestInsideTheNamespace`` in a fresh network namespace and require it to pass."""
    if os.environ.get(ENV):
        pytest.skip("already inside the namespace")
    name = f"wgchaos{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        run = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", "pytest", "-q",
                              "-p", "no:cacheprovider", "-p", "no:logging", f"{__file__}::TestInsideTheNamespace"],
                             env={**os.environ, ENV: name}, capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[2])
        tail: Any = "\n".join((run.stdout + run.stderr).splitlines()[-80:])
        assert run.returncode == 0, tail
        assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], tail
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)
