"""Asking the enforcer about a caller, over its control socket.

The portal is unprivileged and keeps no state: the enforcer alone knows who is restricted.
It answers ``GET /v1/lookup?address=...`` on the Unix socket ``api.socket``, and
``POST /v1/acknowledge`` with ``{"address": ...}`` when a subscriber in notice or throttle mode
presses "Continue to the internet", and ``POST /v1/promise`` with ``{"address": ...}`` when a
restricted subscriber presses "I promise to pay"; file permissions on that socket are the access
control, so nothing here needs credentials.

Every failure (no socket, refused, timeout, bad status, malformed answer) becomes one
exception, ``EnforcerUnavailable``: callers must decide what a missing answer means for them
rather than mistake it for "not restricted".

The enforcer acts only for an address the kernel saw connect to the portal lately (issue 11
item 6): otherwise it answers an acknowledgement or a promise with ``403`` and
``"why": "not_a_recent_caller"``, which becomes ``NotRecentCaller`` (the page asks the caller to
reload, which makes that connection). The portal only ever sends the TCP peer's own address.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

#: The host part is ignored on a Unix socket; it only has to make a valid URL.
LOOKUP_URL = "http://enforcer/v1/lookup"
ACKNOWLEDGE_URL = "http://enforcer/v1/acknowledge"
PROMISE_URL = "http://enforcer/v1/promise"
#: Modes in which the subscriber may read the notice and carry on (the others are walled in).
NOTICE_MODES = frozenset({"notice", "throttle"})
DEFAULT_TIMEOUT = 2.0


class EnforcerUnavailable(Exception):
    """The enforcer could not give an answer; the reason is in the message."""


#: The enforcer's ``why`` for an address the kernel has not seen connect to the portal lately.
NOT_A_RECENT_CALLER = "not_a_recent_caller"


class NotRecentCaller(Exception):
    """The enforcer refused to act: the kernel has not seen this address call the portal lately."""


@dataclass(frozen=True)
class PromiseOffer:
    """Whether the caller may press "I promise to pay" now (the lookup's ``promise``).

    ``why`` is the enforcer's category (``eligible``, ``limit_reached``, ...; "" when an older
    enforcer said nothing); ``term`` is how long a promise would lift the restriction, seconds.
    """

    eligible: bool = False
    why: str = ""
    term: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> PromiseOffer:
        """Lenient: anything missing or odd means "no button" (an older enforcer sends nothing)."""
        if not isinstance(data, dict):
            return cls()
        term = _time(data.get("term_seconds"))
        term = term if term is not None and term > 0 else None
        # Without a term the page could not say what the button does: no button then.
        return cls(eligible=data.get("eligible") is True and term is not None, why=_text(data.get("why")),
                   term=term)


NOT_OFFERED = PromiseOffer()


@dataclass(frozen=True)
class Lookup:
    """What the enforcer says about one address."""

    address: str
    restricted: bool
    mode: str        # "free" | "notice" | "throttle" | "walled-garden"
    reason: str      # category for the page ("overdue", ...), "" when none
    reference: str   # code the subscriber quotes to the provider, "" when none
    subscriber: str = ""            # account id; shown only with portal.show_account
    ack_until: float | None = None  # unix time an acknowledged notice lasts until
    promise: PromiseOffer = NOT_OFFERED  # may the caller promise to pay now, and for how long

    @property
    def in_notice(self) -> bool:
        """Restricted in a mode the subscriber can acknowledge (notice or throttle)."""
        return self.restricted and self.mode in NOTICE_MODES

    def acknowledged(self, now: float) -> bool:
        """In notice mode and the notice has been acknowledged, still in force at ``now``."""
        return self.in_notice and self.ack_until is not None and self.ack_until > now

    def captive(self, now: float) -> bool:
        """RFC 8908 ``captive``: must this caller visit the portal before browsing normally?"""
        return self.restricted and not self.acknowledged(now)

    @classmethod
    def from_json(cls, data: Any) -> Lookup:
        """Strict about the two fields decisions hang on, lenient about the optional ones."""
        if not isinstance(data, dict):
            raise ValueError("lookup answer is not a JSON object")
        restricted = data.get("restricted")
        mode = data.get("mode")
        if not isinstance(restricted, bool):
            raise ValueError("lookup answer has no boolean 'restricted'")
        if not isinstance(mode, str) or not mode:
            raise ValueError("lookup answer has no 'mode'")
        return cls(address=str(data.get("address") or ""), restricted=restricted, mode=mode,
                   reason=_text(data.get("reason")), reference=_text(data.get("reference")),
                   subscriber=_text(data.get("subscriber")), ack_until=_time(data.get("ack_until")),
                   promise=PromiseOffer.from_json(data.get("promise")))


@dataclass(frozen=True)
class Ack:
    """The enforcer's answer to an acknowledgement.

    ``acknowledged`` False means the enforcer refused (409: the address is not in notice or
    throttle mode, e.g. it is walled in, or already free); ``error`` then says why.
    """

    acknowledged: bool
    until: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Promised:
    """The enforcer's answer to "I promise to pay".

    ``made`` True: the restriction is lifted until ``until`` (unix time, always set then).
    False: refused, and ``why`` says why: one of the lookup's ``promise.why`` categories (403:
    not eligible), or ``not_restricted`` (409: nothing to lift).
    """

    made: bool
    until: float | None = None
    why: str = ""


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
        _, data = await self._call("GET", LOOKUP_URL, f"a lookup of {address}", params={"address": address})
        try:
            return Lookup.from_json(data)
        except ValueError as exc:  # not JSON, or not the expected shape
            raise EnforcerUnavailable(f"malformed lookup answer from the enforcer: {exc}") from exc

    async def acknowledge(self, address: str) -> Ack:
        """Tell the enforcer the subscriber at ``address`` has read the notice.

        200 ``{"acknowledged": true, "until": <unix seconds>}`` → ``Ack(True, until)``;
        409 ``{"error": ...}`` (not in notice or throttle mode) → ``Ack(False, error=...)``;
        403 (not a recent caller of the portal) raises ``NotRecentCaller``; anything else, 400 for a bad address included, raises ``EnforcerUnavailable``.
        """
        status, data = await self._call("POST", ACKNOWLEDGE_URL, f"an acknowledgement for {address}",
                                        json={"address": address}, answers=(200, 403, 409))
        if status == 403:  # the only refusal of an acknowledgement by who asks
            raise NotRecentCaller(f"the enforcer has not seen {address} call the portal lately")
        if status == 409:  # a refusal is an answer, whatever its body looks like
            error = _text(data.get("error")) if isinstance(data, dict) else ""
            return Ack(False, error=error or "not in notice or throttle mode")
        if not isinstance(data, dict) or data.get("acknowledged") is not True:
            raise EnforcerUnavailable("malformed acknowledgement answer from the enforcer: "
                                      "no JSON object with 'acknowledged': true")
        return Ack(True, until=_time(data.get("until")))

    async def promise(self, address: str) -> Promised:
        """Ask the enforcer to lift ``address``'s restriction on the subscriber's promise to pay.

        200 ``{"promised": true, "until": <unix>}`` (lifted in the kernel) → ``Promised(True, until)``;
        403 ``{"eligible": false, "why": ...}`` → ``Promised(False, why=...)``, except ``"why":
        "not_a_recent_caller"``, which raises ``NotRecentCaller``; 409 (not restricted)
        → ``Promised(False, why="not_restricted")``; anything else (400, 503 after a failed kernel
        change, 404 from an enforcer without promises) raises ``EnforcerUnavailable``.
        """
        status, data = await self._call("POST", PROMISE_URL, f"a promise to pay for {address}",
                                        json={"address": address}, answers=(200, 403, 409))
        if status == 409:
            return Promised(False, why="not_restricted")
        if status == 403:  # a refusal is an answer, whatever its body looks like
            why = _text(data.get("why")) if isinstance(data, dict) else ""
            if why == NOT_A_RECENT_CALLER:
                raise NotRecentCaller(f"the enforcer has not seen {address} call the portal lately")
            return Promised(False, why=why or "not_eligible")
        until = _time(data.get("until")) if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("promised") is not True or until is None:
            raise EnforcerUnavailable("malformed promise answer from the enforcer: "
                                      "no JSON object with 'promised': true and 'until'")
        return Promised(True, until=until)

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


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _time(value: Any) -> float | None:
    """A unix time from JSON, or None for null, missing or nonsense."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
