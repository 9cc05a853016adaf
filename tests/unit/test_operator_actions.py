"""Operator actions over the real control socket: attribution, guard, approve/reject, CLI output."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import NoConntrack, cli
from enforcer.api.control import control_app
from enforcer.api.listeners import start_unix_site
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.sources import ListUpdate
from enforcer.subscribers import Subscriber, parse_address


def _subs(n: int, start: int = 1) -> list[Subscriber]:
    return [Subscriber(f"C-{i}", (parse_address(f"100.64.{i // 250}.{i % 250 + 1}"),), reason="overdue")
            for i in range(start, start + n)]


@pytest.fixture
async def daemon(tmp_path: Path) -> Any:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                           f"api: {{socket: {tmp_path}/control.sock}}\n")
    config = parse_config(config_path.read_text(), str(config_path))
    fake = FakeDataplane()
    enforcer = Enforcer(config, dataplane=fake, conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    runner = await start_unix_site(control_app(enforcer), config.api.socket)
    yield enforcer, fake, config_path
    await runner.cleanup()
    await enforcer.close()


async def test_mass_restriction_is_held_until_approved(daemon: Any) -> None:
    enforcer, _fake, config = daemon
    await enforcer.lists.on_list(ListUpdate(_subs(20), "l.yaml", "1"))          # small: applied
    assert sum(enforcer.engine.record.mode_counts.values()) == 20
    await enforcer.lists.on_list(ListUpdate(_subs(520), "l.yaml", "2"))         # a broken export: +500
    assert sum(enforcer.engine.record.mode_counts.values()) == 20, "a held list changes nothing"
    code, out = await cli("status", "--config", str(config))
    assert code == 0 and "HELD" in out and "restrict 500" in out
    assert enforcer.metrics.held_changes._value.get() == 1
    code, out = await cli("approve", "--config", str(config), "--reason", "checked with billing", "--json")
    assert code == 0 and json.loads(out)["restricting"] == 500
    assert sum(enforcer.engine.record.mode_counts.values()) == 520
    assert enforcer.queries.status()["held_changes"] == []


async def test_mass_lift_is_held_and_can_be_rejected(daemon: Any) -> None:
    enforcer, _, config = daemon
    await enforcer.lists.on_list(ListUpdate(_subs(400), "l.yaml", "1"), approved_by="test")
    await enforcer.lists.on_list(ListUpdate([], "l.yaml", "2"))                  # an empty export lifts all
    assert enforcer.queries.status()["held_changes"][0]["lifting"] == 400
    code, out = await cli("reject", "--config", str(config), "--reason", "export bug")
    assert code == 0 and "rejected" in out
    assert sum(enforcer.engine.record.mode_counts.values()) == 400
    code, _ = await cli("approve", "--config", str(config))
    assert code == 1, "nothing is held any more"


async def test_operator_restrict_and_lift_are_attributed_to_the_unix_user(daemon: Any, caplog: Any) -> None:
    enforcer, fake, config = daemon
    await enforcer.lists.on_list(ListUpdate(_subs(1), "l.yaml", "1"))
    code, out = await cli("lift", "C-1", "--config", str(config), "--reason", "hospital stay")
    assert code == 0 and "now free" in out
    user = getpass.getuser()
    explained = enforcer.queries.explain("C-1")
    assert explained["why"].startswith(f"operator {user} (uid ") and "hospital stay" in explained["why"]
    assert "100.64.0.2" not in fake.view["mode4_32"]
    code, out = await cli("restrict", "C-9", "--config", str(config), "--address", "100.64.7.7", "--mode", "notice")
    assert code == 0 and "now notice" in out
    assert fake.view["mode4_32"]["100.64.7.7"] == "goto notice"
    code, _ = await cli("restrict", "C-404", "--config", str(config))
    assert code == 1, "an unknown subscriber without --address is refused"
    code, out = await cli("explain", "C-9", "--config", str(config))
    assert "RESTRICTED (notice)" in out and f"operator {user}" in out
