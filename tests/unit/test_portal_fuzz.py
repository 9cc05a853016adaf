"""Fuzzing the portal app: every parser of outside bytes, portal forms and headers.

Arbitrary Host, Accept-Language, Origin, Cookie and forwarding headers, paths, query strings and
form bodies for ``POST /promise`` and ``/continue`` (with and without a good token, so the
handlers are reached too), against the real app on aiohttp's test server and a stand-in enforcer
whose answer is drawn per request (restricted, notice, free, or unreachable). Whatever comes in:
never a 5xx but the documented 503 when the enforcer is unreachable, HTML that parses with every
element closed, RFC 8908 JSON from the API, and redirects only to the portal or a remembered
``http://`` URL. Bounded (a few hundred requests) so it runs in CI in seconds; a second test
writes raw bytes on the socket, for what the client library would refuse to send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_portal import CONFIG_YAML, FREE, NOTICE, OVERDUE, PORTAL_HOST, PORTAL_URL
from yarl import URL

from captive_portal.app import CAPTIVE_JSON, CSRF_KEY, create_app
from captive_portal.enforcer_client import Ack, EnforcerUnavailable, Lookup, NotRecentCaller, Promised, PromiseOffer
from enforcer.config import parse_config

EXAMPLES = 300
#: Elements without an end tag.
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                  "wbr"})
ANSWERS: list[Lookup | None] = [OVERDUE, replace(OVERDUE, promise=PromiseOffer(True, "eligible", 86400.0)),
                                NOTICE, replace(NOTICE, mode="throttle", ack_until=4102444800.0), FREE, None]
ACTIONS: list[Any] = [Ack(True, 4102444800.0), Ack(False, error="no"), Promised(True, 4102444800.0),
                      Promised(False, why="limit_reached"), Promised(False, why="not_restricted"),
                      NotRecentCaller("fuzz"), EnforcerUnavailable("fuzz")]


@dataclass
class Enforcer:
    """A stand-in whose next answers each example sets."""

    lookup_answer: Lookup | None = OVERDUE
    action: Any = None
    failed: bool = False  # raised EnforcerUnavailable during this example

    async def lookup(self, address: str) -> Lookup:
        if self.lookup_answer is None:
            self.failed = True
            raise EnforcerUnavailable("fuzz: down")
        return replace(self.lookup_answer, address=address)

    async def acknowledge(self, address: str) -> Ack:
        return self._act(Ack)

    async def promise(self, address: str) -> Promised:
        return self._act(Promised)

    def _act(self, kind: type) -> Any:
        if isinstance(self.action, kind):
            return self.action
        self.failed = True
        if isinstance(self.action, Exception):
            self.failed = isinstance(self.action, EnforcerUnavailable)
            raise self.action
        raise EnforcerUnavailable("fuzz: an answer of the other kind")


@dataclass
class Portal:
    loop: asyncio.AbstractEventLoop
    client: TestClient
    enforcer: Enforcer

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)


@pytest.fixture(scope="module")
def app_under_fuzz() -> Iterator[Portal]:
    """One server for all examples (a server per example would cost more than the requests)."""
    config = parse_config(CONFIG_YAML)
    config = replace(config, portal=replace(config.portal, posts_per_minute=1_000_000))
    enforcer = Enforcer()
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(config, enforcer)), loop=loop)
    loop.run_until_complete(client.start_server())
    try:
        yield Portal(loop, client, enforcer)
    finally:
        loop.run_until_complete(client.close())
        loop.close()


class _Checker(HTMLParser):
    """Every element closed, in order; the document has one ``html`` with a ``lang``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.langs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "html":
            self.langs.append(dict(attrs).get("lang"))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.problems.append(f"self-closing <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def assert_well_formed_html(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>"), text[:80]
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.problems and not checker.stack, (checker.problems, checker.stack, text)
    assert len(checker.langs) == 1 and checker.langs[0], text[:200]


async def exchange(portal: Portal, method: str, url: URL, headers: dict[str, str], data: Any) -> int:
    """One request, and everything that must hold for its answer."""
    response = await portal.client.session.request(method, url, headers=headers, data=data, allow_redirects=False)
    body = await response.read()
    status = response.status
    down = portal.enforcer.failed
    assert status < 500 or (status == 503 and down and "Retry-After" in response.headers), (status, body[:300])
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/html"):
        assert content_type == "text/html; charset=utf-8"
        if method != "HEAD":
            assert_well_formed_html(body.decode("utf-8"))
        assert response.headers["Cache-Control"] == "no-store"
        assert "Content-Security-Policy" in response.headers
    elif content_type == CAPTIVE_JSON and method != "HEAD":
        answer = json.loads(body)
        assert isinstance(answer["captive"], bool) and answer["user-portal-url"] == PORTAL_URL
    elif method == "HEAD" or status == 303:  # HEAD: no body; "Continue": a Location and nothing else
        assert not body
    elif status != 413:  # aiohttp's own plain answer to an oversized body
        assert status == 503 and content_type.split(";")[0] == "application/json", (status, content_type, body[:300])
    if status == 405:  # a method the route does not take: the small HTML page, saying which it takes
        assert content_type.startswith("text/html") and response.headers["Allow"], response.headers
    if status in (301, 302, 303, 307, 308):
        location = response.headers["Location"]
        assert location.startswith((PORTAL_URL, "http://")) and not any(c in location for c in " \r\n<>\"")
    return status


# --- strategies ------------------------------------------------------------------------------------

#: Header text a client can send (no CR, LF or NUL), any script.
header_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60)
hosts = st.one_of(
    st.sampled_from([PORTAL_HOST, PORTAL_HOST.upper() + ".", f"{PORTAL_HOST}:80", f"{PORTAL_HOST}:8080",
                     "example.com", "127.0.0.1", "[::1]", "[2001:db8::1]:80", "", ":", "[", "a b", "xn--d1acj3b"]),
    header_text)
languages = st.one_of(
    st.lists(st.sampled_from(["en", "cs", "hu", "es", "uk", "ru", "pt", "de", "*", "en-GB", "pt-BR", "zz-Latn"])
             .flatmap(lambda tag: st.sampled_from([tag, f"{tag};q=0.5", f"{tag};q=x", f"{tag};q=1e9"])),
             max_size=4).map(",".join),
    header_text)
origins = st.one_of(st.sampled_from([PORTAL_URL.rstrip("/"), "http://evil.example", "null", "https://" + PORTAL_HOST,
                                     "http://[::1", "http://portal.isp.example:99999"]), header_text)
path_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="#?")
paths = st.one_of(st.sampled_from(["/", "/api/captive", "/promise", "/continue", "/nope", "//evil.example/",
                                   "/%00", "/%ff%fe", "/..%2f..", "/generate_204"]),
                  st.text(path_chars, max_size=40).map(lambda p: "/" + p))
queries = st.one_of(st.just(""), st.sampled_from(["lang=cs", "lang=", "lang=xx", "lang=%ff", "lang=cs&lang=ru"]),
                    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="#"),
                            max_size=40))
#: Form text as a browser sends it: any script, but no control characters in field names (the
#: client refuses them); the values are percent-encoded, so anything goes there.
form_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)
field_names = st.sampled_from(["csrf", "lang", "address", "next", "url"]) | form_text
forms = st.dictionaries(field_names, st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=5)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], Any, Lookup | None, Any, str]:
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "POST", "PUT", "OPTIONS"]))
    path = draw(paths)
    if method == "POST" and draw(st.booleans()):
        path = draw(st.sampled_from(["/promise", "/continue"]))
    query = draw(queries)
    headers: dict[str, str] = {}
    # Half the requests are for the portal itself, so the handlers behind the redirect are reached.
    headers["Host"] = draw(st.one_of(st.just(PORTAL_HOST), hosts))
    for name, values in (("Accept-Language", languages), ("Origin", origins),
                         ("Cookie", header_text), ("X-Forwarded-For", header_text), ("Accept", header_text),
                         ("Referer", header_text)):
        if draw(st.booleans()):
            headers[name] = draw(values)
    data: Any = None
    token = "none"
    if method == "POST" and draw(st.booleans()):
        # A post that passes the guard (portal host, own origin or none, a good token), so the
        # handlers, and their every enforcer answer, see arbitrary forms, languages and cookies.
        path = draw(st.sampled_from(["/promise", "/continue"]))
        headers["Host"] = PORTAL_HOST
        headers.pop("Origin", None)
        if draw(st.booleans()):
            headers["Origin"] = PORTAL_URL.rstrip("/")
        data, token = draw(forms), "good"
    elif method == "POST":
        kind = draw(st.sampled_from(["form", "form", "bytes", "json"]))
        if kind == "form":
            data = draw(forms)
            token = draw(st.sampled_from(["none", "good", "good"]))
        elif kind == "bytes":
            data = draw(st.binary(max_size=200))
            headers["Content-Type"] = draw(st.sampled_from(["application/x-www-form-urlencoded",
                                                            "multipart/form-data; boundary=x",
                                                            "multipart/form-data", "text/plain"]) | header_text)
        else:
            data = json.dumps(draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)))
            headers["Content-Type"] = "application/json"
    return (method, path + ("?" + query if query else ""), headers, data, draw(st.sampled_from(ANSWERS)),
            draw(st.sampled_from(ACTIONS)), token)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_no_request_gets_a_server_error_or_a_broken_page(app_under_fuzz: Portal, request: Any) -> None:
    method, target, headers, data, lookup, action, token = request
    portal = app_under_fuzz
    portal.enforcer.lookup_answer, portal.enforcer.action, portal.enforcer.failed = lookup, action, False
    if token == "good" and isinstance(data, dict):
        data = {**data, "csrf": portal.client.app[CSRF_KEY].issue("127.0.0.1")}
    server = portal.client.server
    url = URL(f"http://{server.host}:{server.port}{target}", encoded=True)
    status = portal.run(exchange(portal, method, url, headers, data))
    event(f"{method} {status}")


# --- raw bytes ---------------------------------------------------------------------------------------

raw_header_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.binary(min_size=1, max_size=60).map(lambda b: b"/" + b.replace(b" ", b"").replace(b"\r", b"")
                                                      .replace(b"\n", b"")),
       host=raw_header_bytes, language=raw_header_bytes, cookie=raw_header_bytes,
       method=st.sampled_from([b"GET", b"POST"]), body=st.binary(max_size=80))
def test_raw_bytes_on_the_socket_never_get_a_server_error(app_under_fuzz: Portal, target: bytes, host: bytes,
                                                           language: bytes, cookie: bytes, method: bytes,
                                                           body: bytes) -> None:
    portal = app_under_fuzz
    portal.enforcer.lookup_answer, portal.enforcer.action = OVERDUE, Promised(False, why="limit_reached")
    portal.enforcer.failed = False
    head = (method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nAccept-Language: " + language
            + b"\r\nCookie: " + cookie + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    server = portal.client.server

    async def send() -> bytes:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(head + body)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            writer.close()

    answer = portal.run(send())
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]  # 1.0: the parser refused it
    status = int(status_line.split()[1])
    assert status < 500, answer[:500]
    head_part, _, page = answer.partition(b"\r\n\r\n")
    if b"content-type: text/html" in head_part.lower():
        assert_well_formed_html(page.decode("utf-8"))
