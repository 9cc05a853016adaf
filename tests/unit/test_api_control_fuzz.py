"""Fuzzing the control socket: any JSON body, path or query on any route of
``api.control.control_app`` gets a 2xx, a 4xx or a 503, never a 500. Served on a real Unix socket as
in production (operator routes check the peer), the enforcer over the fake dataplane."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
ROUTES = [("GET", "/v1/lookup"), ("GET", "/v1/status"), ("GET", "/v1/explain"), ("GET", "/v1/audit"),
          *(("POST", f"/v1/{action}") for action in ("acknowledge", "promise", "restrict", "lift", "approve",
                                                      "reject", "exempt", "unexempt", "session/start",
                                                      "session/stop"))]
KEYS = ["address", "subscriber", "addresses", "mode", "reason", "note", "category", "until", "q", "since",
        "limit", "username", "mac", "match", "circuit_id"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(["C-1", "C-2", "100.64.0.10", "100.64.0.20", "2001:db8:10:100::1", "dispute", "outage",
                              "notice", "walled-garden", "2h", "2026-11-23T10:00:00Z", "9999-12-31", "0001-01-01",
                              "1e400", "NaN", "-1", "99999999999999999999", "WG-0000-0000",
                              "02:00:00:00:10:01", "c1@isp"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)
fields = st.fixed_dictionaries({}, optional={key: json_values for key in KEYS})
queries = st.dictionaries(st.sampled_from(KEYS), st.text(max_size=20) | scalars.map(str), max_size=3)
OK = {*range(200, 300), *range(400, 500), 503}


def test_the_control_socket_never_answers_500(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    config = parse_config(f"state_dir: {tmp_path}/state\nsubscribers: {{source: {tmp_path}/l.yaml}}\n"
                          "portal: {notice_ack_for: 2h}\n")
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack(),  # type: ignore[arg-type]
                        clock=lambda: 1_800_000_000.0)
    held: dict[str, Any] = {}

    async def start() -> None:
        await enforcer.engine.restore()
        await enforcer.lists.on_list(ListUpdate(parse_list(LIST, "l.yaml"), "l.yaml", "1"))
        held["runner"] = await start_unix_site(control_app(enforcer), str(tmp_path / "control.sock"))
        held["client"] = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(tmp_path / "control.sock")), base_url="http://enforcer")

    async def send(method: str, path: str, query: dict[str, str], body: bytes | None) -> tuple[int, bytes]:
        async with held["client"].request(method, path, params=query, data=body,
                                          headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(route=st.sampled_from(ROUTES), query=queries,
           body=fields.map(lambda v: json.dumps(v).encode()) | json_values.map(lambda v: json.dumps(v).encode())
           | st.binary(max_size=40) | st.sampled_from([b"[" * 100_000, b'{"subscriber": "C-1", "note": NaN}',
                                                        b'{"subscriber": "C-1", "subscriber": "C-2"}']) | st.none(),
           suffix=st.sampled_from(["", "", "", "/", "x", "/../status", "%00"]))
    def check(route: tuple[str, str], query: dict[str, str], body: bytes | None, suffix: str) -> None:
        method, path = route
        status, answer = loop.run_until_complete(send(method, path + suffix, query, body))
        assert status in OK, (method, path + suffix, query, body, status, answer)

    try:
        loop.run_until_complete(start())
        check()
    finally:
        if "client" in held:
            loop.run_until_complete(held["client"].close())
        if "runner" in held:
            loop.run_until_complete(held["runner"].cleanup())
        loop.run_until_complete(enforcer.close())
        loop.close()
