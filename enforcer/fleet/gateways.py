"""Who is in the fleet and how far each has got: every gateway writes a heartbeat (its applied
sequence and lag) into the KV bucket ``<stream>_gateways`` every ``BEAT`` seconds and right
after it applies more of the stream (``Fleet._beat``), and ``walled-garden fleet status`` on any
gateway reads them all (its own row from its applier, live). A gateway that stops writing is
"not seen" for as long as its last heartbeat is old (the key is kept for a day, then expires).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from ..metrics import Metrics
from .link import NATS_ERRORS, Link, Unavailable

log = logging.getLogger("walled_garden.enforcer")
BEAT = 2.0
#: Our own heartbeat read back this many times in a row, and no other instance's for this many
#: beat intervals: a name conflict is over. Both, since a gateway also beats after each batch it
#: applies (up to four a second), and five of those could fall between two beats of the other.
QUIET_BEATS = 5
KEEP = 86400.0


def bucket_name(stream: str) -> str:
    return f"{stream}_gateways"


class Gateways:
    def __init__(self, link: Link, gateway: str, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.link, self.gateway, self.metrics, self.clock = link, gateway, metrics, clock
        self.kv: KeyValue | None = None
        self.last: list[dict[str, Any]] = []   # the last view read, for metrics between reads
        self.instance = secrets.token_hex(8)   # this process: tells a second gateway of the same name
        self.conflict = ""
        self._foreign: dict[str, float] = {}   # other instances' last beat under our name
        self._quiet = 0                        # our own beats read back in a row
        self._foreign_at = 0.0                 # when another instance's beat under our name was last read
        self.monotonic = time.monotonic        # for spans: a step of ``clock`` must not stretch one
        self._observed: dict[str, tuple[float, float]] = {}   # peer -> (its last_seen, when we saw it change)

    async def open(self) -> None:
        self.kv = await self.link.bucket(bucket_name(self.link.config.stream), ttl=KEEP)

    async def beat(self, applied: int, lag: float) -> None:
        if self.kv is None:
            raise Unavailable("the gateways bucket is not open")
        heartbeat = {"applied_sequence": applied, "lag_seconds": round(lag, 3), "last_seen": self.clock(),
                     "instance": self.instance}
        try:
            await self._check_name()
            await self.kv.put(self.gateway, json.dumps(heartbeat).encode())
        except NATS_ERRORS as exc:
            raise Unavailable(f"heartbeat: {exc or type(exc).__name__}") from None

    async def _check_name(self) -> None:
        """Two gateways with one name share one durable consumer and would each miss what the
        other applies: another process still beating under our name is shouted about (its beat
        moved on since we last looked: a restart of this gateway is not mistaken for one)."""
        assert self.kv is not None
        try:
            entry = await self.kv.get(self.gateway)
            beat = json.loads(entry.value or b"{}")
        except (nats.js.errors.KeyNotFoundError, ValueError):
            return
        other, seen = beat.get("instance"), beat.get("last_seen")
        if other == self.instance:   # nobody else wrote since our last beat
            self._quiet += 1
            if (self.conflict and self._quiet >= QUIET_BEATS
                    and self.monotonic() - self._foreign_at >= QUIET_BEATS * BEAT):
                log.warning("event=fleet_name_conflict_over gateway=%s", self.gateway)
                self.conflict = ""
            return
        self._quiet = 0
        self._foreign_at = self.monotonic()
        if not other or not isinstance(seen, (int, float)):
            return
        before, self._foreign[other] = self._foreign.get(other), seen
        if before is not None and seen > before:
            self.conflict = (f"another process (instance {other}) beats as {self.gateway!r}: two gateways share "
                             "a name and so a consumer, and each misses inputs; give each its own fleet.gateway")
            log.error("event=fleet_name_conflict gateway=%s other_instance=%s", self.gateway, other)

    def _age(self, peer: str, seen: float, now: float) -> float:
        """How long ago ``peer`` last beat, by this gateway's clock: from when we saw its beat
        change (its own clock may be off), or, the first time, from its own stamp."""
        before = self._observed.get(peer)
        if before is None:
            self._observed[peer] = (seen, now - max(now - seen, 0.0))
        elif before[0] != seen:
            self._observed[peer] = (seen, now)
        return max(now - self._observed[peer][1], 0.0)

    async def read(self, stream_last: int) -> list[dict[str, Any]]:
        """Every gateway's last heartbeat, oldest name first, with how far behind the stream it is."""
        if self.kv is None:
            raise Unavailable("the gateways bucket is not open")
        now = self.clock()
        rows: list[dict[str, Any]] = []
        try:
            try:
                names = await self.kv.keys()
            except nats.js.errors.NoKeysError:
                names = []
            for name in sorted(names):
                entry = await self.kv.get(name)
                try:
                    beat = json.loads(entry.value or b"{}")
                    applied, seen = int(beat["applied_sequence"]), float(beat["last_seen"])
                    lag = float(beat.get("lag_seconds", 0.0))
                except (ValueError, KeyError, TypeError):
                    log.warning("event=fleet_heartbeat_unreadable gateway=%s", name)
                    continue
                ago = round(self._age(name, seen, now), 1)
                rows.append({"gateway": name, "applied_sequence": applied, "behind": max(stream_last - applied, 0),
                             "lag_seconds": lag, "last_seen": seen, "seen_seconds_ago": ago,
                             "connected": ago < 3 * BEAT})
                self.metrics.fleet_peer_seen.labels(name).set(ago)
        except NATS_ERRORS as exc:
            raise Unavailable(f"gateways: {exc or type(exc).__name__}") from None
        for gone in {row["gateway"] for row in self.last} - {row["gateway"] for row in rows}:
            self.metrics.fleet_peer_seen.remove(gone)   # retired (its key expired or was deleted)
        self.last = rows
        return rows
