"""The daemon's parts, wired together: one engine and the components around it.

Inputs come in through the components (``lists``: the restricted list; ``events``: billing's
webhooks; ``sessions``: where subscribers are now (lease files, RADIUS, session events);
``timers``: time passing; ``operator`` and ``portal``: the control socket; in a fleet, ``fleet``
feeds the shared stream to the same components), each
changing enforcement only through the engine (``engine.apply`` / ``engine.sync_all``), never
through each other. ``queries`` and ``health`` read. The ``api`` package serves them over HTTP and
``service.py`` runs them; see ARCHITECTURE.md for the flow of one payment and one list edit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .address_lookup import promise_eligibility
from .config import Config
from .conntrack import Conntrack
from .dataplane.backend import Dataplane
from .engine import Engine
from .event_intake import EventIntake
from .event_sink import EventSink
from .events import Event
from .flushing import ConnectionTable, Flusher
from .list_intake import ListIntake
from .metrics import Metrics
from .operator_actions import OperatorActions
from .outcome import Result
from .portal_actions import PortalActions
from .promises import Eligibility
from .queries import Queries
from .receipt_clock import boot_id
from .references import References
from .session_intake import SessionIntake
from .sessions.configured import build_sources
from .sessions.source import SessionSink
from .store import Checkpoints, Store, StoreError
from .table_health import TableHealth
from .timers import Timers

if TYPE_CHECKING:   # imported where a fleet is configured: NATS' client is 25 MB and ~40 ms of every start
    from .fleet.fleet import Fleet


class SessionDoor(SessionSink, Protocol):
    """What session sources and the ``session`` CLI talk to: the session intake, or in a fleet the
    fleet's stream in front of it."""

    async def handle_event(self, event: Event, source: str) -> Result: ...


class Enforcer:
    def __init__(self, config: Config, dataplane: Dataplane | None = None, conntrack: ConnectionTable | None = None,
                 clock: Callable[[], float] = time.time, store: Store | None = None,
                 monotonic: Callable[[], float] | None = None, boot: str | None = None) -> None:
        """``clock`` is the wall clock; ``monotonic`` the clock it is checked against for steps
        (default: ``time.monotonic`` with the real clock; a test's own clock is its own
        monotonic one unless it passes another, so advancing it is time passing, not a step);
        ``boot`` this boot's id (default the kernel's: a test simulating a reboot passes another)."""
        if dataplane is None:
            dataplane = build_dataplane(config)
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self.metrics = metrics = Metrics()
        self.flusher = Flusher(conntrack or Conntrack(), metrics)
        self.engine = engine = Engine(config, dataplane, store or Store(config.state_dir), self.flusher, metrics,
                                      clock, monotonic, boot_id() if boot is None else boot)
        self.references = References(engine.store)
        self.lists = ListIntake(engine, metrics)
        self.events = EventIntake(engine, metrics)
        self.timers = Timers(engine, metrics)
        self.operator = OperatorActions(engine, self.events)
        self.portal = PortalActions(engine, self.references, metrics)
        self.queries = Queries(engine, self.references)
        self.health = TableHealth(engine)
        engine.duties.append(Checkpoints(engine.store))
        self.sessions = SessionIntake(engine, metrics, build_sources(config.subscribers.sessions))
        self.events.sessions = self.sessions
        self.sink: EventSink = self.events   # where webhooks and operators' restrict/lift go
        self.session_sink: SessionDoor = self.sessions   # where session sources and the CLI report
        self.fleet: Fleet | None = None
        if config.fleet is not None:
            from .fleet.fleet import Fleet

            self.fleet = fleet = Fleet(config.fleet, engine, self.events, self.operator, self.portal, self.lists,
                                       self.sessions, self.references, metrics)
            self.sink = fleet.events
            self.session_sink = fleet.sessions
            self.operator.relay = self.portal.relay = self.lists.relay = fleet.relay
            metrics.constant_labels["gateway"] = config.fleet.gateway
        watch(metrics, engine)

    def promise_eligibility(self, sid: str) -> Eligibility:
        return promise_eligibility(self.engine, sid)

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.events.close()
        await self.sessions.close()
        await self.engine.close()


def build_dataplane(config: Config) -> Dataplane:
    """The backend ``gateway.backend`` names (docs/ipset.md), imported only when chosen: the
    nftables one needs libnftables, the ipset one the ipset and iptables tools: without them the
    start fails here, naming the tool, rather than at the first sync as a kernel error."""
    if config.gateway.backend == "ipset":
        from .config import ConfigError
        from .dataplane.ipset import IpsetDataplane, available
        from .issues import Issue
        from .table_layout import base_layout

        missing = available(config.gateway.ipset.rules, config.gateway.ipset.iptables)
        if missing:
            raise ConfigError([Issue("gateway.backend", f"ipset {missing}")])
        return IpsetDataplane(config.gateway.table, config.gateway.ipset.rules, config.gateway.ipset.iptables,
                              base_layout(config))
    from .dataplane.kernel import KernelDataplane  # needs libnftables: not for unit tests
    return KernelDataplane(config.gateway.table)


def watch(metrics: Metrics, engine: Engine) -> None:
    """The engine's scrape-time gauges: read from its own bookkeeping, never from the kernel."""
    metrics.kernel_in_sync.set_function(lambda: 0.0 if engine.reconciler.needs_full else 1.0)
    metrics.payment_graces.set_function(lambda: len(engine.inputs.graces))
    metrics.next_grace_expiry.set_function(
        lambda: min((g.until for g in engine.inputs.graces.values() if g.until > engine.clock()), default=0.0))
    metrics.grace_expiries_due.set_function(
        lambda: sum(1 for g in engine.inputs.graces.values() if g.until <= engine.clock()))
    metrics.overrides.set_function(lambda: len(engine.inputs.overrides))
    metrics.quarantined_databases.set_function(lambda: len(engine.store.quarantined_files()))

    def quarantined_rows() -> float:
        try:
            return float(engine.store.quarantined_row_count())
        except StoreError:   # a scrape must not fail because the database is busy
            return math.nan

    metrics.quarantined_rows.set_function(quarantined_rows)
