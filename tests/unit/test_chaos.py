"""The model-based chaos test over the fake dataplane (issue 11; SPEC §8): see ``chaos_model``.

Deterministic in CI (``derandomize``) and bounded (< 60 s); ``WG_CHAOS_EXAMPLES=2000`` runs
longer by hand, e.g. ``WG_CHAOS_EXAMPLES=2000 pytest tests/unit/test_chaos.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings

from enforcer.dataplane.fake import FakeDataplane
from enforcer.dataplane.state import TableState

from chaos_model import ChaosMachine, machine_settings


class FakeBackend:
    """The fake kernel: a reboot is a fresh one, another tool's ``nft delete table`` is ``drop_table``."""

    def make(self) -> FakeDataplane:
        return FakeDataplane()

    def read(self, dataplane: FakeDataplane) -> TableState | None:
        return dataplane.read()

    def drop_table(self, dataplane: FakeDataplane) -> None:
        dataplane.drop_table()

    def fail_next(self, dataplane: FakeDataplane, message: str) -> None:
        dataplane.fail_next = message


class FakeChaos(ChaosMachine):
    backend = FakeBackend()

    @staticmethod
    def tmp_factory() -> Path:
        return Path(tempfile.mkdtemp(prefix="wg-chaos-"))


FakeChaos.TestCase.settings = settings(
    max_examples=machine_settings()["max_examples"] or 60, stateful_step_count=30, deadline=None,
    derandomize=True, database=None, suppress_health_check=list(HealthCheck), print_blob=True,
    phases=[p for p in Phase if machine_settings()["shrink"] or p is not Phase.shrink])
test_chaos_on_the_fake_dataplane: Any = FakeChaos.TestCase
