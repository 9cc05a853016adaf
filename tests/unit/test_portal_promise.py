"""The "I promise to pay" button on the portal page, ``POST /promise``, and the client's side of it.

The enforcer is a fake client (as in ``test_portal``), except in the client tests, which talk
HTTP to a real aiohttp server on a temporary Unix socket. The enforcer's own rules and its
webhook to billing are tested in ``test_daemon_policy_rules`` and ``test_portal_actions_promise``.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from portal_helpers import unix_enforcer
from test_portal import (
    CONFIG_YAML,
    FREE,
    NOTICE,
    OVERDUE,
    PORTAL_URL,
    FakeEnforcer,
    config,
    on_portal,
    portal,
    requests_total,
    with_portal,
)

from captive_portal.app import CSRF_KEY
from captive_portal.catalogues import EN, MESSAGES, shipped
from captive_portal.enforcer_client import (
    NOT_OFFERED,
    EnforcerClient,
    EnforcerUnavailable,
    Lookup,
    Promised,
    PromiseOffer,
)
from captive_portal.page import Caller, Pages, term_text
from enforcer.config import LANGUAGES, Config, parse_config

__all__ = ["config"]  # the fixture, shared with test_portal

DAY = 86400.0
OFFER = PromiseOffer(True, "eligible", 3 * DAY)
ELIGIBLE = replace(OVERDUE, promise=OFFER)
UNTIL = 4102444800.0  # 2100-01-01T00:00:00Z
FORM = re.compile(r'<form method="post" action="/promise" class="promise">.*?</form>', re.DOTALL)


class PromiseEnforcer(FakeEnforcer):
    """``FakeEnforcer`` that also answers ``promise`` with ``promised`` (or fails: ``unreachable``).

    Like the real enforcer, a promise made frees the caller, and a refusal leaves them
    restricted without the offer.
    """

    def __init__(self, result: Lookup | None = ELIGIBLE, promised: Promised | None = None) -> None:
        super().__init__(result)
        self.promised = promised if promised is not None else Promised(True, UNTIL)
        self.unreachable = False
        self.promises: list[str] = []

    async def promise(self, address: str) -> Promised:
        self.promises.append(address)
        if self.unreachable:
            raise EnforcerUnavailable("cannot reach the enforcer: test")
        if self.result is not None:
            if self.promised.promised or self.promised.why == "not_restricted":
                self.result = replace(FREE, address=self.result.address)
            else:
                self.result = replace(self.result, promise=PromiseOffer(False, self.promised.why))
        return self.promised


def promise_form(page: str) -> dict[str, str]:
    """The hidden fields of the promise form, as a browser would send them."""
    form = FORM.search(page)
    assert form, page
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(0)))


async def offer_page(client: TestClient, query: str = "") -> str:
    response = await client.get("/" + query, headers=on_portal())
    assert response.status == 200
    return await response.text()


async def post_promise(client: TestClient, data: Any, **headers: str) -> Any:
    return await client.post("/promise", data=data, headers=on_portal(**headers), allow_redirects=False)


# --- the button ----------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("lookup,shown", [
    (ELIGIBLE, True),
    (replace(NOTICE, promise=OFFER), True),
    (replace(NOTICE, mode="throttle", promise=OFFER), True),
    (replace(NOTICE, ack_until=time.time() + 86_400, promise=OFFER), True),   # an acknowledged throttle is still slow
    (OVERDUE, False),                                                      # an older enforcer says nothing
    (replace(OVERDUE, promise=PromiseOffer(False, "limit_reached")), False),
    (replace(OVERDUE, promise=PromiseOffer(False, "operator_restriction")), False),
    (replace(FREE, promise=OFFER), False),                                 # nonsense: not restricted
    (None, False),                                                         # the enforcer could not be asked
])
async def test_the_button_is_there_only_when_the_enforcer_offers_it(config: Config, lookup: Lookup | None,
                                                                    shown: bool) -> None:
    async with portal(config, PromiseEnforcer(lookup)) as client:
        page = await offer_page(client)
    assert bool(FORM.search(page)) is shown
    assert (EN["promise_heading"] in page) is shown
    assert (EN["promise_button"] in page) is shown
    if lookup is not None and lookup.in_notice and not lookup.acknowledged(time.time()):
        assert 'action="/continue"' in page  # both ways out, side by side


@pytest.mark.asyncio
async def test_the_offer_says_for_how_long_and_carries_token_and_language(config: Config) -> None:
    async with portal(config, PromiseEnforcer()) as client:
        english = await offer_page(client)
        czech = await offer_page(client, "?lang=cs")
        token_ok = client.app[CSRF_KEY].check(promise_form(czech)["csrf"], "127.0.0.1")
    assert "for 3 days." in english
    assert "na 3 dny." in czech and MESSAGES["cs"]["promise_button"] in czech
    fields = promise_form(czech)
    assert set(fields) == {"csrf", "lang"} and fields["lang"] == "cs" and token_ok
    assert f'<button type="submit">{EN["promise_button"]}</button>' in english


def test_term_texts_agree_with_their_numbers() -> None:
    assert [term_text(d * DAY, "en") for d in (1, 3)] == ["1 day", "3 days"]
    assert [term_text(d * DAY, "cs") for d in (1, 3, 5)] == ["1 den", "3 dny", "5 dní"]
    assert [term_text(d * DAY, "ru") for d in (1, 2, 5, 11, 21, 22)] == [
        "1 день", "2 дня", "5 дней", "11 дней", "21 день", "22 дня"]
    assert [term_text(d * DAY, "uk") for d in (1, 3, 12)] == ["1 день", "3 дні", "12 днів"]
    assert term_text(3 * DAY, "hu") == "3 napra"
    assert term_text(36 * 3600, "en") == "36 hours" and term_text(1800, "pt") == "1 hora"
    for language in LANGUAGES:
        page = Pages(parse_config(CONFIG_YAML).portal).caller_page(Caller(ELIGIBLE, language, token="t"))
        assert term_text(3 * DAY, language) in page, language


# --- POST /promise -------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_promise_shows_the_confirmation_with_the_date(config: Config) -> None:
    enforcer = PromiseEnforcer()
    async with portal(config, enforcer) as client:
        fields = promise_form(await offer_page(client))
        # Nothing in the request chooses who promises or where the answer goes.
        response = await post_promise(client, {**fields, "address": "100.64.0.99", "next": "http://evil.example/"},
                                      Referer="http://evil.example/")
        assert response.status == 200
        assert "Location" not in response.headers
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Connection"] == "close"  # the next request starts afresh, let out
        page = await response.text()
        assert requests_total(client, "promise") == 1
        after = await offer_page(client)
    assert enforcer.promises == ["127.0.0.1"]
    local = datetime.fromtimestamp(UNTIL).astimezone()  # the machine's zone: no policy.windows.timezone
    date = f"{shipped()['en'].date(local)} {local.tzname()}"  # "Jan 1, 2100, 00:00 UTC" (CLDR, Babel)
    assert f"<h1>{EN['heading_promised']}</h1>" in page
    assert EN["summary_promised"].replace("$until", date) in page
    assert 'class="promised"' in page
    assert "evil.example" not in page and "<form" not in page
    assert EN["pay_heading"] in page  # the way to pay, for when the money is there
    assert f"<h1>{EN['heading_active']}</h1>" in after  # the page now says: not restricted


@pytest.mark.asyncio
async def test_the_confirmation_is_in_the_language_of_the_form_and_the_operators_zone(config: Config) -> None:
    zoned = parse_config(CONFIG_YAML + "policy: {windows: {timezone: Europe/Prague}}\n")
    async with portal(zoned, PromiseEnforcer()) as client:
        fields = promise_form(await offer_page(client, "?lang=cs"))
        page = await (await post_promise(client, fields, **{"Accept-Language": "en"})).text()
    assert '<html lang="cs">' in page and MESSAGES["cs"]["heading_promised"] in page
    assert "do 1. ledna 2100 1:00 CET." in page  # Czech as CLDR writes it, in Prague's zone


@pytest.mark.asyncio
@pytest.mark.parametrize("why,note", [
    ("limit_reached", "promise_refused_soon"),
    ("last_promise_lapsed", "promise_refused_soon"),
    ("promise_active", "promise_refused_soon"),
    ("reason_not_eligible", "promise_refused"),
    ("operator_restriction", "promise_refused"),
    ("disabled", "promise_refused"),
    ("not_eligible", "promise_refused"),
])
async def test_a_refused_promise_says_why_in_customer_words(config: Config, why: str, note: str) -> None:
    enforcer = PromiseEnforcer(promised=Promised(False, why=why))
    async with portal(config, enforcer) as client:
        fields = promise_form(await offer_page(client, "?lang=es"))
        response = await post_promise(client, fields)
        assert response.status == 403
        page = await response.text()
        assert requests_total(client, "promise") == 1
    es = MESSAGES["es"]
    assert es[note] in page  # type: ignore[literal-required]
    assert f"<h1>{es['heading_restricted']}</h1>" in page and es["reason_overdue"] in page
    assert not FORM.search(page)  # no button to press again
    assert why not in page


@pytest.mark.asyncio
async def test_nothing_to_promise_when_not_restricted_is_409(config: Config) -> None:
    enforcer = PromiseEnforcer(promised=Promised(False, why="not_restricted"))
    async with portal(config, enforcer) as client:
        fields = promise_form(await offer_page(client))
        response = await post_promise(client, fields)
        assert response.status == 409
        page = await response.text()
    assert EN["promise_not_needed"] in page and f"<h1>{EN['heading_active']}</h1>" in page


@pytest.mark.asyncio
async def test_an_unreachable_enforcer_says_try_again_and_keeps_the_offer(config: Config) -> None:
    enforcer = PromiseEnforcer()
    enforcer.unreachable = True
    async with portal(config, enforcer) as client:
        response = await post_promise(client, promise_form(await offer_page(client)))
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        page = await response.text()
        assert EN["continue_failed"] in page
        enforcer.unreachable = False
        retried = await post_promise(client, promise_form(page))  # the button is offered again
        assert retried.status == 200 and EN["heading_promised"] in await retried.text()
        assert requests_total(client, "error") == 1
    assert enforcer.promises == ["127.0.0.1", "127.0.0.1"]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["missing", "other-address", "bad-origin", "null-origin", "get"])
async def test_promises_need_a_token_from_this_page_and_origin(config: Config, case: str) -> None:
    enforcer = PromiseEnforcer()
    async with portal(config, enforcer) as client:
        fields = promise_form(await offer_page(client))
        headers: dict[str, str] = {}
        data: Any = fields
        if case == "missing":
            data = {"lang": "en"}
        elif case == "other-address":
            data = {**fields, "csrf": client.app[CSRF_KEY].issue("100.64.0.10")}
        elif case == "bad-origin":
            headers["Origin"] = "http://evil.example"
        elif case == "null-origin":
            headers["Origin"] = "null"
        if case == "get":  # a link (or an <img>) cannot promise anything
            response = await client.get("/promise", headers=on_portal(), allow_redirects=False)
            assert response.status == 303 and response.headers["Location"] == PORTAL_URL  # the page, nothing done
        else:
            response = await post_promise(client, data, **headers)
            assert response.status == 403
            assert EN["title_expired"] in await response.text()
            assert requests_total(client, "forbidden") == 1
    assert enforcer.promises == []


@pytest.mark.asyncio
async def test_promises_are_rate_limited_with_the_other_posts(config: Config) -> None:
    enforcer = PromiseEnforcer(promised=Promised(False, why="limit_reached"))
    async with portal(with_portal(config, posts_per_minute=2), enforcer) as client:
        fields = promise_form(await offer_page(client))
        statuses = [(await post_promise(client, fields)).status for _ in range(3)]
        continued = await client.post("/continue", data=fields, headers=on_portal(), allow_redirects=False)
    assert statuses == [403, 403, 429] and continued.status == 429
    assert len(enforcer.promises) == 2


@pytest.mark.asyncio
async def test_no_amounts_names_or_addresses_on_any_promise_page(config: Config) -> None:
    """The connection may be shared: what anyone sees is the category, the code and the date."""
    pages = []
    for promised in (Promised(True, UNTIL), Promised(False, why="limit_reached"),
                     Promised(False, why="not_restricted")):
        async with portal(config, PromiseEnforcer(promised=promised)) as client:
            offer = await offer_page(client)
            pages += [offer, await (await post_promise(client, promise_form(offer))).text()]
    for page in pages:
        text = re.sub(r'value="[^"]*"', "", page)  # the token is no secret of the account
        assert "C-1001" not in text and "127.0.0.1" not in text
        assert not re.search(r"[$€£]\s?\d|\d\s?(?:Kč|CZK|EUR|USD|Ft)", text)
        assert "eligible" not in text and "limit_reached" not in text


# --- the client ----------------------------------------------------------------------------------

RESTRICTED = {"address": "100.64.0.10", "restricted": True, "mode": "walled-garden", "reason": "overdue",
              "reference": "WG-1", "subscriber": "C-1"}


@pytest.mark.asyncio
@pytest.mark.parametrize("promise,expected", [
    ({"eligible": True, "why": "eligible", "term_seconds": 259200.0}, OFFER),
    ({"eligible": False, "why": "limit_reached", "term_seconds": None}, PromiseOffer(False, "limit_reached")),
    (None, NOT_OFFERED),                                            # an older enforcer
    ({"eligible": True, "why": "eligible"}, PromiseOffer(False, "eligible")),  # no term: no button
    ({"eligible": False}, PromiseOffer(False, "")),
])
async def test_the_client_reads_the_offer_from_the_lookup(tmp_path: Path, promise: Any,
                                                          expected: PromiseOffer) -> None:
    async def lookup(request: web.Request) -> web.Response:
        body = dict(RESTRICTED)
        if promise is not None:
            body["promise"] = promise
        return web.json_response(body)

    async with unix_enforcer(tmp_path / "c.sock", lookup=lookup):
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            answer = await client.lookup("100.64.0.10")
        finally:
            await client.close()
    assert answer.promise == expected and answer.restricted and answer.reason == "overdue"


@pytest.mark.asyncio
@pytest.mark.parametrize("promise,field", [
    ("yes", "promise"),
    ({"eligible": "true", "term_seconds": 259200}, "promise.eligible"),
    ({"eligible": True, "term_seconds": -5}, "promise.term_seconds"),
    ({"eligible": True, "why": 3, "term_seconds": 60}, "promise.why"),
])
async def test_a_malformed_offer_is_a_malformed_lookup(tmp_path: Path, promise: Any, field: str) -> None:
    async def lookup(request: web.Request) -> web.Response:
        return web.json_response(dict(RESTRICTED, promise=promise))

    async with unix_enforcer(tmp_path / "c.sock", lookup=lookup):
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            with pytest.raises(EnforcerUnavailable, match=f"malformed lookup answer .*{field}: "):
                await client.lookup("100.64.0.10")
        finally:
            await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("answer,expected", [
    (web.json_response({"promised": True, "until": 1900000000, "mode": "free"}),
     Promised(True, 1900000000.0, mode="free")),
    (web.json_response({"error": "no", "eligible": False, "why": "limit_reached"}, status=403),
     Promised(False, why="limit_reached")),
    (web.Response(status=403, text="no"), Promised(False, why="not_eligible")),
    (web.json_response({"error": "this connection is not restricted", "why": "not_restricted"}, status=409),
     Promised(False, why="not_restricted")),
])
async def test_the_client_promises(tmp_path: Path, answer: web.Response, expected: Promised) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    async with unix_enforcer(tmp_path / "c.sock", promise=handler) as seen:
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            assert await client.promise("100.64.0.10") == expected
        finally:
            await client.close()
    assert seen == [("application/json", {"address": "100.64.0.10"})]


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [
    web.json_response({"error": "kernel change failed"}, status=503),
    web.json_response({"error": "not an IP address"}, status=400),
    web.Response(text="not json"),
    web.json_response({"promised": False}),
    web.json_response({"promised": True}),          # no until: the page could not say until when
    web.json_response(["promised"]),
])
async def test_the_client_raises_on_anything_else(tmp_path: Path, answer: web.Response) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    async with unix_enforcer(tmp_path / "c.sock", promise=handler):
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            with pytest.raises(EnforcerUnavailable):
                await client.promise("100.64.0.10")
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_an_enforcer_without_promises_is_unavailable_for_them(tmp_path: Path) -> None:
    async def lookup(request: web.Request) -> web.Response:
        return web.json_response(RESTRICTED)

    async with unix_enforcer(tmp_path / "c.sock", lookup=lookup):  # no /v1/promise: 404
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            with pytest.raises(EnforcerUnavailable, match="404"):
                await client.promise("100.64.0.10")
        finally:
            await client.close()
