"""Captive portal (docs/reference.md, Portal): redirects, the page, languages, the RFC 8908 API, metrics, the client.

The app runs for real on aiohttp's test server; the enforcer is a fake client, except in the
client tests, which talk HTTP to a real aiohttp server on a temporary Unix socket. The notice
flow and POST safety are in ``test_portal_continue``, branding in ``test_portal_branding``;
both use the helpers here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from portal_helpers import unix_enforcer

from captive_portal.app import CAPTIVE_JSON, REGISTRY_KEY, caller_address, create_app
from captive_portal.branding import text_placeholders
from captive_portal.catalogues import EN, LANGUAGE_NAMES, MESSAGES
from captive_portal.enforcer_client import Ack, EnforcerClient, EnforcerUnavailable, Lookup
from captive_portal.language import choose_language, page_language, parse_accept_language
from captive_portal.messages import PLACEHOLDERS, MessageKey, Messages, reason_key
from captive_portal.page import render_page
from captive_portal.portal_url import PortalUrl, parse_host_header
from enforcer.config import LANGUAGES, Config, PaymentLink, Provider, parse_config

PORTAL_HOST = "portal.isp.example"
PORTAL_URL = "http://portal.isp.example/"
WEBSITE = "http://pay.isp.example/"

CONFIG_YAML = f"""
state_dir: /nonexistent/wg-unit
subscribers: {{source: /nonexistent/wg-unit/list.yaml}}
portal:
  listen: "0.0.0.0:8080"
  url: "{PORTAL_URL}"
  provider: {{name: "Example ISP", phone: "+420 123 456 789", email: "help@isp.example",
              website: "{WEBSITE}", hours: "Mon-Fri 8-18"}}
api: {{socket: /nonexistent/wg-unit/control.sock}}
"""

OVERDUE = Lookup("127.0.0.1", True, "walled-garden", "overdue", "R-7F3K", "C-1001")
FREE = Lookup("127.0.0.1", False, "free", "", "")
NOTICE = Lookup("127.0.0.1", True, "notice", "overdue", "WG-7K2M-Q9XD", "C-2002")
ACKED = Ack(True, 4102444800.0)  # acknowledged until 2100

#: What Android, Apple, Windows and Firefox fetch to find out whether they are behind a portal.
OS_PROBES = [
    ("connectivitycheck.gstatic.com", "/generate_204"),
    ("captive.apple.com", "/hotspot-detect.html"),
    ("www.msftconnecttest.com", "/connecttest.txt"),
    ("detectportal.firefox.com", "/canonical.html"),
]


@pytest.fixture
def config() -> Config:
    return parse_config(CONFIG_YAML)


def with_provider(config: Config, **fields: str) -> Config:
    return replace(config, portal=replace(config.portal, provider=replace(config.portal.provider, **fields)))


def with_portal(config: Config, **fields: Any) -> Config:
    return replace(config, portal=replace(config.portal, **fields))


class FakeEnforcer:
    """Answers lookups with a fixed result, or fails like an unreachable enforcer.

    ``ack`` is what ``acknowledge`` answers (None: unreachable); an acknowledgement turns a
    notice lookup into an acknowledged one, as the real enforcer would.
    """

    def __init__(self, result: Lookup | None = OVERDUE, ack: Ack | None = ACKED) -> None:
        self.result = result
        self.ack = ack
        self.asked: list[str] = []
        self.acknowledged: list[str] = []

    async def lookup(self, address: str) -> Lookup:
        self.asked.append(address)
        if self.result is None:
            raise EnforcerUnavailable("cannot reach the enforcer: test")
        return self.result

    async def acknowledge(self, address: str) -> Ack:
        self.acknowledged.append(address)
        if self.ack is None:
            raise EnforcerUnavailable("cannot reach the enforcer: test")
        if self.ack.acknowledged and self.result is not None:
            self.result = replace(self.result, ack_until=self.ack.until)
        return self.ack


class MustNotAsk:
    """A client that fails the test if the portal asks the enforcer anything."""

    async def lookup(self, address: str) -> Lookup:
        raise AssertionError(f"lookup of {address} on a redirected request")

    async def acknowledge(self, address: str) -> Ack:
        raise AssertionError(f"acknowledge of {address} on a redirected request")


@asynccontextmanager
async def portal(config: Config, enforcer: Any = None) -> AsyncIterator[TestClient]:
    app = create_app(config, enforcer if enforcer is not None else FakeEnforcer())
    async with TestClient(TestServer(app)) as client:
        yield client


def on_portal(**headers: str) -> dict[str, str]:
    return {"Host": PORTAL_HOST, **headers}


def requests_total(client: TestClient, kind: str) -> float:
    value = client.app[REGISTRY_KEY].get_sample_value("walled_garden_portal_requests_total", {"kind": kind})
    assert value is not None
    return value


# --- redirect ----------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/some/page.html?q=1&x=%3C"),
                                         ("POST", "/login"), ("HEAD", "/"), ("PUT", "/api/captive"),
                                         ("GET", "/api/captive")])
async def test_foreign_host_is_redirected_without_lookup(config: Config, method: str, path: str) -> None:
    enforcer = FakeEnforcer()
    async with portal(config, enforcer) as client:
        response = await client.request(method, path, headers={"Host": "example.com"},
                                        data=b"user=a&password=b" if method in ("POST", "PUT") else None,
                                        allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == PORTAL_URL
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Connection"] == "close"
        assert response.headers["Content-Type"].startswith("text/html")
        if method != "HEAD":
            assert f'href="{PORTAL_URL}"' in await response.text()
        assert requests_total(client, "redirect") == 1
    assert enforcer.asked == []


@pytest.mark.asyncio
@pytest.mark.parametrize("host,path", OS_PROBES)
async def test_os_captive_probes_get_the_302_without_any_enforcer_call(config: Config, host: str, path: str) -> None:
    async with portal(config, MustNotAsk()) as client:
        response = await client.get(path, headers={"Host": host, "User-Agent": "probe"}, allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == PORTAL_URL
        assert response.headers["Cache-Control"] == "no-store"
        assert requests_total(client, "redirect") == 1
        assert requests_total(client, "error") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["example.com", "portal.isp.example:8080", "portal.isp.example.evil",
                                  "100.64.0.1", "[2001:db8::1]", "portal.isp.example:abc", ""])
async def test_anything_but_the_portal_host_and_port_redirects(config: Config, host: str) -> None:
    async with portal(config) as client:
        response = await client.get("/", headers={"Host": host}, allow_redirects=False)
        assert response.status == 302, host


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["portal.isp.example", "PORTAL.ISP.Example", "portal.isp.example:80",
                                  "portal.isp.example."])
async def test_portal_host_matches_case_insensitively_with_default_port(config: Config, host: str) -> None:
    async with portal(config) as client:
        response = await client.get("/", headers={"Host": host}, allow_redirects=False)
        assert response.status == 200, host


def test_on_https_the_portal_host_is_enough_whatever_the_port() -> None:
    portal_url = PortalUrl.parse("http://portal.isp.example/")
    assert portal_url.names_host("portal.isp.example:8443") and portal_url.names_host("PORTAL.isp.example")
    assert not portal_url.names_host("example.com:8443") and not portal_url.names_host(None)
    assert portal_url.origin == ("http", "portal.isp.example", 80)


def test_portal_url_parsing() -> None:
    https = PortalUrl.parse("https://Portal.Example:8443/walled/")
    assert (https.host, https.port, https.path) == ("portal.example", 8443, "/walled/")
    assert https.is_addressed_by("portal.example:8443")
    assert not https.is_addressed_by("portal.example")
    assert PortalUrl.parse("https://p.example").is_addressed_by("p.example:443")
    v6 = PortalUrl.parse("http://[2001:db8::1]:8080/")
    assert v6.is_addressed_by("[2001:DB8::1]:8080") and not v6.is_addressed_by("[2001:db8::1]")
    assert not v6.is_addressed_by(None)
    assert parse_host_header("[2001:db8::1", 80) is None
    assert parse_host_header("example.com:99999", 80) is None
    assert parse_host_header("example.com:", 80) is None
    with pytest.raises(ValueError):
        PortalUrl.parse("ftp://portal.example/")


# --- the page ----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_restricted_page_in_english(config: Config) -> None:
    enforcer = FakeEnforcer(OVERDUE)
    async with portal(config, enforcer) as client:
        response = await client.get("/", headers=on_portal())
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Language"] == "en"
        page = await response.text()
    assert enforcer.asked == ["127.0.0.1"]
    assert '<html lang="en">' in page
    assert '<meta name="viewport"' in page
    assert "Your internet service is restricted" in page
    assert "Web access is limited until your account is settled." in page
    assert EN["reason_overdue"] in page
    assert f'<a href="{WEBSITE}">{WEBSITE}</a>' in page
    assert 'href="tel:+420123456789">+420 123 456 789</a>' in page
    assert 'href="mailto:help@isp.example">help@isp.example</a>' in page
    assert "Mon-Fri 8-18" in page
    assert "<code>R-7F3K</code>" in page
    assert "This page comes from your internet provider, Example ISP." in page
    assert ("We will never ask for your password or card details on this page. If in doubt, call us on "
            '<a href="tel:+420123456789">+420 123 456 789</a>.') in page
    assert "<form" not in page  # walled in: nothing to continue to
    assert "C-1001" not in page and "127.0.0.1" not in page  # portal.show_account is off
    assert page.count("<h1>") == 1


@pytest.mark.asyncio
async def test_payment_links_are_buttons_next_to_the_website(config: Config) -> None:
    links = (PaymentLink("Pay by card", "https://pay.isp.example/card?a=1&b=2"),
             PaymentLink("Bank <transfer>", "https://pay.isp.example/bank"))
    async with portal(with_portal(config, payment_links=links)) as client:
        page = await (await client.get("/", headers=on_portal())).text()
    assert '<a href="https://pay.isp.example/card?a=1&amp;b=2" class="button">Pay by card</a>' in page
    assert '<a href="https://pay.isp.example/bank" class="button">Bank &lt;transfer&gt;</a>' in page
    assert f'<a href="{WEBSITE}">{WEBSITE}</a>' in page


@pytest.mark.asyncio
async def test_show_account_adds_the_account_id_and_the_callers_address(config: Config) -> None:
    async with portal(with_portal(config, show_account=True)) as client:
        page = await (await client.get("/", headers=on_portal())).text()
    assert "<code>C-1001</code>" in page and "<code>127.0.0.1</code>" in page
    assert EN["account_heading"] in page


@pytest.mark.asyncio
async def test_active_page_when_not_restricted(config: Config) -> None:
    async with portal(config, FakeEnforcer(FREE)) as client:
        page = await (await client.get("/", headers=on_portal())).text()
    assert "Your service is active" in page
    assert EN["heading_restricted"] not in page and EN["summary_restricted"] not in page
    assert EN["pay_heading"] not in page
    assert "help@isp.example" in page  # contact details stay useful


@pytest.mark.asyncio
async def test_lookup_failure_still_shows_a_page_without_reason(config: Config) -> None:
    """A page (200) with how to pay and whom to call; what it claims: test_portal_unavailable."""
    async with portal(config, FakeEnforcer(None)) as client:
        response = await client.get("/", headers=on_portal())
        assert response.status == 200
        page = await response.text()
        assert client.app[REGISTRY_KEY].get_sample_value("walled_garden_portal_lookup_failures_total") == 1
        assert requests_total(client, "page") == 1
    assert f"<h1>{EN['heading_unknown']}</h1>" in page
    assert "Why:" not in page and "<code>" not in page and "<form" not in page
    assert f'href="{WEBSITE}"' in page


@pytest.mark.parametrize("reason,key", [("overdue", "reason_overdue"), ("suspended", "reason_suspended"),
                                        ("notice", "reason_notice"), ("Overdue", "reason_overdue"),
                                        ("fair_use", "reason_fair_use"), ("Fair-Use", "reason_fair_use"),
                                        ("security", "reason_security"), ("verification", "reason_verification"),
                                        ("fraud-check", "reason_other"), ("", "reason_other")])
def test_reason_is_a_category_sentence(config: Config, reason: str, key: MessageKey) -> None:
    assert reason_key(reason) == key
    page = render_page(replace(OVERDUE, reason=reason), config.portal.provider, "en")
    assert EN[key] in page
    assert reason not in page.replace(EN[key], "") or reason in ("", "notice", "security")


def test_page_without_optional_provider_details() -> None:
    page = render_page(replace(OVERDUE, reference=""), Provider(), "en")
    assert EN["pay_contact"] in page
    assert f"<h2>{EN['contact_heading']}</h2>" not in page
    assert EN["trust_unnamed"] in page and EN["trust_never"] in page
    assert "tel:" not in page  # no phone, no "call us on"
    assert "<code>" not in page


def test_everything_from_config_and_enforcer_is_escaped() -> None:
    provider = Provider(name="<script>alert(1)</script>", phone='+1 "5" <6>', email="a@b.example\"><x",
                        website="javascript:alert(1)", hours="<b>24/7</b>")
    lookup = replace(OVERDUE, reason="<i>", reference='"><img src=x>')
    page = render_page(lookup, provider, "en")
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="tel:+1&quot;5&quot;&lt;6&gt;"' in page
    assert "mailto:" not in page           # not an address we dare to link
    assert 'href="javascript' not in page  # shown as text, never as a link
    assert "javascript:alert(1)" in page
    # the trust line's placeholders are filled with escaped values, too
    assert "This page comes from your internet provider, &lt;script&gt;alert(1)&lt;/script&gt;." in page


def test_page_is_small_and_self_contained(config: Config) -> None:
    for lookup in (OVERDUE, FREE, None):
        page = render_page(lookup, config.portal.provider, "en")
        assert len(page.encode()) < 30_000
        assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {WEBSITE}
        assert page.count("<h1>") == 1
        assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|@import|url\(", page, re.IGNORECASE)


# --- languages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header,expected", [
    (None, "en"), ("", "en"), ("en-GB", "en"),
    ("cs-CZ,cs;q=0.9,en;q=0.8", "cs"),
    ("en;q=0.2, cs;q=0.9", "cs"),        # weight, not order, decides
    ("fr, cs;q=0.5, en;q=0.4", "cs"),     # first acceptable one we have
    ("cs;q=0, en", "en"),                 # q=0 means "not this"
    ("fr-FR, de;q=0.5", "en"),            # nothing we have: fallback
    ("*", "en"), ("cs;q=abc, en;q=0.1", "en"), ("cs;q=2", "en"),
    ("pt-BR;q=0.8, CS-cz;q=0.7", "cs"),
])
def test_language_choice(header: str | None, expected: str) -> None:
    assert choose_language(header, {"en", "cs"}) == expected


def test_accept_language_parsing_keeps_order_for_equal_weights() -> None:
    assert parse_accept_language("de, en;q=0.5, fr") == [("de", 1.0), ("fr", 1.0), ("en", 0.5)]


def test_page_language_query_beats_the_header_and_falls_back_to_the_default() -> None:
    have = set(LANGUAGES)
    assert page_language("cs", "en-US,en;q=0.9", have) == "cs"
    assert page_language("PT-br", None, have) == "pt"
    assert page_language("xx", "hu", have) == "hu"       # an unknown ?lang= is ignored
    assert page_language("", "de, fr;q=0.5", have, "es") == "es"
    assert page_language(None, None, have, "uk") == "uk"


def test_every_language_has_every_message() -> None:
    """Every catalogue is complete: each key, non-empty, the same placeholders as English."""
    required = Messages.__required_keys__
    assert set(MESSAGES) == set(LANGUAGES) == set(LANGUAGE_NAMES)
    assert set(MessageKey.__args__) == required  # type: ignore[attr-defined]
    for language, messages in MESSAGES.items():
        assert set(messages) == required, language
        for key, text in messages.items():
            assert isinstance(text, str) and text.strip() == text and text, (language, key)
            names, stray = text_placeholders(text)
            assert names == set(PLACEHOLDERS.get(key, ())) and not stray, (language, key)
            assert "<" not in text and "&" not in text, (language, key)  # plain text, never HTML


@pytest.mark.parametrize("language", [lang for lang in LANGUAGES if lang != "en"])
def test_every_language_is_really_translated(language: str) -> None:
    same = [key for key, text in MESSAGES[language].items() if text == EN[key]]  # type: ignore[literal-required]
    assert set(same) <= {"contact_phone", "contact_email"}, same  # "Telefon", "E-mail" may match


@pytest.mark.asyncio
async def test_page_follows_accept_language(config: Config) -> None:
    async with portal(config) as client:
        czech = await client.get("/", headers=on_portal(**{"Accept-Language": "cs-CZ,cs;q=0.9,en;q=0.8"}))
        other = await client.get("/", headers=on_portal(**{"Accept-Language": "de-DE, fr;q=0.5"}))
        weighted = await client.get("/", headers=on_portal(**{"Accept-Language": "cs;q=0.3, ru;q=0.9"}))
        assert czech.headers["Content-Language"] == "cs"
        assert czech.headers["Vary"] == "Accept-Language"
        page = await czech.text()
        assert '<html lang="cs">' in page and MESSAGES["cs"]["heading_restricted"] in page
        assert '<html lang="en">' in await other.text()
        assert MESSAGES["ru"]["heading_restricted"] in await weighted.text()


@pytest.mark.asyncio
async def test_lang_query_overrides_accept_language_and_the_switcher_links_every_language(config: Config) -> None:
    async with portal(config) as client:
        response = await client.get("/?lang=hu", headers=on_portal(**{"Accept-Language": "cs"}))
        assert response.headers["Content-Language"] == "hu"
        page = await response.text()
    assert '<html lang="hu">' in page and MESSAGES["hu"]["heading_restricted"] in page
    nav = re.search(r'<nav aria-label="([^"]+)">(.*?)</nav>', page, re.DOTALL)
    assert nav and nav.group(1) == MESSAGES["hu"]["language_label"]
    for code, name in LANGUAGE_NAMES.items():
        assert f'href="/?lang={code}" hreflang="{code}" lang="{code}"' in nav.group(2)
        assert f">{name}</a>" in nav.group(2)
    assert nav.group(2).count('aria-current="true"') == 1 and 'lang="hu" aria-current="true"' in nav.group(2)


@pytest.mark.asyncio
async def test_default_language_is_the_fallback(config: Config) -> None:
    async with portal(with_portal(config, default_language="es")) as client:
        nothing = await client.get("/", headers=on_portal())
        unknown = await client.get("/?lang=de", headers=on_portal(**{"Accept-Language": "de, fr"}))
        english = await client.get("/", headers=on_portal(**{"Accept-Language": "en"}))
        assert nothing.headers["Content-Language"] == "es"
        assert unknown.headers["Content-Language"] == "es"
        assert english.headers["Content-Language"] == "en"


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_language_renders_every_state(config: Config, language: str) -> None:
    m = MESSAGES[language]
    for lookup, heading in ((OVERDUE, "heading_restricted"), (FREE, "heading_active"),
                            (NOTICE, "heading_notice"), (replace(NOTICE, mode="throttle"), "heading_throttle"),
                            (replace(NOTICE, ack_until=time.time() + 60), "heading_acknowledged"),
                            (None, "heading_unknown")):
        page = render_page(lookup, config.portal.provider, language)
        assert f'<html lang="{language}">' in page
        assert f"<h1>{m[heading]}</h1>" in page, (language, heading)  # type: ignore[literal-required]


# --- RFC 8908 API ------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("lookup,captive", [(OVERDUE, True), (FREE, False)])
async def test_captive_api(config: Config, lookup: Lookup, captive: bool) -> None:
    enforcer = FakeEnforcer(lookup)
    async with portal(config, enforcer) as client:
        response = await client.get("/api/captive", headers=on_portal())
        assert response.status == 200
        assert response.headers["Content-Type"] == CAPTIVE_JSON
        assert response.headers["Cache-Control"] == "private, no-store"
        assert await response.json(content_type=CAPTIVE_JSON) == {"captive": captive,
                                                                  "user-portal-url": PORTAL_URL}
        assert requests_total(client, "captive_api") == 1
    assert enforcer.asked == ["127.0.0.1"]


@pytest.mark.asyncio
async def test_captive_api_answers_503_when_the_enforcer_is_unavailable(config: Config) -> None:
    async with portal(config, FakeEnforcer(None)) as client:
        response = await client.get("/api/captive", headers=on_portal())
        assert response.status == 503
        assert response.headers["Cache-Control"] == "private, no-store"
        body = await response.json()
        assert body["error"] == "enforcer-unavailable" and "captive" not in body
        assert body["user-portal-url"] == PORTAL_URL
        assert requests_total(client, "error") == 1
        assert requests_total(client, "captive_api") == 0


@pytest.mark.asyncio
async def test_captive_api_for_notice_subscribers(config: Config) -> None:
    """Captive until the notice is acknowledged; then free, with the time the acknowledgement lasts."""
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        before = await (await client.get("/api/captive", headers=on_portal())).json(content_type=CAPTIVE_JSON)
        enforcer.result = replace(NOTICE, ack_until=time.time() + 3600)
        after = await (await client.get("/api/captive", headers=on_portal())).json(content_type=CAPTIVE_JSON)
        enforcer.result = replace(NOTICE, ack_until=time.time() - 1)  # lapsed: captive again
        lapsed = await (await client.get("/api/captive", headers=on_portal())).json(content_type=CAPTIVE_JSON)
    assert before == {"captive": True, "user-portal-url": PORTAL_URL}
    assert after["captive"] is False and after["user-portal-url"] == PORTAL_URL
    assert 3590 <= after["seconds-remaining"] <= 3600
    assert lapsed == {"captive": True, "user-portal-url": PORTAL_URL}


def test_caller_address_unwraps_ipv4_mapped_ipv6() -> None:
    def request(remote: str | None) -> Any:
        return SimpleNamespace(remote=remote)

    assert caller_address(request("::ffff:100.64.0.10")) == "100.64.0.10"
    assert caller_address(request("2001:db8::10")) == "2001:db8::10"
    assert caller_address(request(None)) is None
    assert caller_address(request("not-an-ip")) is None


# --- 404 and metrics ---------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_unknown_path_on_the_portal_host_is_404(config: Config) -> None:
    enforcer = FakeEnforcer()
    async with portal(config, enforcer) as client:
        response = await client.get("/wp-login.php", headers=on_portal())
        assert response.status == 404
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.headers["Cache-Control"] == "no-store"
        assert PORTAL_URL in await response.text()
        assert requests_total(client, "not_found") == 1
    assert enforcer.asked == []


@pytest.mark.asyncio
async def test_every_request_is_counted_by_kind(config: Config) -> None:
    async with portal(config) as client:
        assert {kind: requests_total(client, kind)
                for kind in ("redirect", "page", "captive_api", "not_found", "error")} == dict.fromkeys(
            ("redirect", "page", "captive_api", "not_found", "error"), 0.0)
        assert all(requests_total(client, kind) == 0 for kind in ("continue", "rate_limited", "forbidden"))
        for _ in range(3):
            await client.get("/x", headers={"Host": "example.org"}, allow_redirects=False)
        await client.post("/", headers={"Host": "example.org"}, allow_redirects=False)
        await client.get("/", headers=on_portal())
        await client.get("/", headers=on_portal())
        await client.get("/api/captive", headers=on_portal())
        await client.get("/nope", headers=on_portal())
        assert (await client.post("/", headers=on_portal())).status == 405
        assert requests_total(client, "redirect") == 4
        assert requests_total(client, "page") == 2
        assert requests_total(client, "captive_api") == 1
        assert requests_total(client, "not_found") == 2
        assert requests_total(client, "error") == 0


@pytest.mark.asyncio
async def test_a_crashing_lookup_counts_as_error(config: Config) -> None:
    class Broken:
        async def lookup(self, address: str) -> Lookup:
            raise RuntimeError("bug")

    async with portal(config, Broken()) as client:
        assert (await client.get("/", headers=on_portal())).status == 500
        assert requests_total(client, "error") == 1


@pytest.mark.asyncio
async def test_each_app_has_its_own_registry(config: Config) -> None:
    async with portal(config) as first, portal(config) as second:
        await first.get("/", headers={"Host": "a.example"}, allow_redirects=False)
        assert requests_total(first, "redirect") == 1
        assert requests_total(second, "redirect") == 0


# --- the enforcer client -----------------------------------------------------------------------

async def answer_restricted(request: web.Request) -> web.Response:
    return web.json_response({"address": request.query["address"], "restricted": True,
                              "mode": "walled-garden", "reason": "overdue", "reference": "R-1",
                              "subscriber": "C-1001"})


@pytest.mark.asyncio
async def test_enforcer_client_returns_a_lookup(tmp_path: Path) -> None:
    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, answer_restricted) as seen:
        client = EnforcerClient(str(socket_path))
        try:
            assert await client.lookup("100.64.0.10") == Lookup("100.64.0.10", True, "walled-garden",
                                                                "overdue", "R-1", "C-1001")
            assert (await client.lookup("2001:db8::10")).address == "2001:db8::10"
        finally:
            await client.close()
    assert seen == [{"address": "100.64.0.10"}, {"address": "2001:db8::10"}]


@pytest.mark.asyncio
async def test_enforcer_client_fills_in_missing_optional_fields(tmp_path: Path) -> None:
    async def free(request: web.Request) -> web.Response:
        return web.json_response({"address": "10.0.0.1", "restricted": False, "mode": "free",
                                  "reason": None, "subscriber": None, "ack_until": None})

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, free):
        client = EnforcerClient(str(socket_path))
        try:
            assert await client.lookup("10.0.0.1") == Lookup("10.0.0.1", False, "free", "", "")
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_enforcer_client_reads_ack_until(tmp_path: Path) -> None:
    async def notice(request: web.Request) -> web.Response:
        return web.json_response({"address": "10.0.0.1", "restricted": True, "mode": "notice",
                                  "reason": "overdue", "reference": "WG-1", "subscriber": "C-2",
                                  "ack_until": 1900000000})

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, notice):
        client = EnforcerClient(str(socket_path))
        try:
            lookup = await client.lookup("10.0.0.1")
        finally:
            await client.close()
    assert lookup.ack_until == 1900000000.0 and lookup.in_notice
    assert lookup.acknowledged(1899999999.0) and not lookup.acknowledged(1900000000.0)
    assert not lookup.captive(1899999999.0) and lookup.captive(1900000001.0)


@pytest.mark.asyncio
@pytest.mark.parametrize("answer,expected", [
    (web.json_response({"acknowledged": True, "until": 1900000000}), Ack(True, 1900000000.0)),
    (web.json_response({"error": "C-1 is in walled-garden mode"}, status=409),
     Ack(False, error="C-1 is in walled-garden mode")),
    (web.Response(status=409, text="no"), Ack(False, error="not in notice or throttle mode")),
])
async def test_enforcer_client_acknowledges(tmp_path: Path, answer: web.Response, expected: Ack) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, answer_restricted, handler) as seen:
        client = EnforcerClient(str(socket_path))
        try:
            assert await client.acknowledge("100.64.0.10") == expected
        finally:
            await client.close()
    assert seen == [("application/json", {"address": "100.64.0.10"})]


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [
    web.json_response({"error": "'x' is not an IP address"}, status=400),
    web.Response(status=500),
    web.Response(status=404),
    web.Response(text="not json"),
    web.json_response({"acknowledged": False}),
    web.json_response({"acknowledged": False, "mode": "free"}),   # nothing to acknowledge: look again
    web.json_response({"acknowledged": True}),                     # acknowledged until when?
    web.json_response(["acknowledged"]),
])
async def test_enforcer_client_acknowledge_raises_on_bad_answers(tmp_path: Path, answer: web.Response) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, answer_restricted, handler):
        client = EnforcerClient(str(socket_path))
        try:
            with pytest.raises(EnforcerUnavailable):
                await client.acknowledge("100.64.0.10")
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_enforcer_client_acknowledge_without_a_socket(tmp_path: Path) -> None:
    client = EnforcerClient(str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(EnforcerUnavailable, match=r"missing\.sock"):
            await client.acknowledge("100.64.0.10")
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_enforcer_client_raises_when_the_socket_does_not_exist(tmp_path: Path) -> None:
    client = EnforcerClient(str(tmp_path / "missing.sock"))
    try:
        with pytest.raises(EnforcerUnavailable, match=r"missing\.sock"):
            await client.lookup("100.64.0.10")
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [
    web.Response(status=400, text="bad address"),
    web.Response(status=500),
    web.Response(text="not json"),
    web.json_response({"restricted": "yes", "mode": "free"}),
    web.json_response(["not", "an", "object"]),
    web.json_response({"address": "10.0.0.1", "restricted": False, "mode": "free", "ack_until": "soon"}),
    web.json_response({"address": "10.0.0.1", "restricted": True, "mode": "walled-garden", "promise": "yes"}),
])
async def test_enforcer_client_raises_on_bad_answers(tmp_path: Path, answer: web.Response) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, handler):
        client = EnforcerClient(str(socket_path))
        try:
            with pytest.raises(EnforcerUnavailable):
                await client.lookup("100.64.0.10")
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_enforcer_client_times_out(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    socket_path = tmp_path / "c.sock"
    async with unix_enforcer(socket_path, slow):
        client = EnforcerClient(str(socket_path), timeout=0.1)
        try:
            with pytest.raises(EnforcerUnavailable, match="no answer in time"):
                await client.lookup("100.64.0.10")
        finally:
            release.set()
            await client.close()


@pytest.mark.asyncio
async def test_app_asks_the_enforcer_on_the_configured_socket(config: Config, tmp_path: Path) -> None:
    """Without a client passed in, the app makes its own on ``api.socket`` and closes it."""
    socket_path = tmp_path / "c.sock"
    config = replace(config, api=replace(config.api, socket=str(socket_path)))
    async with TestClient(TestServer(create_app(config))) as client:
        unavailable = await client.get("/api/captive", headers=on_portal())
        assert unavailable.status == 503
        async with unix_enforcer(socket_path, answer_restricted) as seen:
            response = await client.get("/api/captive", headers=on_portal())
            assert (await response.json(content_type=None))["captive"] is True
            page = await (await client.get("/", headers=on_portal())).text()
            assert "<code>R-1</code>" in page
        assert seen == [{"address": "127.0.0.1"}, {"address": "127.0.0.1"}]


@pytest.mark.asyncio
@pytest.mark.parametrize("named,answered", [("this socket", True), ("portal other port", True),
                                            ("example.com", False)])
async def test_captive_api_by_the_gateways_address_is_answered_not_redirected(
        config: Config, named: str, answered: bool) -> None:
    """The RFC 8908 API told to clients by address (DHCP option 114, RA) or on another port of
    the portal's host answers JSON; under any other host it is redirected like every page."""
    async with portal(config, FakeEnforcer(OVERDUE)) as client:
        host = {"this socket": f"127.0.0.1:{client.port}", "portal other port": "portal.isp.example:8081",
                "example.com": "example.com"}[named]
        response = await client.get("/api/captive", headers={"Host": host}, allow_redirects=False)
        if answered:
            assert response.status == 200 and response.headers["Content-Type"] == CAPTIVE_JSON
            assert (await response.json(content_type=CAPTIVE_JSON))["captive"] is True
        else:
            assert response.status == 302 and response.headers["Location"] == PORTAL_URL
