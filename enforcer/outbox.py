"""Outgoing webhooks to billing (promises to pay), delivered at least once.

A promise the customer made on the portal must reach billing even if billing is down for an
hour or the gateway reboots: messages are written to SQLite in the same step that lifts the
customer, and this loop delivers them, signed the Standard Webhooks way (the same scheme
billing uses towards us, but with a secret of its own: ``promise_to_pay.webhook_secret_file``),
retrying with jittered exponential backoff until billing answers 2xx. The webhook id is
stable across retries, so billing can de-duplicate.

The queue is the store's ``outbox`` table; every change to it (``add_outbox``,
``outbox_delivered``, ``outbox_failed``) is a store write like any other, one transaction on
the calling thread's connection. This module knows nothing of the daemon: it is handed the
store, the ``promise_to_pay`` rules, its two metrics, the clock, the event that wakes it when
a message is queued, and the function that reads the signing secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp

from .promises import PromiseRules

log = logging.getLogger("walled_garden.outbox")

#: First retry after this many seconds, doubling per attempt up to ``MAX_BACKOFF``.
FIRST_BACKOFF = 15.0
MAX_BACKOFF = 3600.0
#: Each delivery attempt gives up after this long.
TIMEOUT = 10.0
#: With nothing due, look again at least this often (new messages also wake the loop).
IDLE = 60.0


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** attempts) * random.uniform(0.75, 1.25)


class OutboxStore(Protocol):
    """The part of ``store.Store`` the outbox uses."""

    def outbox_due(self, now: float, limit: int = ...) -> list[tuple[str, float, dict[str, Any], int]]: ...
    def outbox_next(self) -> float | None: ...
    def outbox_size(self) -> int: ...
    def outbox_delivered(self, message_id: str) -> None: ...
    def outbox_failed(self, message_id: str, next_at: float, error: str) -> None: ...


class Signer(Protocol):
    """A Standard Webhooks signer (``standardwebhooks.Webhook``)."""

    def sign(self, msg_id: str, timestamp: datetime, data: str) -> str: ...


class Outbox:
    """Delivers the queued messages.

    ``Outbox(store, rules, metrics, clock, wake, load_secret)``:

    - ``store``: the ``Store`` (its ``outbox_*`` methods);
    - ``rules``: ``config.policy.promise_to_pay`` (``webhook_url``, ``webhook_secret_file``);
    - ``metrics``: has ``outbox`` (a gauge: ``.set(n)``) and ``outbox_failures`` (a counter:
      ``.inc()``);
    - ``clock``: the time now, in seconds (what ``next_at`` is compared with);
    - ``wake``: set when a message is queued, so it goes out without waiting for ``IDLE``;
    - ``load_secret``: reads a ``whsec_`` file into a signer (``api.webhooks.load_webhook_secret``);
      it raises ``ValueError`` (``api.webhooks.SecretError`` is one) for a missing or bad secret.
    """

    def __init__(self, store: OutboxStore, rules: PromiseRules, metrics: Any, clock: Callable[[], float],
                 wake: asyncio.Event, load_secret: Callable[[str], Signer]) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.wake = wake
        self.load_secret = load_secret
        self.url = rules.webhook_url
        # Its own secret only (the config requires one with webhook_url): signing with the
        # inbound webhook secret would let anyone holding billing's copy forge events to us.
        self.secret_file = rules.webhook_secret_file or ""

    async def run(self, stop: asyncio.Event) -> None:
        if not self.url:
            return
        store, metrics = self.store, self.metrics
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            while not stop.is_set():
                try:
                    await self.deliver_due(session)
                    metrics.outbox.set(store.outbox_size())
                except Exception:  # never let billing's promises stop flowing for good
                    log.exception("event=outbox_round_failed retry_in=%.0fs", IDLE)
                upcoming = store.outbox_next()
                now = self.clock()
                wait = IDLE if upcoming is None else max(0.0, min(IDLE, upcoming - now))
                wake = self.wake
                wake.clear()
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()

    async def deliver_due(self, session: aiohttp.ClientSession) -> int:
        """Try every due message once; returns how many were delivered."""
        store, metrics = self.store, self.metrics
        due = store.outbox_due(self.clock())
        if not due or not self.url:
            return 0
        try:
            if not self.secret_file:
                raise ValueError("policy.promise_to_pay.webhook_secret_file is not set (required with "
                                 "webhook_url; the inbound webhook secret is never used for promises)")
            signer = self.load_secret(self.secret_file)
        except ValueError as exc:    # api.webhooks.SecretError: names the file and the problem, never the secret
            log.error("event=outbox_no_secret error=%s queued=%d", exc, len(due))
            for message_id, _, _, attempts in due:
                await asyncio.to_thread(store.outbox_failed, message_id, self.clock() + backoff(attempts), str(exc))
            return 0
        delivered = 0
        for message_id, _, body, attempts in due:
            payload = json.dumps(body, sort_keys=True)
            sent = datetime.now(tz=UTC)
            headers = {"content-type": "application/json", "webhook-id": message_id,
                       "webhook-timestamp": str(int(sent.timestamp())),
                       "webhook-signature": signer.sign(message_id, sent, payload)}
            try:
                async with session.post(self.url, data=payload.encode(), headers=headers) as response:
                    await response.read()
                    ok, error = 200 <= response.status < 300, f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
            if ok:
                await asyncio.to_thread(store.outbox_delivered, message_id)
                delivered += 1
                log.info("event=outbox_delivered id=%s type=%s attempts=%d", message_id, body.get("type"),
                         attempts + 1)
            else:
                retry = backoff(attempts)
                # off the loop: a write may wait for a list save in another thread
                await asyncio.to_thread(store.outbox_failed, message_id, self.clock() + retry, error)
                metrics.outbox_failures.inc()
                log.warning("event=outbox_failed id=%s error=%s attempt=%d retry_in=%.0fs", message_id, error,
                            attempts + 1, retry)
        return delivered
