"""A fleet gateway whose clock runs ahead is seen, on every gateway, before a payment's grace ends
early on it: the metric ``walled_garden_fleet_clock_offset_seconds{origin}``, ``fleet status``'s
clock column, ``status --json``'s fleet section and a warning in the log (``enforcer.fleet.clocks``).

Two gateways (the daemon's parts, fake dataplanes, ``test_fleet_inputs``' kind), gw-b's wall clock
``SKEW`` seconds ahead, one real nats-server on loopback whose stored stamps are the one clock both
are measured against; a third gateway joins late, to show a catch-up is not taken for its clock."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

import enforcer.cli as cli
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, Event
from enforcer.metric_labels import Labelled
from enforcer.outcome import Outcome
from enforcer.sources import ListUpdate
from enforcer.subscribers import parse_list
from tests.daemon_helpers import NoConntrack
from tests.nats_server import NatsServer, pair_on_nats
from tests.required import tool
from tests.unit.test_fleet_inputs import LIST, Gateway, config, until

SKEW = 120.0
#: Publish and delivery on loopback take milliseconds; the estimate is good to well within this.
WITHIN = 2.0


class SkewedGateway(Gateway):
    """``test_fleet_inputs.Gateway`` with a wall clock of its own (also its monotonic clock, as in
    the daemon's tests: a constant offset is a clock set wrong, not time passing)."""

    def __init__(self, tmp: Path, name: str, url: str, clock: Callable[[], float]) -> None:
        super().__init__(tmp, name, url)
        self.clock = clock

    async def start(self, wait: bool = True) -> None:
        self.enforcer = Enforcer(config(self.tmp, self.name, self.url), dataplane=FakeDataplane(),
                                 conntrack=NoConntrack(), clock=self.clock)
        await self.e.engine.restore()
        await self.e.lists.on_list(ListUpdate(parse_list(LIST, "l.yaml"), "l.yaml", "1"))
        self.stop = asyncio.Event()
        assert self.e.fleet is not None
        self.task = asyncio.create_task(self.e.fleet.run(self.stop))
        if wait:
            assert await self.e.fleet.caught_up(10), self.e.fleet.error

    async def event(self, kind: str, sid: str, event_id: str, **kw: Any) -> Any:
        event = Event(event_id, kind, time.time(), sid, **kw)   # billing's clock is right
        return await asyncio.wait_for(self.e.sink.submit(event, time.perf_counter()), 10)


@contextlib.asynccontextmanager
async def skewed_fleet(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, SkewedGateway, SkewedGateway]]:
    """A nats-server of this test's own, gw-a on the right time and gw-b ``SKEW`` ahead, all stopped after."""
    (tmp_path / "l.yaml").write_text(LIST)
    clocks = {"gw-a": time.time, "gw-b": lambda: time.time() + SKEW}
    async with pair_on_nats(tmp_path, lambda name, url: SkewedGateway(tmp_path, name, url, clocks[name])) as started:
        yield started


def offset(gw: Gateway, origin: str) -> float | None:
    return gw.e.metrics.registry.get_sample_value("walled_garden_fleet_clock_offset_seconds", {"origin": origin})


def near(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) < WITHIN


async def measured(gw: Gateway, sender: SkewedGateway, prefix: str) -> None:
    """Inputs accepted by ``sender`` until ``gw`` has measured its own clock: it takes only an input
    it was waiting for with nothing else received (one that came while it was busy, say checking
    the stream after an idle spell, is passed over by design), so it may take a second one."""
    for n in range(3):
        assert isinstance(await sender.event(PAYMENT, "C-1", f"{prefix}-{n}"), Outcome)
        with contextlib.suppress(AssertionError):
            await until(lambda: offset(gw, gw.name) is not None, 2.0)
            return
    raise AssertionError(f"{gw.name} never measured its own clock")


async def fleet_status_text(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], str]:
    """``walled-garden fleet status`` as printed: the daemon's view, through JSON as the control
    socket carries it, into the CLI's rendering."""
    assert gw.e.fleet is not None
    view = json.loads(json.dumps(await gw.e.fleet.status()))
    monkeypatch.setattr(cli, "_ask", lambda args, method, path, body=None: view)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.cmd_fleet(argparse.Namespace(json=False)) == 0
    return view, out.getvalue()


async def test_a_gateway_whose_clock_runs_ahead_is_seen_on_every_gateway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "walled_garden.enforcer")
    async with skewed_fleet(tmp_path) as (server, a, b):
        await measured(a, a, "evt-skew-a")   # inputs accepted by gw-a, received live by both
        await measured(b, a, "evt-skew-a2")
        assert near(offset(a, "gw-a"), 0.0), "gw-a received its own input live: its clock is right"
        assert near(offset(b, "gw-b"), SKEW), "gw-b received gw-a's input live: its clock is ahead"
        await until(lambda: near(offset(b, "gw-a"), 0.0))
        assert offset(a, "gw-b") is None, "gw-b has accepted nothing yet: gw-a cannot tell its clock"

        assert isinstance(await b.event(PAYMENT, "C-2", "evt-skew-b"), Outcome)   # accepted by gw-b
        await until(lambda: near(offset(a, "gw-b"), SKEW))
        assert near(offset(b, "gw-b"), SKEW) and near(offset(a, "gw-a"), 0.0)

        warned = [re.match(r"event=fleet_clock_skew origin=(\S+) offset=([-+.\d]+)s \((.*?) clock is \d+ s ahead",
                           r.getMessage()) for r in caplog.records if "event=fleet_clock_skew " in r.getMessage()]
        told = {(m[1], m[3]) for m in warned if m and near(float(m[2]), SKEW)}
        assert told == {("gw-b", "gateway gw-b's"), ("gw-b", "this gateway's")}, warned   # by gw-a, by gw-b

        for gw in (a, b):
            fleet = gw.e.queries.status()["fleet"]   # status --json's fleet section
            assert near(fleet["clock_offsets"]["gw-b"]["offset_seconds"], SKEW), fleet
            assert near(fleet["clock_offsets"]["gw-a"]["offset_seconds"], 0.0), fleet

        view, text = await fleet_status_text(a, monkeypatch)
        deadline = time.monotonic() + 8
        while {row["gateway"] for row in view["gateways"]} != {"gw-a", "gw-b"}:   # both heartbeats read
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.2)
            view, text = await fleet_status_text(a, monkeypatch)
        rows = {row["gateway"]: row for row in view["gateways"]}
        assert near(rows["gw-b"]["clock_offset_seconds"], SKEW) and near(rows["gw-a"]["clock_offset_seconds"], 0.0)
        lines = {line.split()[0]: line for line in text.splitlines()}
        assert lines["gateway"].split()[-1] == "clock", text
        assert lines["gw-b"].endswith(" SKEW") and near(float(lines["gw-b"].split()[-2].rstrip("s")), SKEW), text
        assert near(float(lines["gw-a"].split()[-1].rstrip("s")), 0.0), text

        exposition = generate_latest(Labelled(a.e.metrics.registry, a.e.metrics.constant_labels)).decode()
        assert 'walled_garden_fleet_clock_offset_seconds{gateway="gw-a",origin="gw-b"} 1' in exposition
        check = await asyncio.to_thread(subprocess.run, [tool("promtool", "prometheus"), "check", "metrics"],
                                        input=exposition, capture_output=True, text=True, check=False, timeout=30)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

        # A gateway joining late catches up on inputs stored seconds ago: they tell the others'
        # clocks (their instants are from then too), never its own, until an input comes live.
        await asyncio.sleep(3.0)
        c = SkewedGateway(tmp_path, "gw-c", server.url, time.time)
        try:
            await c.start()
            assert c.e.fleet is not None and b.e.fleet is not None
            assert c.e.fleet.applier.applied == b.e.fleet.applier.applied >= 3, "caught up"
            assert c.e.fleet.applier.target == c.e.fleet.applier.applied, "all of it stored before gw-c connected"
            assert near(offset(c, "gw-b"), SKEW) and near(offset(c, "gw-a"), 0.0)
            assert offset(c, "gw-c") is None, "a catch-up is not taken for this gateway's clock"
            await measured(c, a, "evt-skew-c")
            assert near(offset(c, "gw-c"), 0.0), offset(c, "gw-c")
        finally:
            await c.close()
