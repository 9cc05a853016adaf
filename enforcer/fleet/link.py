"""The gateway's connection to NATS and the fleet's JetStream stream, over nats-py.

Thin on purpose: connecting (credentials and TLS from files, every cluster node, reconnecting
for ever once connected), making sure the stream and the KV buckets exist, publishing with a
message id (JetStream drops a repeat inside the duplicate window), and this gateway's durable
push consumer, which is re-created from an exact stream sequence whenever the applier asks
(at start, after a gap): the position that counts is the one saved with the local state.
Every failure of NATS becomes ``Unavailable``, which callers turn into "retry later".
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from ..config import FleetConfig

log = logging.getLogger("walled_garden.enforcer")
#: JetStream drops a message whose id it saw this recently (billing's quick retries, the same
#: webhook posted to two gateways); older repeats are caught by each gateway's saved answers.
DUPLICATE_WINDOW = 3600.0
#: An unacknowledged delivery comes again after this long (only after a crash mid-apply: the
#: applier re-creates the consumer at start anyway).
ACK_WAIT = 30.0
#: Inputs delivered ahead of this gateway's acknowledgement (it acknowledges each batch).
MAX_ACK_PENDING = 20_000
#: The server's idle heartbeat on the consumer (nats-py notices a silent one).
HEARTBEAT = 5.0
CONNECT_TIMEOUT = 2.0
#: A link that silently drops packets is noticed within about PING_INTERVAL * (MAX_OUTSTANDING_PINGS + 1)
#: (nats-py's defaults, 120 s and 2, took minutes: status said "connected" meanwhile).
PING_INTERVAL, MAX_OUTSTANDING_PINGS = 5, 2
REQUEST_TIMEOUT = 5.0
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, TimeoutError)


class Unavailable(Exception):
    """NATS or the stream cannot be reached now; the caller answers "retry later"."""


def subject(stream: str) -> str:
    return f"{stream}.inputs"


def tls_context(config: FleetConfig) -> ssl.SSLContext | None:
    nats_config = config.nats
    if not (nats_config.ca_file or nats_config.cert_file or any(u.startswith("tls://") for u in nats_config.urls)):
        return None
    context = ssl.create_default_context(cafile=nats_config.ca_file or None)
    if nats_config.cert_file:
        context.load_cert_chain(nats_config.cert_file, nats_config.key_file)
    return context


class Link:
    def __init__(self, config: FleetConfig, on_connected: Callable[[bool], None]) -> None:
        self.config = config
        self.subject = subject(config.stream)
        self.on_connected = on_connected
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.closing = False   # our own close: no outage to report
        self.last_error = ""   # what nats-py last reported (a refused certificate, a wrong password)

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self) -> None:
        """One attempt at every configured node; ``Unavailable`` when none answers. Once
        connected, nats-py reconnects by itself (every second, for ever)."""
        async def disconnected() -> None:
            if self.closing:
                return
            log.warning("event=fleet_disconnected (webhooks answer 503 until NATS is back; enforcing what we have)")
            self.on_connected(False)

        async def reconnected() -> None:
            log.info("event=fleet_reconnected url=%s", self.nc.connected_url.netloc if self.nc and
                     self.nc.connected_url else "-")
            self.on_connected(True)

        async def error(exc: Exception) -> None:
            self.last_error = str(exc) or type(exc).__name__
            log.debug("event=fleet_nats_error error=%r", self.last_error)

        if self.nc is not None and not self.nc.is_closed:
            raise Unavailable("already connecting")
        options: dict[str, Any] = {}
        if self.config.nats.creds_file:
            options["user_credentials"] = self.config.nats.creds_file
        context = tls_context(self.config)
        if context is not None:
            options["tls"] = context
        self.last_error = ""
        try:
            # One try per node (nats-py would retry the first connection for ever with -1), then,
            # once connected, reconnect for ever: an outage must never end the fleet's connection.
            self.nc = await nats.connect(
                servers=list(self.config.nats.urls), name=f"walled-garden {self.config.gateway}",
                connect_timeout=CONNECT_TIMEOUT, reconnect_time_wait=1, max_reconnect_attempts=1,
                ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                allow_reconnect=True, disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
                **options)
        except (nats.errors.Error, OSError, TimeoutError, ssl.SSLError) as exc:
            why = self.last_error or str(exc) or type(exc).__name__
            raise Unavailable(f"cannot connect to {', '.join(self.config.nats.urls)}: {why}") from None
        self.nc.options["max_reconnect_attempts"] = -1
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.on_connected(True)

    def _js(self) -> JetStreamContext:
        if self.js is None or not self.connected:
            raise Unavailable("not connected to NATS")
        return self.js

    async def ensure_stream(self) -> None:
        """The stream, created if missing; a stream of that name for other subjects is refused
        (it is not ours: a gateway trusts only its configured stream)."""
        js = self._js()
        try:
            info = await js.stream_info(self.config.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(
                name=self.config.stream, subjects=[self.subject], storage=StorageType.FILE,
                num_replicas=self.config.replicas, duplicate_window=DUPLICATE_WINDOW, discard=DiscardPolicy.OLD,
                description="walled-garden: every input that changes a decision, for every gateway"))
            log.info("event=fleet_stream_created stream=%s replicas=%d", self.config.stream, self.config.replicas)
            return
        except NATS_ERRORS as exc:
            raise Unavailable(f"stream {self.config.stream}: {exc or type(exc).__name__}") from None
        if self.subject not in (info.config.subjects or []):
            raise Unavailable(f"stream {self.config.stream} exists for subjects {info.config.subjects}, "
                              f"not {self.subject}: it is not a walled-garden stream")

    async def publish(self, payload: bytes, message_id: str, timeout: float) -> tuple[int, bool]:
        """(stream sequence, was a duplicate) once JetStream has stored the message."""
        js = self._js()
        try:
            ack = await js.publish(self.subject, payload, timeout=timeout, stream=self.config.stream,
                                   headers={"Nats-Msg-Id": message_id})
        except NATS_ERRORS as exc:
            raise Unavailable(f"publish: {exc or type(exc).__name__}") from None
        return ack.seq, bool(ack.duplicate)

    async def stream_bounds(self) -> tuple[int, int, str]:
        """(first, last) sequence the stream holds now, and its identity (when it was created: a
        stream deleted and created again starts its sequences anew)."""
        try:
            info = await self._js().stream_info(self.config.stream)
        except NATS_ERRORS as exc:
            raise Unavailable(f"stream info: {exc or type(exc).__name__}") from None
        return info.state.first_seq, info.state.last_seq, str(info.created or "")

    async def consume_from(self, sequence: int) -> JetStreamContext.PushSubscription:
        """This gateway's durable consumer, (re-)created to deliver from ``sequence`` on.

        A push consumer with flow control: the server sends each input as soon as it is stored,
        up to ``MAX_ACK_PENDING`` ahead of our acknowledgements. (Pulling in batches made every
        batch wait for more messages to fill it while inputs kept coming, on nats-server 2.9.)"""
        js = self._js()
        durable = self.config.gateway
        try:
            try:
                await js.delete_consumer(self.config.stream, durable)
            except nats.js.errors.NotFoundError:
                pass
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT,
                                    max_deliver=-1, max_ack_pending=MAX_ACK_PENDING, filter_subject=self.subject,
                                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(sequence, 1))
            return await js.subscribe(self.subject, durable=durable, stream=self.config.stream, config=config,
                                      manual_ack=True, flow_control=True, idle_heartbeat=HEARTBEAT)
        except NATS_ERRORS as exc:
            raise Unavailable(f"consumer {durable}: {exc or type(exc).__name__}") from None

    @staticmethod
    async def fetch(subscription: JetStreamContext.PushSubscription, batch: int, timeout: float) -> list[Msg]:
        """The next message (waiting up to ``timeout``) and whatever else has arrived, up to
        ``batch``; [] when none came."""
        messages: list[Msg] = []
        try:
            messages.append(await subscription.next_msg(timeout))
            while len(messages) < batch and subscription.pending_msgs > 0:
                messages.append(await subscription.next_msg(timeout))
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        except NATS_ERRORS as exc:
            if not messages:
                raise Unavailable(f"fetch: {exc or type(exc).__name__}") from None
        return messages

    async def bucket(self, name: str, ttl: float | None = None) -> KeyValue:
        """A KV bucket, created if missing (same replicas as the stream)."""
        js = self._js()
        try:
            try:
                return await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                return await js.create_key_value(bucket=name, history=1, ttl=ttl, replicas=self.config.replicas)
        except NATS_ERRORS as exc:
            raise Unavailable(f"bucket {name}: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        self.closing = True
        if self.nc is not None:
            try:
                await self.nc.close()
            except NATS_ERRORS:
                pass
            self.nc = self.js = None
