"""The notice interstitial and POST safety: remembered URLs, ``POST /continue``, CSRF, rate limit."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from test_portal import (
    NOTICE,
    OS_PROBES,
    OVERDUE,
    PORTAL_HOST,
    PORTAL_URL,
    FakeEnforcer,
    config,
    on_portal,
    portal,
    requests_total,
    with_portal,
)

from captive_portal.app import CSRF_KEY, URLS_KEY
from captive_portal.catalogues import EN, MESSAGES
from captive_portal.csrf import CsrfTokens
from captive_portal.enforcer_client import Ack, Lookup
from captive_portal.original_urls import MAX_URL, OriginalUrls, page_url
from captive_portal.ratelimit import RateLimiter, bucket_key
from enforcer.config import Config

__all__ = ["config"]  # the fixture, shared with test_portal

WANTED = "http://example.com/news/today.html?id=7&x=%3C"
FORM = re.compile(r'<form method="post" action="/continue" class="continue">.*?</form>', re.DOTALL)


def form_fields(page: str) -> dict[str, str]:
    """The hidden fields of the notice form, as a browser would send them."""
    form = FORM.search(page)
    assert form, page
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(0)))


async def visit(client: TestClient, url: str = WANTED, **headers: str) -> None:
    """A subscriber's browser asking for ``url`` and being sent to the portal."""
    _, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    response = await client.get("/" + path, headers={"Host": host, **headers}, allow_redirects=False)
    assert response.status == 302 and response.headers["Location"] == PORTAL_URL


async def notice_form(client: TestClient, query: str = "") -> dict[str, str]:
    page = await (await client.get("/" + query, headers=on_portal())).text()
    return form_fields(page)


async def post_continue(client: TestClient, data: dict[str, str] | None, **headers: str) -> Any:
    return await client.post("/continue", data=data, headers=on_portal(**headers), allow_redirects=False)


# --- the interstitial --------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["notice", "throttle"])
async def test_notice_page_is_an_interstitial_with_a_continue_form(config: Config, mode: str) -> None:
    async with portal(config, FakeEnforcer(replace(NOTICE, mode=mode))) as client:
        page = await (await client.get("/?lang=cs", headers=on_portal())).text()
    cs = MESSAGES["cs"]
    assert f"<h1>{cs[f'heading_{mode}']}</h1>" in page  # type: ignore[literal-required]
    assert cs["reason_overdue"] in page and cs["pay_heading"] in page
    assert f'<button type="submit">{cs["continue_button"]}</button>' in page
    fields = form_fields(page)
    assert set(fields) == {"csrf", "lang"} and fields["lang"] == "cs"
    assert "<code>WG-7K2M-Q9XD</code>" in page


@pytest.mark.asyncio
async def test_walled_garden_and_acknowledged_pages_have_no_form(config: Config) -> None:
    acknowledged = replace(NOTICE, ack_until=time.time() + 86_400)
    async with portal(config, FakeEnforcer(OVERDUE)) as walled, portal(config, FakeEnforcer(acknowledged)) as acked:
        walled_page = await (await walled.get("/", headers=on_portal())).text()
        acked_page = await (await acked.get("/", headers=on_portal())).text()
    assert "<form" not in walled_page and "<form" not in acked_page
    assert f"<h1>{EN['heading_acknowledged']}</h1>" in acked_page
    assert EN["reason_overdue"] in acked_page and EN["pay_heading"] in acked_page  # still worth knowing


# --- continue ------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_continue_goes_back_to_the_remembered_url_only(config: Config) -> None:
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        await visit(client, "http://example.com/older")
        await visit(client, WANTED, Accept="text/html,application/xhtml+xml,*/*;q=0.8")  # the latest wins
        await visit(client, "http://connectivitycheck.gstatic.com/generate_204")  # a probe is not a page
        await visit(client, "http://example.com/favicon.ico")                     # nor is an icon
        fields = await notice_form(client)
        assert enforcer.asked == ["127.0.0.1"]  # the redirects asked nothing
        response = await post_continue(client, {**fields, "next": "http://evil.example/", "url": "//evil.example"},
                                       Referer="http://evil.example/")
        assert response.status == 303
        assert response.headers["Location"] == WANTED
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Connection"] == "close"
        assert enforcer.acknowledged == ["127.0.0.1"]
        assert requests_total(client, "continue") == 1
        # Handed out once: pressing again lands on the portal, which now says "carry on".
        again = await post_continue(client, fields)
        assert again.status == 303 and again.headers["Location"] == PORTAL_URL
        page = await (await client.get("/", headers=on_portal())).text()
        assert f"<h1>{EN['heading_acknowledged']}</h1>" in page


@pytest.mark.asyncio
async def test_continue_without_a_remembered_url_goes_to_the_portal_in_the_chosen_language(config: Config) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        fields = await notice_form(client, "?lang=pt")
        response = await client.post("/continue?next=http://evil.example/", data=fields, headers=on_portal(),
                                     allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == PORTAL_URL + "?lang=pt"
        followed = await client.get("/?lang=pt", headers=on_portal())
        assert MESSAGES["pt"]["heading_acknowledged"] in await followed.text()


@pytest.mark.asyncio
async def test_one_address_cannot_use_anothers_remembered_url(config: Config) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        client.app[URLS_KEY].remember("100.64.0.99", "http://other.example/private", user_agent=None)
        response = await post_continue(client, await notice_form(client))
        assert response.headers["Location"] == PORTAL_URL
        assert client.app[URLS_KEY].pop("100.64.0.99", user_agent=None) == "http://other.example/private"


@pytest.mark.asyncio
async def test_a_refused_acknowledgement_is_a_friendly_page(config: Config) -> None:
    """409 from the enforcer (walled in, or free by now): say so, and show where they stand."""
    enforcer = FakeEnforcer(NOTICE, ack=Ack(False, error="not in notice mode"))
    async with portal(config, enforcer) as client:
        fields = await notice_form(client, "?lang=es")
        enforcer.result = replace(OVERDUE, subscriber=NOTICE.subscriber)  # meanwhile walled in
        response = await post_continue(client, fields)
        assert response.status == 409
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        page = await response.text()
        assert requests_total(client, "continue") == 1
    es = MESSAGES["es"]
    assert es["continue_not_needed"] in page and f"<h1>{es['heading_restricted']}</h1>" in page
    assert "<form" not in page and "not in notice mode" not in page


@pytest.mark.asyncio
async def test_an_unreachable_enforcer_on_continue_says_try_again(config: Config) -> None:
    enforcer = FakeEnforcer(NOTICE, ack=None)
    async with portal(config, enforcer) as client:
        await visit(client)
        response = await post_continue(client, await notice_form(client))
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        page = await response.text()
        assert EN["continue_failed"] in page
        assert form_fields(page)  # the lookup still works here: the button is offered again
        enforcer.ack = Ack(True, time.time() + 60)
        retried = await post_continue(client, form_fields(page))
        assert retried.status == 303 and retried.headers["Location"] == WANTED  # not lost by the failure


# --- CSRF and origin -----------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "future", "other-address", "other-key",
                                  "bad-origin", "null-origin", "not-a-form"])
async def test_posts_without_a_good_token_or_from_elsewhere_are_403(config: Config, case: str) -> None:
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        fields = await notice_form(client)
        tokens = client.app[CSRF_KEY]
        headers: dict[str, str] = {}
        data: Any = fields
        if case == "missing":
            data = {"lang": "en"}
        elif case == "garbage":
            data = {**fields, "csrf": "zz." + "A" * 43}
        elif case == "expired":
            data = {**fields, "csrf": tokens.issue("127.0.0.1", now=time.time() - 3660)}
        elif case == "future":
            data = {**fields, "csrf": tokens.issue("127.0.0.1", now=time.time() + 3600)}
        elif case == "other-address":
            data = {**fields, "csrf": tokens.issue("127.0.0.2")}
        elif case == "other-key":
            data = {**fields, "csrf": CsrfTokens().issue("127.0.0.1")}
        elif case == "bad-origin":
            headers["Origin"] = "http://evil.example"
        elif case == "null-origin":
            headers["Origin"] = "null"
        elif case == "not-a-form":
            data = json.dumps({"csrf": fields["csrf"]})
            headers["Content-Type"] = "application/json"
        response = await post_continue(client, data, **headers)
        assert response.status == 403
        assert response.headers["Cache-Control"] == "no-store"
        page = await response.text()
        assert EN["title_expired"] in page and 'href="/?lang=en"' in page
        assert requests_total(client, "forbidden") == 1
    assert enforcer.acknowledged == []


@pytest.mark.asyncio
@pytest.mark.parametrize("origin", [None, "http://portal.isp.example", "HTTP://Portal.ISP.example:80"])
async def test_posts_from_the_portal_itself_are_accepted(config: Config, origin: str | None) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        fields = await notice_form(client)
        response = await post_continue(client, fields, **({"Origin": origin} if origin else {}))
        assert response.status == 303


@pytest.mark.asyncio
async def test_a_token_is_good_for_an_hour() -> None:
    now = [1_800_000_000.0]
    tokens = CsrfTokens(b"k" * 32, clock=lambda: now[0])
    token = tokens.issue("100.64.0.10")
    assert re.fullmatch(r"[0-9a-f]+\.[A-Za-z0-9_-]{43}", token)
    assert tokens.check(token, "100.64.0.10") and not tokens.check(token, "100.64.0.11")
    now[0] += 3600 - 60
    assert tokens.check(token, "100.64.0.10")
    now[0] += 61
    assert not tokens.check(token, "100.64.0.10")
    for junk in ("", ".", "x.y", "1" * 13 + "." + "a" * 43, token + "a", token[:-1]):
        assert not tokens.check(junk, "100.64.0.10"), junk


# --- rate limit ----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_posts_over_the_limit_get_429_with_retry_after(config: Config) -> None:
    enforcer = FakeEnforcer(NOTICE, ack=Ack(False, error="no"))
    async with portal(with_portal(config, posts_per_minute=3), enforcer) as client:
        fields = await notice_form(client)
        statuses = [(await post_continue(client, fields)).status for _ in range(3)]
        forged = await post_continue(client, {"csrf": "x"})  # forged posts spend tokens too
        limited = await post_continue(client, fields, **{"Accept-Language": "ru"})
        assert statuses == [409, 409, 409] and forged.status == 429
        assert limited.status == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 20
        assert MESSAGES["ru"]["title_too_many"] in await limited.text()
        assert requests_total(client, "rate_limited") == 2
        assert requests_total(client, "continue") == 3
        # Pages are never limited: reading is free.
        assert (await client.get("/", headers=on_portal())).status == 200
    assert len(enforcer.acknowledged) == 3


def test_token_bucket_refills_and_stays_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(6, max_entries=3, clock=lambda: now[0])
    assert [limiter.take("100.64.0.1") for _ in range(6)] == [0.0] * 6
    assert limiter.take("100.64.0.1") == pytest.approx(10.0)  # 6/min: one every 10 s
    now[0] += 10.0
    assert limiter.take("100.64.0.1") == 0.0
    for i in range(10):
        limiter.take(f"100.64.1.{i}")
    assert len(limiter) == 3
    # One subscriber's IPv6 addresses share a bucket per /64.
    assert bucket_key("2001:db8:1:2::1") == bucket_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert bucket_key("2001:db8:1:3::1") != bucket_key("2001:db8:1:2::1")
    assert bucket_key("100.64.0.1") == "100.64.0.1"


# --- remembering where they were going ------------------------------------------------------------

def test_original_urls_one_per_device_with_ttl_and_bounded() -> None:
    now = [0.0]
    urls = OriginalUrls(ttl=900, max_entries=3, clock=lambda: now[0])
    ua = "Mozilla/5.0 (test)"
    urls.remember("a", "http://x/1", user_agent=ua)
    urls.remember("a", "http://x/2", user_agent=ua)
    assert len(urls) == 1
    now[0] = 899
    assert urls.pop("a", user_agent=ua) == "http://x/2" and urls.pop("a", user_agent=ua) is None
    urls.remember("a", "http://x/3", user_agent=ua)
    now[0] += 900
    assert urls.pop("a", user_agent=ua) is None  # expired
    for name in "bcdef":
        urls.remember(name, f"http://x/{name}", user_agent=ua)
    assert len(urls) == 3 and urls.pop("b", user_agent=ua) is None  # oldest dropped
    assert urls.pop("f", user_agent=ua) == "http://x/f"
    now[0] += 901
    urls.remember("g", "http://x/g", user_agent=ua)
    assert len(urls) == 1  # expired ones are swept as new ones come


@pytest.mark.parametrize("method,headers,path,expected", [
    ("GET", {"Host": "example.com"}, "/a?b=1", "http://example.com/a?b=1"),
    ("GET", {"Host": "Example.COM:8080"}, "/", "http://example.com:8080/"),
    ("GET", {"Host": "[2001:db8::1]"}, "/x", "http://[2001:db8::1]/x"),
    ("GET", {"Host": "198.51.100.10"}, "/some/page?x=1", "http://198.51.100.10/some/page?x=1"),
    ("GET", {"Host": "example.com", "Accept": "*/*"}, "/", "http://example.com/"),
    ("GET", {"Host": "example.com"}, "/" + "a" * MAX_URL, "http://example.com/"),   # too long: the site
    ("GET", {"Host": "example.com"}, "//evil.example/", "http://example.com/"),
    ("POST", {"Host": "example.com"}, "/", None),
    ("HEAD", {"Host": "example.com"}, "/", None),
    ("GET", {}, "/", None),
    ("GET", {"Host": "evil.example/@x"}, "/", None),
    ("GET", {"Host": "a b"}, "/", None),
    ("GET", {"Host": "example.com", "Accept": "application/json"}, "/api", None),
    ("GET", {"Host": "example.com"}, "/style.css", None),
    ("GET", {"Host": "www.apple.com"}, "/library/test/success.html", None),
    *[("GET", {"Host": host}, path, None) for host, path in OS_PROBES],
])
def test_which_redirected_requests_are_remembered(method: str, headers: dict[str, str], path: str,
                                                  expected: str | None) -> None:
    assert page_url(method, headers, path) == expected


@pytest.mark.asyncio
async def test_redirects_remember_the_url_keyed_by_the_callers_address_and_user_agent(config: Config) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        await visit(client, "http://example.org/path?q=1", **{"User-Agent": "Phone/1"})
        assert client.app[URLS_KEY].peek("127.0.0.1", user_agent="Laptop/2") is None
        assert client.app[URLS_KEY].pop("127.0.0.1", user_agent="Phone/1") == "http://example.org/path?q=1"
        response = await client.post("/form", headers={"Host": "example.org"}, allow_redirects=False)
        assert response.status == 302 and len(client.app[URLS_KEY]) == 0


@pytest.mark.asyncio
async def test_get_continue_is_not_an_action(config: Config) -> None:
    enforcer = FakeEnforcer(NOTICE)
    async with portal(config, enforcer) as client:
        response = await client.get("/continue", headers=on_portal(), allow_redirects=False)
        assert response.status == 303 and response.headers["Location"] == PORTAL_URL  # to the page, no action
        # and the portal host is required: elsewhere it is just another redirected request
        response = await client.post("/continue", headers={"Host": "example.com"}, allow_redirects=False)
        assert response.status == 302
    assert enforcer.acknowledged == []


def test_lookup_states() -> None:
    now = 1_000.0
    assert NOTICE.in_notice and not NOTICE.acknowledged(now) and NOTICE.captive(now)
    assert not OVERDUE.in_notice and OVERDUE.captive(now)
    acked = replace(NOTICE, ack_until=now + 1)
    assert acked.acknowledged(now) and not acked.captive(now)
    free = Lookup("x", False, "free", "", "", ack_until=now + 5)
    assert not free.in_notice and not free.captive(now)
    assert PORTAL_HOST in PORTAL_URL


def test_one_ipv6_64_cannot_evict_another_subscribers_remembered_url() -> None:
    """Keyed per /64 and bounded per key, a /64 writing thousands of distinct
    addresses keeps at most ``per_key`` entries and pushes nobody else out."""
    urls = OriginalUrls(max_entries=64, per_key=4)
    ua = "Mozilla/5.0 (test)"
    urls.remember("100.64.0.7", "http://victim.example/4", user_agent=ua)
    urls.remember("2001:db8:aaaa:1::7", "http://victim.example/6", user_agent=ua)
    for i in range(5000):
        urls.remember(f"2001:db8:bbbb:1::{i:x}", f"http://flood.example/{i}", user_agent=ua)
    for i in range(5000):  # nor by User-Agents of its own making behind one address
        urls.remember("100.64.0.8", f"http://flood.example/{i}", user_agent=f"agent {i}")
    assert len(urls) == 2 + 4 + 4
    assert urls.pop("100.64.0.7", user_agent=ua) == "http://victim.example/4"
    assert urls.pop("2001:db8:aaaa:1::7", user_agent=ua) == "http://victim.example/6"
    # Within its own /64 the flooder keeps its newest few, each address its own URL.
    assert urls.peek("2001:db8:bbbb:1::1387", user_agent=ua) == "http://flood.example/4999"
    assert urls.peek("2001:db8:bbbb:1::0", user_agent=ua) is None


def test_addresses_in_one_64_keep_their_own_urls() -> None:
    urls = OriginalUrls()
    ua = "Mozilla/5.0 (test)"
    urls.remember("2001:db8:1:2::a", "http://a.example/", user_agent=ua)
    urls.remember("2001:db8:1:2::b", "http://b.example/", user_agent=ua)
    assert urls.peek("2001:db8:1:2::a", user_agent=ua) == "http://a.example/"  # peek keeps it
    assert urls.pop("2001:db8:1:2::a", user_agent=ua) == "http://a.example/"
    assert urls.pop("2001:db8:1:2::a", user_agent=ua) is None and urls.pop("2001:db8:1:2::c", user_agent=ua) is None
    assert urls.pop("2001:db8:1:2::b", user_agent=ua) == "http://b.example/" and len(urls) == 0


def test_a_remembered_url_is_percent_encoded_where_a_url_may_not_hold_the_character() -> None:
    """Found by test_portal_fuzz: a path with a quote went back out as it was, in Location."""
    from captive_portal.original_urls import page_url

    assert page_url("GET", {"Host": "example.com"}, '/a`b"c?q=<1>') == "http://example.com/a%60b%22c?q=%3C1%3E"
    assert page_url("GET", {"Host": "example.com"}, "/a%20b?x=1&y=2") == "http://example.com/a%20b?x=1&y=2"
