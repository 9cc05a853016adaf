"""The control API the portal and the CLI use: lookup, acknowledge, explain, reference codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon_helpers import NoConntrack
from enforcer.api.control import control_app
from enforcer.api.listeners import start_unix_site
from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.sources import ListUpdate
from enforcer.subscribers import parse_list

LIST = """subscribers:
  - {id: C-1, addresses: [100.64.0.10, '2001:db8:10:100::/56'], reason: overdue}
  - {id: C-2, addresses: [100.64.0.20], mode: notice, reason: notice}
"""


@pytest.fixture
async def control(tmp_path: Path) -> Any:
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "portal: {notice_ack_for: 2h}\n")
    fake = FakeDataplane()
    enforcer = Enforcer(config, dataplane=fake, conntrack=NoConntrack(), clock=lambda: 1_800_000_000.0)  # type: ignore[arg-type]
    await enforcer.engine.restore()
    await enforcer.lists.on_list(ListUpdate(parse_list(LIST, "l.yaml"), "l.yaml", "1"))
    # A real Unix socket, as in production: operator endpoints check the peer (SO_PEERCRED)
    runner = await start_unix_site(control_app(enforcer), str(tmp_path / "control.sock"))
    client = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tmp_path / "control.sock")),
                                   base_url="http://enforcer")
    yield client, enforcer, fake
    await client.close()
    await runner.cleanup()
    await enforcer.close()


async def test_operator_endpoints_need_a_unix_peer(tmp_path: Path) -> None:
    """Served over TCP (no SO_PEERCRED) the operator endpoints refuse; the portal's answer."""
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n")
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    client = TestClient(TestServer(control_app(enforcer)))
    await client.start_server()
    try:
        assert (await client.get("/v1/status")).status == 403
        assert (await client.post("/v1/lift", json={"subscriber": "C-1"})).status == 403
        assert (await client.get("/v1/lookup", params={"address": "100.64.0.1"})).status == 200
    finally:
        await client.close()
        await enforcer.close()


async def test_lookup_by_address_and_prefix(control: Any) -> None:
    client, enforcer, _ = control
    answer = await (await client.get("/v1/lookup", params={"address": "2001:db8:10:100:abcd::1"})).json()
    assert answer["restricted"] and answer["subscriber"] == "C-1" and answer["reason"] == "overdue"
    assert answer["reference"] == enforcer.references.code("C-1")
    assert (await (await client.get("/v1/lookup", params={"address": "100.64.0.99"})).json())["restricted"] is False
    assert (await client.get("/v1/lookup", params={"address": "nonsense"})).status == 400


def test_reference_codes_are_stable_and_reveal_nothing(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n")
    first = Enforcer(config, dataplane=FakeDataplane())
    code = first.references.code("C-1")
    assert code.startswith("WG-") and len(code) == 12 and "C-1" not in code
    second = Enforcer(config, dataplane=FakeDataplane())  # same state dir: same per-installation key
    assert second.references.code("C-1") == code != second.references.code("C-2")
    other = parse_config(f"state_dir: {tmp_path}/other\nsubscribers: {{source: {tmp_path}/l.yaml}}\n")
    assert Enforcer(other, dataplane=FakeDataplane()).references.code("C-1") != code


async def test_acknowledge_only_in_notice_modes(control: Any) -> None:
    client, _enforcer, fake = control
    response = await client.post("/v1/acknowledge", json={"address": "100.64.0.20"})
    answer = await response.json()
    assert response.status == 200 and answer["acknowledged"] and answer["until"] == 1_800_000_000.0 + 7200
    assert fake.state.elements["noticeack4_32"] == {"100.64.0.20": None}
    assert "timeout 7200s" in fake.transactions[-1].render()
    assert (await (await client.get("/v1/lookup", params={"address": "100.64.0.20"})).json())["ack_until"]
    assert (await client.post("/v1/acknowledge", json={"address": "100.64.0.10"})).status == 409
    free = await (await client.post("/v1/acknowledge", json={"address": "100.64.0.99"})).json()
    assert free == {"acknowledged": False, "mode": "free"}
    assert (await client.post("/v1/acknowledge", json={"address": "x"})).status == 400


async def test_explain_by_id_address_and_reference(control: Any) -> None:
    client, enforcer, _ = control
    for query in ("C-1", "100.64.0.10", enforcer.references.code("C-1").lower()):
        answer = await (await client.get("/v1/explain", params={"q": query})).json()
        assert answer["found"] and answer["subscriber"] == "C-1", query
        assert answer["mode"] == "walled-garden" and answer["why"] == "on the restricted list"
        assert answer["enforced_in_kernel"] == "walled-garden"
    missing = await (await client.get("/v1/explain", params={"q": "100.64.0.99"})).json()
    assert missing["found"] is False and "no restricted subscriber" in missing["why"]
    assert (await client.get("/v1/explain")).status == 400


async def test_fleet_status_without_a_fleet_says_so(control: Any) -> None:
    client, _, _ = control
    response = await client.get("/v1/fleet")
    assert response.status == 404
    assert "fleet is not configured" in (await response.json())["error"]


@pytest.mark.parametrize("path", ["/v1/lift", "/v1/restrict", "/v1/exempt", "/v1/unexempt"])
@pytest.mark.parametrize("sid", ["C 1;rm", "-x", "\u00c7-1", "C" * 65, "C-1\n"])
async def test_every_operator_command_checks_the_subscriber_id(control: Any, path: str, sid: str) -> None:
    """``lift 'C 1;rm'`` was answered 200 and left an override under that name for good; only
    ``restrict`` checked the id (operator audit)."""
    client, enforcer, _ = control
    body = {"subscriber": sid, "addresses": ["100.64.0.99"], "category": "other", "until": "1d", "reason": "x"}
    response = await client.post(path, json=body)
    answer = await response.json()
    assert response.status == 400 and "not a subscriber id" in answer["error"], answer
    assert sid not in enforcer.engine.inputs.overrides and sid not in enforcer.engine.inputs.exemptions


async def test_an_operator_reason_is_a_sentence_not_a_document(control: Any) -> None:
    client, _, _ = control
    response = await client.post("/v1/lift", json={"subscriber": "C-1", "reason": "x" * 501})
    assert response.status == 400 and "at most 500" in (await response.json())["error"]


async def test_explain_takes_a_prefix_as_the_list_writes_it(control: Any) -> None:
    client, _, _ = control
    for query in ("100.64.0.10/32", "2001:db8:10:100::/56", "2001:db8:10:100::1/128"):
        response = await client.get("/v1/explain", params={"q": query})
        answer = await response.json()
        assert response.status == 200 and answer.get("subscriber") == "C-1", (query, answer)


def test_a_prefix_is_asked_as_its_network_address_and_anything_else_as_given() -> None:
    from enforcer.queries import _address_of
    assert _address_of("100.64.0.11/32") == "100.64.0.11"
    assert _address_of("2001:db8:10:100::/56") == "2001:db8:10:100::"
    assert _address_of("100.64.0.11/24") == "100.64.0.0"
    assert _address_of("C-1/2") == "C-1/2" and _address_of("WG-ABCD-EFGH") == "WG-ABCD-EFGH"
