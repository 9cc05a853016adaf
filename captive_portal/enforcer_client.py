"""Asking the enforcer about a caller, over its control socket.

The portal is unprivileged and keeps no state: the enforcer alone knows who is restricted.
It answers ``GET /v1/lookup?address=...`` on the Unix socket ``api.socket``, and
``POST /v1/acknowledge`` with ``{"address": ...}`` when a subscriber in notice or throttle mode
presses "Continue to the internet", and ``POST /v1/promise`` with ``{"address": ...}`` when a
restricted subscriber presses "I promise to pay"; file permissions on that socket are the access
control, so nothing here needs credentials. The paths and the messages are
``enforcer.control_protocol``'s, shared with the daemon that answers; they are re-exported here.

Every failure (no socket, refused, timeout, bad status, malformed answer) becomes one
exception, ``EnforcerUnavailable``: callers must decide what a missing answer means for them
rather than mistake it for "not restricted".

The enforcer acts only for an address the kernel saw connect to the portal lately: otherwise it
answers with ``403`` and ``"why": "not_a_recent_caller"``, which becomes ``NotRecentCaller`` (the
page asks the caller to reload, which makes that connection). The portal only ever sends the TCP peer's own address.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from enforcer import control_protocol as protocol
from enforcer.control_protocol import (
    NOT_A_RECENT_CALLER,
    NOT_OFFERED,
    NOTICE_MODES,
    Acknowledged,
    Lookup,
    Promised,
    PromiseOffer,
    ProtocolError,
    Refusal,
)

__all__ = [
    "NOTICE_MODES",
    "NOT_A_RECENT_CALLER",
    "NOT_OFFERED",
    "Ack",
    "EnforcerClient",
    "EnforcerUnavailable",
    "Lookup",
    "LookupClient",
    "NotRecentCaller",
    "PromiseOffer",
    "Promised",
    "ProtocolError",
]

#: The host part is ignored on a Unix socket; it only has to make a valid URL.
_BASE = "http://enforcer"
LOOKUP_URL = _BASE + protocol.LOOKUP
ACKNOWLEDGE_URL = _BASE + protocol.ACKNOWLEDGE
PROMISE_URL = _BASE + protocol.PROMISE
DEFAULT_TIMEOUT = 2.0


class EnforcerUnavailable(Exception):
    """The enforcer could not give an answer; the reason is in the message."""


class NotRecentCaller(Exception):
    """The enforcer refused to act: the kernel has not seen this address call the portal lately."""


@dataclass(frozen=True)
class Ack:
    """The enforcer's answer to an acknowledgement, as the page needs it.

    ``acknowledged`` False means the enforcer refused (409: the address is not in notice or
    throttle mode, e.g. it is walled in, or already free); ``error`` then says why.
    """

    acknowledged: bool
    until: float | None = None
    error: str = ""


class LookupClient(Protocol):
    """What the app needs from a client; tests pass a fake with the same methods."""

    async def lookup(self, address: str) -> Lookup: ...

    async def acknowledge(self, address: str) -> Ack: ...

    async def promise(self, address: str) -> Promised: ...


class EnforcerClient:
    """HTTP over the enforcer's Unix control socket, one pooled session per portal process.

    The session is made on first use so the client can be built before the event loop runs
    (``create_app`` is called from synchronous start-up code).
    """

    def __init__(self, socket_path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def lookup(self, address: str) -> Lookup:
        """The enforcer's view of ``address``; raises ``EnforcerUnavailable`` when it has none."""
        _, data = await self._call("GET", LOOKUP_URL, f"a lookup of {address}",
                                   params={protocol.LOOKUP_ADDRESS: address})
        try:
            return Lookup.from_json(data)
        except ProtocolError as exc:  # not JSON, or not the agreed shape
            raise EnforcerUnavailable(f"malformed lookup answer from the enforcer: {exc}") from exc

    async def acknowledge(self, address: str) -> Ack:
        """Tell the enforcer the subscriber at ``address`` has read the notice.

        200 ``Acknowledged(True, until)`` → ``Ack(True, until)``; 409 ``Refusal`` (not in notice
        or throttle mode) → ``Ack(False, error=...)``; 403 (not a recent caller of the portal)
        raises ``NotRecentCaller``; anything else, 400 for a bad address and a 200 saying the
        address is not restricted included, raises ``EnforcerUnavailable`` (the page then looks
        the caller up again).
        """
        status, data = await self._call("POST", ACKNOWLEDGE_URL, f"an acknowledgement for {address}",
                                        json={"address": address}, answers=(200, 403, 409))
        if status == 403:  # the only refusal of an acknowledgement by who asks
            raise NotRecentCaller(f"the enforcer has not seen {address} call the portal lately")
        if status == 409:
            return Ack(False, error=_refusal(data).error or "not in notice or throttle mode")
        try:
            answer = Acknowledged.from_json(data)
        except ProtocolError as exc:
            raise EnforcerUnavailable(f"malformed acknowledgement answer from the enforcer: {exc}") from exc
        if not answer.acknowledged:
            raise EnforcerUnavailable(f"the enforcer acknowledged nothing: {address} is {answer.mode}")
        return Ack(True, until=answer.until)

    async def promise(self, address: str) -> Promised:
        """Ask the enforcer to lift ``address``'s restriction on the subscriber's promise to pay.

        200 ``Promised(True, until, mode)`` (lifted in the kernel) is returned as it is; 403
        ``Refusal`` → ``Promised(False, why=...)``, except ``why`` ``not_a_recent_caller``, which
        raises ``NotRecentCaller``; 409 (not restricted) → ``Promised(False, why="not_restricted")``;
        anything else (400, 503 after a failed kernel change, 404 from an enforcer without
        promises) raises ``EnforcerUnavailable``.
        """
        status, data = await self._call("POST", PROMISE_URL, f"a promise to pay for {address}",
                                        json={"address": address}, answers=(200, 403, 409))
        if status == 409:
            return Promised(False, why=protocol.NOT_RESTRICTED)
        if status == 403:
            why = _refusal(data).why
            if why == NOT_A_RECENT_CALLER:
                raise NotRecentCaller(f"the enforcer has not seen {address} call the portal lately")
            return Promised(False, why=why or "not_eligible")
        try:
            return Promised.from_json(data)
        except ProtocolError as exc:
            raise EnforcerUnavailable(f"malformed promise answer from the enforcer: {exc}") from exc

    async def _call(self, method: str, url: str, what: str, *, answers: tuple[int, ...] = (200,),
                    **kwargs: Any) -> tuple[int, Any]:
        """(status, JSON body or None if it is not JSON); any other status or failure raises."""
        try:
            async with self._get_session().request(method, url, **kwargs) as response:
                if response.status not in answers:
                    raise EnforcerUnavailable(f"enforcer answered {response.status} to {what}")
                body = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise EnforcerUnavailable(
                f"cannot reach the enforcer at {self.socket_path}: {_describe(exc)}") from exc
        try:
            return status, json.loads(body)
        except ValueError:  # not JSON (or not UTF-8)
            return status, None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _refusal(data: Any) -> Refusal:
    """A refusal's body; its status is the answer, so a body we cannot read only loses the detail."""
    try:
        return Refusal.from_json(data)
    except ProtocolError:
        return Refusal("")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
