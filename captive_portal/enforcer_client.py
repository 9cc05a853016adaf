"""Asking the enforcer about a caller, over its control socket.

The portal is unprivileged and keeps no state: the enforcer alone knows who is restricted.
It answers ``GET /v1/lookup?address=...`` on the Unix socket ``api.socket``; file permissions
on that socket are the access control, so nothing here needs credentials.

Every failure (no socket, refused, timeout, bad status, malformed answer) becomes one
exception, ``EnforcerUnavailable``: callers must decide what a missing answer means for them
rather than mistake it for "not restricted".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

#: The host part is ignored on a Unix socket; it only has to make a valid URL.
LOOKUP_URL = "http://enforcer/v1/lookup"
DEFAULT_TIMEOUT = 2.0


class EnforcerUnavailable(Exception):
    """The enforcer could not give an answer; the reason is in the message."""


@dataclass(frozen=True)
class Lookup:
    """What the enforcer says about one address."""

    address: str
    restricted: bool
    mode: str        # "free" | "notice" | "throttle" | "walled-garden"
    reason: str      # category for the page ("overdue", ...), "" when none
    reference: str   # code the subscriber quotes to the provider, "" when none

    @classmethod
    def from_json(cls, data: Any) -> "Lookup":
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
                   reason=_text(data.get("reason")), reference=_text(data.get("reference")))


class LookupClient(Protocol):
    """What the app needs from a client; tests pass a fake with the same method."""

    async def lookup(self, address: str) -> Lookup: ...


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
        session = self._get_session()
        try:
            async with session.get(LOOKUP_URL, params={"address": address}) as response:
                if response.status != 200:
                    raise EnforcerUnavailable(
                        f"enforcer answered {response.status} to a lookup of {address}")
                data = await response.json(content_type=None)
            return Lookup.from_json(data)
        except EnforcerUnavailable:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EnforcerUnavailable(
                f"cannot reach the enforcer at {self.socket_path}: {_describe(exc)}") from exc
        except ValueError as exc:  # not JSON, or not the expected shape
            raise EnforcerUnavailable(f"malformed lookup answer from the enforcer: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
