"""Where the restricted list comes from: a watched file, or an HTTP(S) URL polled.

A source only reads and parses; it hands a complete, validated list to the daemon or
reports why it could not, and the daemon keeps the last good list in force meanwhile. A file
is read once its size and mtime have held still for one poll, so an export being written in
place is not read half-way through. A URL is polled with ETag/If-Modified-Since, and after
failures with jittered exponential backoff, so a struggling billing server is not hammered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import ssl
from email.utils import parsedate_to_datetime
from dataclasses import dataclass
from typing import Awaitable, Callable

from .config import SubscribersConfig
from .subscribers import ListError, Subscriber, parse_list

log = logging.getLogger(__name__)

#: Poll period; with the settle check an edit applies within about two periods.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ListUpdate:
    subscribers: list[Subscriber]
    origin: str         # file path or URL
    fingerprint: str    # changes whenever the content may have changed


@dataclass(frozen=True)
class SourceFailure:
    origin: str
    reason: str         # short label for metrics: "unreadable", "invalid"
    message: str        # names file:line where it can


OnList = Callable[[ListUpdate], Awaitable[None]]
OnFailure = Callable[[SourceFailure], Awaitable[None]]
OnUnchanged = Callable[[str], Awaitable[None]]

#: First retry after a failure, and the largest body accepted from a URL.
BACKOFF_START = 5.0
MAX_BODY = 256 * 1024 * 1024


def read_list_file(path: str) -> ListUpdate:
    """Read and parse now; raises ``ListError`` or ``OSError``."""
    with open(path, encoding="utf-8") as handle:
        st = os.fstat(handle.fileno())
        text = handle.read()
    return ListUpdate(parse_list(text, path), path, _fingerprint(st))


def _fingerprint(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class FileSource:
    """Watches one file by polling ``stat`` (works across atomic renames and editors)."""

    def __init__(self, path: str, on_list: OnList, on_failure: OnFailure) -> None:
        self.path = path
        self.on_list = on_list
        self.on_failure = on_failure
        self.applied: str | None = None   # fingerprint of the last content handed over or refused

    async def run(self, stop: asyncio.Event) -> None:
        previous: str | None = None
        while not stop.is_set():
            try:
                current = _fingerprint(os.stat(self.path))
            except OSError as exc:
                current = f"missing:{exc.errno}"
            if current != self.applied and current == previous:
                await self.check(current)
            previous = current
            try:
                await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def check(self, fingerprint: str | None = None) -> None:
        """Read the file now and hand over the result (also used at start-up)."""
        try:
            update = await asyncio.to_thread(read_list_file, self.path)
        except OSError as exc:
            self.applied = fingerprint
            await self.on_failure(SourceFailure(self.path, "unreadable", f"{self.path}: {exc.strerror or exc}"))
            return
        except ListError as exc:
            self.applied = fingerprint
            await self.on_failure(SourceFailure(self.path, "invalid", str(exc)))
            return
        self.applied = fingerprint or update.fingerprint
        await self.on_list(update)


class UrlSource:
    """Polls an http(s) URL; every failure class is reported and changes nothing."""

    def __init__(self, config: SubscribersConfig, on_list: OnList, on_failure: OnFailure,
                 on_unchanged: OnUnchanged) -> None:
        self.config = config
        self.url = config.source
        self.on_list = on_list
        self.on_failure = on_failure
        self.on_unchanged = on_unchanged
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.failures = 0

    def next_delay(self) -> float:
        """The poll interval when healthy; after failures 5 s, 10 s, 20 s ... capped at it, ±25 %."""
        if self.failures == 0:
            base = self.config.poll_interval
        else:
            base = min(self.config.poll_interval, BACKOFF_START * 2 ** (self.failures - 1))
        return base * random.uniform(0.75, 1.25)

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        async with aiohttp.ClientSession(headers={"User-Agent": "walled-garden"}) as session:
            while not stop.is_set():
                ok = await self.poll(session)
                self.failures = 0 if ok else self.failures + 1
                try:
                    await asyncio.wait_for(stop.wait(), self.next_delay())
                except asyncio.TimeoutError:
                    pass

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        context = ssl.create_default_context(cafile=self.config.ca_file or None)
        if self.config.client_cert:
            context.load_cert_chain(self.config.client_cert, self.config.client_key or None)
        return context

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, application/yaml, text/csv;q=0.9, */*;q=0.5"}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        if self.config.bearer_token_file:
            with open(self.config.bearer_token_file, encoding="utf-8") as handle:
                headers["Authorization"] = f"Bearer {handle.readline().strip()}"
        return headers

    async def poll(self, session: "aiohttp.ClientSession") -> bool:  # noqa: F821
        """Fetch once; True when the source answered with a good list or 'not modified'."""
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout)
            async with session.get(self.url, headers=self._headers(), ssl=self._ssl(), timeout=timeout,
                                   allow_redirects=True) as response:
                if response.status == 304:
                    await self.on_unchanged(self.url)
                    return True
                if response.status != 200:
                    return await self._fail(f"http_{response.status}",
                                            f"{self.url}: HTTP {response.status} {response.reason or ''}".strip())
                if response.content_length is not None and response.content_length > MAX_BODY:
                    return await self._fail("too_large", f"{self.url}: {response.content_length} bytes is too large")
                body = await response.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    return await self._fail("too_large", f"{self.url}: body larger than {MAX_BODY} bytes")
                if response.content_length is not None and len(body) != response.content_length:
                    return await self._fail("truncated", f"{self.url}: body cut short ({len(body)} of "
                                                         f"{response.content_length} bytes)")
                content_type = response.headers.get("Content-Type", "")
                etag = response.headers.get("ETag")
                modified = _usable_last_modified(response.headers.get("Last-Modified"), response.headers.get("Date"))
        except asyncio.TimeoutError:
            return await self._fail("timeout", f"{self.url}: no complete answer within {self.config.timeout:g} s")
        except aiohttp.ClientPayloadError as exc:
            return await self._fail("truncated", f"{self.url}: body cut short ({exc})")
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            return await self._fail("unreachable", f"{self.url}: {exc}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await self._fail("invalid", f"{self.url}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        try:
            subscribers = await asyncio.to_thread(parse_list, text, self.url, content_type)
        except ListError as exc:
            return await self._fail("invalid", str(exc))
        self.etag, self.last_modified = etag, modified
        fingerprint = etag or hashlib.sha256(body).hexdigest()
        await self.on_list(ListUpdate(subscribers, self.url, fingerprint))
        return True

    async def _fail(self, reason: str, message: str) -> bool:
        await self.on_failure(SourceFailure(self.url, reason, message))
        return False


def _usable_last_modified(last_modified: str | None, date: str | None) -> str | None:
    """Last-Modified as a validator only when it is a second or more older than the response.

    It has one-second resolution: an export rewritten within the same second would otherwise
    be answered "304 not modified" forever (RFC 7232 §2.2.2 calls such a date weak).
    """
    if not last_modified or not date:
        return None
    try:
        modified, sent = parsedate_to_datetime(last_modified), parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    return last_modified if (sent - modified).total_seconds() >= 1 else None
