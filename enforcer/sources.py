"""Where the restricted list comes from: a watched file, or an HTTP(S) URL polled.

A source only reads and parses; it hands a complete, validated list to the daemon or
reports why it could not, and the daemon keeps the last good list in force meanwhile. A file
is read once its size and mtime have held still for one poll, so an export being written in
place is not read half-way through. A URL is polled with ETag/If-Modified-Since, and after
failures with jittered exponential backoff, so a struggling billing server is not hammered.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import re
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .address_space import AddressSpace
from .config import SubscribersConfig
from .issues import Issue
from .subscribers import ListError, Subscriber, parse_list

if TYPE_CHECKING:   # imported where used: reading a file source never loads the HTTP client
    import aiohttp

log = logging.getLogger(__name__)

#: Poll period; with the settle check an edit applies within about two periods.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ListUpdate:
    subscribers: list[Subscriber]
    origin: str         # file path, or URL without credentials (``redact_url``): shown in logs and status
    fingerprint: str    # changes whenever the content may have changed
    digest: str = ""    # ``content_digest`` of what was parsed ("" when not known)


def content_digest(data: bytes, name: str, space: AddressSpace | None, content_type: str = "") -> str:
    """The same digest exactly when a parse would give the same list: the bytes, and what else
    ``parse_list`` reads (the name's suffix and the content type pick the format; the address
    space refuses entries). A source compares it with the list in force's before parsing: a
    restart does not parse 100k unchanged lines again (~3 s), and a changed byte still is."""
    digest = hashlib.sha256(data)
    digest.update(repr((name, content_type, space.prefixes if space is not None else None)).encode())
    return digest.hexdigest()


#: The digest of the list in force (``ListIntake.applied_digest``), or None when none is known.
AppliedDigest = Callable[[], "str | None"]


@dataclass(frozen=True)
class SourceFailure:
    origin: str         # as in ListUpdate: never carries credentials
    reason: str         # short label for metrics: "unreadable", "invalid", "internal", "http_503", ...
    message: str        # names file:line where it can


#: Query parameters whose values are credentials (matched anywhere in the name, any case):
#: ``token``, ``access_token``, ``api_key``, ``X-Amz-Signature``, ``sig``, ``password`` ...
_SECRET_PARAM = re.compile(r"token|key|secret|pass|pwd|sig|auth|credential|session", re.IGNORECASE)
REDACTED = "REDACTED"


def redact_url(url: str) -> str:
    """``url`` without credentials, for logs, metrics and ``status``: user:password@ and the
    values of query parameters such as ``token``, ``key``, ``signature`` become ``REDACTED``.
    A path that is not a URL is returned unchanged."""
    try:
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, REDACTED if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="/:,")
        fragment = REDACTED if parts.fragment else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
    except ValueError:    # urlsplit refuses some malformed netlocs: show nothing of it
        return f"{url.partition(':')[0]}://{REDACTED}"


OnList = Callable[[ListUpdate], Awaitable[None]]
OnFailure = Callable[[SourceFailure], Awaitable[None]]
OnUnchanged = Callable[[str], Awaitable[None]]

#: First retry after a failure, and the largest body accepted from a URL.
BACKOFF_START = 5.0
MAX_BODY = 256 * 1024 * 1024


@dataclass(frozen=True)
class Unchanged:
    """``read_list_file(unless=...)``: the file holds the list in force; ``fingerprint`` is the
    one of the file that was read (never a second ``stat``: a list renamed into place meanwhile
    would be taken as read)."""

    fingerprint: str


@overload
def read_list_file(path: str, *, space: AddressSpace | None = None) -> ListUpdate: ...


@overload
def read_list_file(path: str, *, space: AddressSpace | None = None,
                   unless: str | None) -> ListUpdate | Unchanged: ...


def read_list_file(path: str, *, space: AddressSpace | None = None,
                   unless: str | None = None) -> ListUpdate | Unchanged:
    """Read and parse now; raises ``ListError`` (naming file:line) or ``OSError``, nothing else.

    ``space`` (``AddressSpace.from_config``) refuses the list if an entry lies outside
    ``gateway.subscriber_prefixes``. With ``unless``: ``Unchanged``, without parsing, when the
    content's digest is that (the list in force's: nothing to do).
    """
    data, st = _read_regular_file(path)
    digest = content_digest(data, path, space)
    if unless is not None and digest == unless:
        return Unchanged(_fingerprint(st))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ListError([Issue(f"{path}:{line}", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return ListUpdate(parse_list(text, path, space=space), path, _fingerprint(st), digest)


#: Symlinks followed (each root's own) from the configured path to the list file.
MAX_LINKS = 8


def _read_regular_file(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of the list file, refusing what another account could use against the daemon.

    The file may sit in a directory billing's own user writes (the Debian package's drop
    directory), so: a symlink that user made (not root's) is refused, as it could point the
    root daemon at any file root may read, at every hop of a chain of links (root's link may point
    into the drop directory, where billing's own link waits: review), and what the last hop names
    is opened with ``O_NOFOLLOW``, so a symlink swapped in after the check is refused rather than
    followed (security audit: a race read a root-only file); only a regular file is read (a FIFO
    would block the reader for ever; ``O_NONBLOCK`` opens one without waiting), and at most
    ``MAX_BODY`` bytes, as from a URL (``/dev/zero`` would fill the memory).
    """
    target = path
    for _ in range(MAX_LINKS):
        link = os.lstat(target)
        if not stat.S_ISLNK(link.st_mode):
            break
        named = "a symlink" if target == path else f"{target}, a symlink it leads to,"
        if link.st_uid != 0:
            raise ListError([Issue(path, f"{named} owned by uid {link.st_uid}, not root: refused (it could "
                                         "point the daemon at any file root may read); write the list itself there")])
        hop = os.readlink(target)
        again = os.lstat(target)
        if not stat.S_ISLNK(again.st_mode) or again.st_uid != 0 or again.st_ino != link.st_ino:
            raise ListError([Issue(path, "a symlink changed while being followed: refused")])
        target = os.path.join(os.path.dirname(target), hop)
    else:
        raise ListError([Issue(path, f"more than {MAX_LINKS} symlinks to the file: refused")])
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise ListError([Issue(path, "replaced by a symlink while being opened: refused (write the list itself "
                                     "there, renamed into place)")]) from exc
    with open(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ListError([Issue(path, "not a regular file: refused (the list must be a file)")])
        data = handle.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise ListError([Issue(path, f"larger than {MAX_BODY:,} bytes: refused")])
    return data, st


def _fingerprint(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _fingerprint_or_none(path: str) -> str | None:
    try:
        return _fingerprint(os.stat(path))
    except (OSError, ValueError):
        return None


async def _hand_over(what: str, origin: str, call: Awaitable[None], on_failure: OnFailure | None = None) -> None:
    """Run one of the daemon's callbacks. If it raises, the source still goes on reading (a
    source that died would ignore every later list): the error is logged and, when
    ``on_failure`` is given, reported through it as an ``internal`` failure (counted, in status)."""
    try:
        await call
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("event=source_callback_failed callback=%s origin=%s (the source goes on)", what, origin)
        if on_failure is not None:
            failure = SourceFailure(origin, "internal", f"{origin}: the list could not be applied "
                                                        f"({type(exc).__name__}: {exc})")
            await _hand_over("on_failure", origin, on_failure(failure))


class FileSource:
    """Watches one file by polling ``stat`` (works across atomic renames and editors).

    Any failure to read or parse it, expected or not, is a ``SourceFailure`` handed to
    ``on_failure``; the watch goes on and the next change of the file is read.
    """

    def __init__(self, path: str, on_list: OnList, on_failure: OnFailure, *,
                 space: AddressSpace | None = None, applied: AppliedDigest | None = None,
                 on_unchanged: OnUnchanged | None = None) -> None:
        """``applied``: the digest of the list in force; content with that digest is not parsed
        again, ``on_unchanged`` is told instead."""
        self.path = path
        self.on_list = on_list
        self.on_failure = on_failure
        self.space = space
        self.applied_digest = applied
        self.on_unchanged = on_unchanged
        self.applied: str | None = None   # fingerprint of the last content handed over or refused

    async def run(self, stop: asyncio.Event) -> None:
        previous: str | None = None
        while not stop.is_set():
            try:
                current = _fingerprint(os.stat(self.path))
            except (OSError, ValueError) as exc:     # ValueError: a path with a NUL byte
                current = f"missing:{getattr(exc, 'errno', None)}"
            if current != self.applied and current == previous:
                await self.check(current)
            previous = current
            try:
                await asyncio.wait_for(stop.wait(), POLL_SECONDS)
            except TimeoutError:
                pass

    async def check(self, fingerprint: str | None = None) -> None:
        """Read the file now and hand over the result (also used at start-up)."""
        unless = self.applied_digest() if self.applied_digest is not None else None
        try:
            update = await asyncio.to_thread(read_list_file, self.path, space=self.space, unless=unless)
        except OSError as exc:
            failure = SourceFailure(self.path, "unreadable", f"{self.path}: {exc.strerror or exc}")
        except ListError as exc:
            failure = SourceFailure(self.path, "invalid", str(exc))
        except Exception as exc:   # a bug of ours: reported as a list error, never the end of the watch
            log.exception("event=list_read_failed origin=%s", self.path)
            failure = SourceFailure(self.path, "internal", f"{self.path}: the list could not be read "
                                                           f"({type(exc).__name__}: {exc})")
        else:
            if isinstance(update, Unchanged):   # the list in force, byte for byte
                log.info("event=list_unchanged origin=%s (the content of the list in force: not parsed again)",
                         self.path)
                self.applied = fingerprint or update.fingerprint
                if self.on_unchanged is not None:
                    await _hand_over("on_unchanged", self.path, self.on_unchanged(self.path))
                return
            self.applied = fingerprint or update.fingerprint
            await _hand_over("on_list", self.path, self.on_list(update), self.on_failure)
            return
        self.applied = fingerprint
        await _hand_over("on_failure", self.path, self.on_failure(failure))


async def _whole_body(content: aiohttp.StreamReader, cap: int) -> bytes:
    """The body to its end (or its first ``cap`` bytes). ``StreamReader.read(n)`` returns what
    has arrived so far, not ``n`` bytes: a list sent slowly, or one larger than a network
    buffer, came back as its first part, a valid shorter list that lifted everyone after the
    cut (found in a fault audit). A stall before the end is the poll's timeout."""
    parts: list[bytes] = []
    size = 0
    while size < cap and (part := await content.read(min(1 << 20, cap - size))):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


class UrlSource:
    """Polls an http(s) URL; every failure class is reported and changes nothing."""

    def __init__(self, config: SubscribersConfig, on_list: OnList, on_failure: OnFailure,
                 on_unchanged: OnUnchanged, *, space: AddressSpace | None = None,
                 applied: AppliedDigest | None = None) -> None:
        """``applied``: as ``FileSource``'s (a body with the digest of the list in force is not
        parsed again: after a restart the first poll has no ETag to send)."""
        self.applied_digest = applied
        self.config = config
        self.url = config.source
        self.origin = redact_url(config.source)    # what logs, failures and status show
        self.space = space
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
                try:
                    ok = await self.poll(session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:   # a bug of ours: reported, backed off, polled again
                    log.exception("event=list_poll_failed origin=%s", self.origin)
                    ok = await self._fail("internal", f"{self.origin}: the list could not be fetched "
                                                      f"({type(exc).__name__}: {self._clean(str(exc))})")
                self.failures = 0 if ok else self.failures + 1
                try:
                    await asyncio.wait_for(stop.wait(), self.next_delay())
                except TimeoutError:
                    pass

    def _ssl(self) -> ssl.SSLContext | bool:
        """aiohttp's ``ssl=``: ``True`` (its default verification) for plain HTTP, where it is
        unused; for HTTPS a context with the configured CA and client certificate."""
        if not self.url.startswith("https://"):
            return True
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

    async def poll(self, session: aiohttp.ClientSession) -> bool:
        """Fetch once; True when the source answered with a good list or 'not modified'."""
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout)
            async with session.get(self.url, headers=self._headers(), ssl=self._ssl(), timeout=timeout,
                                   allow_redirects=True) as response:
                if response.status == 304:
                    await _hand_over("on_unchanged", self.origin, self.on_unchanged(self.origin))
                    return True
                if response.status != 200:
                    return await self._fail(f"http_{response.status}",
                                            f"{self.origin}: HTTP {response.status} {response.reason or ''}".strip())
                framed = response.content_length is not None or "chunked" in response.headers.get(
                    "Transfer-Encoding", "").lower()
                if not framed:   # then a connection cut after a whole line looks like the end
                    return await self._fail("truncated", f"{self.origin}: the answer gives neither its length "
                                            "(Content-Length) nor chunks, so a cut connection could not be told "
                                            "from its end; refused (serve the list with either)")
                if response.content_length is not None and response.content_length > MAX_BODY:
                    return await self._fail("too_large", f"{self.origin}: {response.content_length} bytes is too large")
                body = await _whole_body(response.content, MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    return await self._fail("too_large", f"{self.origin}: body larger than {MAX_BODY} bytes")
                if (response.content_length is not None and len(body) != response.content_length
                        and response.headers.get("Content-Encoding", "identity").lower() == "identity"):
                    return await self._fail("truncated", f"{self.origin}: body cut short ({len(body)} of "
                                                         f"{response.content_length} bytes)")
                content_type = response.headers.get("Content-Type", "")
                etag = response.headers.get("ETag")
                modified = _usable_last_modified(response.headers.get("Last-Modified"), response.headers.get("Date"))
        except TimeoutError:
            return await self._fail("timeout", f"{self.origin}: no complete answer within {self.config.timeout:g} s")
        except aiohttp.ClientPayloadError as exc:
            return await self._fail("truncated", f"{self.origin}: body cut short ({exc})")
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            return await self._fail("unreachable", f"{self.origin}: {exc}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await self._fail("invalid", f"{self.origin}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        digest = content_digest(body, self.origin, self.space, content_type)
        if self.applied_digest is not None and digest == self.applied_digest():
            self.etag, self.last_modified = etag, modified
            await _hand_over("on_unchanged", self.origin, self.on_unchanged(self.origin))
            return True
        try:
            subscribers = await asyncio.to_thread(parse_list, text, self.origin, content_type,
                                                  space=self.space)
        except ListError as exc:
            return await self._fail("invalid", str(exc))
        self.etag, self.last_modified = etag, modified
        fingerprint = etag or hashlib.sha256(body).hexdigest()
        update = ListUpdate(subscribers, self.origin, fingerprint, digest)
        await _hand_over("on_list", self.origin, self.on_list(update), self.on_failure)
        return True

    async def _fail(self, reason: str, message: str) -> bool:
        failure = SourceFailure(self.origin, reason, self._clean(message))
        await _hand_over("on_failure", self.origin, self.on_failure(failure))
        return False

    def _clean(self, text: str) -> str:
        """``text`` (an error message, perhaps quoting the URL as the HTTP library spells it)
        with every credential of the source URL replaced by ``REDACTED``."""
        text = text.replace(self.url, self.origin)
        for secret in _credentials(self.url):
            text = text.replace(secret, REDACTED)
        return text


def _credentials(url: str) -> list[str]:
    """The secret parts of ``url`` as they may appear in a message: user, password, and the
    values of credential-like query parameters, raw and decoded, longest first."""
    try:
        parts = urlsplit(url)
        found = [parts.username or "", parts.password or ""]
        for raw in parts.query.split("&"):
            name, _, value = raw.partition("=")
            if _SECRET_PARAM.search(name):
                found.append(value)
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAM.search(k)]
    except ValueError:
        return []
    return sorted({f for f in found if f}, key=len, reverse=True)


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
