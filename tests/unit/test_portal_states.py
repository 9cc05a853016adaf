"""Portal states: the enforcer's answer changes between two requests of one customer.

A promise, a payment or an operator's lift turns a restricted customer free while the page is
open, between a press and the reload, or between the button's post and the lookup after it. In
every such path the customer sees a sensible page ("your service is active", with a link back to
where they were going when the portal remembers it), never an error page, and ``/api/captive``
says ``captive: false``. Also the portal side of caller binding: a 403 "not a recent caller"
from the enforcer asks the customer to reload, posts are rate limited per IPv4 address or IPv6
/64, and the caller's address is only ever the TCP peer, whatever the headers say.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from portal_helpers import TEST_PEER, unix_enforcer, with_test_peer
from test_portal import FREE, NOTICE, OVERDUE, PORTAL_URL, config, on_portal, with_portal

from captive_portal.app import CAPTIVE_JSON, CSRF_KEY, URLS_KEY, create_app
from captive_portal.catalogues import EN, MESSAGES
from captive_portal.enforcer_client import (
    Ack,
    EnforcerClient,
    EnforcerUnavailable,
    Lookup,
    NotRecentCaller,
    Promised,
    PromiseOffer,
)
from enforcer.config import Config

__all__ = ["config"]  # the fixture, shared with test_portal

DAY = 86400.0
UNTIL = 4102444800.0
ELIGIBLE = replace(OVERDUE, promise=PromiseOffer(True, "eligible", 3 * DAY))
WANTED = "http://example.com/news/today.html?id=7"
FORM = re.compile(r'<form method="post" action="/(?:promise|continue)" class="(?:promise|continue)">.*?</form>',
                  re.DOTALL)
BACK = re.compile(r'<p class="back">(.*?)</p>', re.DOTALL)


class Enforcer:
    """A stand-in whose answers each test sets, and which records every address it was given.

    ``ack`` and ``promised`` are what the actions answer, or an exception to raise; ``then``
    (if set) becomes the lookup result as an action is answered, as a lift would make it.
    """

    def __init__(self, result: Lookup | None) -> None:
        self.result = result
        self.ack: Ack | Exception = Ack(True, UNTIL)
        self.promised: Promised | Exception = Promised(True, UNTIL)
        self.then: Lookup | None = None
        self.addresses: list[tuple[str, str]] = []

    async def lookup(self, address: str) -> Lookup:
        self.addresses.append(("lookup", address))
        if self.result is None:
            raise EnforcerUnavailable("test: down")
        return replace(self.result, address=address)

    async def acknowledge(self, address: str) -> Ack:
        self.addresses.append(("acknowledge", address))
        answer = self._answer(self.ack)
        if answer.acknowledged and self.result is not None:
            self.result = replace(self.result, ack_until=answer.until)
        return answer

    async def promise(self, address: str) -> Promised:
        self.addresses.append(("promise", address))
        return self._answer(self.promised)

    def _answer(self, answer: Any) -> Any:
        if self.then is not None:
            self.result = self.then
        if isinstance(answer, Exception):
            raise answer
        return answer


@asynccontextmanager
async def portal(config: Config, enforcer: Enforcer, *, peers: bool = False) -> AsyncIterator[TestClient]:
    app = create_app(config, enforcer)
    async with TestClient(TestServer(with_test_peer(app) if peers else app)) as client:
        yield client


async def redirected(client: TestClient, url: str = WANTED, **headers: str) -> None:
    _, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    response = await client.get("/" + path, headers={"Host": host, **headers}, allow_redirects=False)
    assert response.status == 302


async def page(client: TestClient, **headers: str) -> tuple[int, str]:
    response = await client.get("/", headers=on_portal(**headers))
    return response.status, await response.text()


def fields(text: str) -> dict[str, str]:
    form = FORM.search(text)
    assert form, text
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(0)))


async def post(client: TestClient, path: str, data: Any, **headers: str) -> Any:
    return await client.post(path, data=data, headers=on_portal(**headers), allow_redirects=False)


def heading(text: str) -> str:
    found = re.search(r"<h1>(.*?)</h1>", text)
    assert found, text
    return found.group(1)


def back_link(text: str) -> str | None:
    found = BACK.search(text)
    if not found:
        return None
    href = re.search(r'href="([^"]*)"', found.group(1))
    assert href, found.group(0)
    return href.group(1).replace("&amp;", "&")


# --- an unrestricted caller on portal.url ----------------------------------------------------------

@pytest.mark.asyncio
async def test_a_free_caller_sees_active_with_a_link_back_when_the_portal_remembers(config: Config) -> None:
    async with portal(config, Enforcer(FREE)) as client:
        status, before = await page(client)
        await redirected(client)
        status_after, after = await page(client)
        reload_status, reloaded = await page(client, **{"Accept-Language": "cs"})
    assert status == 200 and heading(before) == EN["heading_active"] and back_link(before) is None
    assert status_after == 200 and heading(after) == EN["heading_active"]
    assert back_link(after) == WANTED and EN["back_to_page"] in after
    # Kept, not handed out once: a reload shows it again, in the language asked for.
    assert reload_status == 200 and MESSAGES["cs"]["back_to_page"] in reloaded and back_link(reloaded)


@pytest.mark.asyncio
async def test_the_link_back_never_points_at_the_gateway_or_the_portal(config: Config) -> None:
    """Every subscriber's port 80 to the gateway lands on the portal now: typing the gateway's
    address or the portal's name on another port is no page to be sent back to."""
    async with portal(config, Enforcer(FREE)) as client:
        await redirected(client, "http://127.0.0.1/admin")          # the address this connection came to
        await redirected(client, "http://portal.isp.example:8080/")  # the portal's name, another port
        _, text = await page(client)
        assert back_link(text) is None and len(client.app[URLS_KEY]) == 0


@pytest.mark.asyncio
async def test_a_restricted_caller_gets_no_link_back(config: Config) -> None:
    async with portal(config, Enforcer(NOTICE)) as client:
        await redirected(client)
        _, text = await page(client)
    assert heading(text) == EN["heading_notice"] and back_link(text) is None


# --- promise: the confirmation, the reload, the API ----------------------------------------------

@pytest.mark.asyncio
async def test_after_a_promise_the_confirmation_then_active_on_reload_and_not_captive(config: Config) -> None:
    enforcer = Enforcer(ELIGIBLE)
    enforcer.then = FREE  # the lift: every lookup from now on says free
    async with portal(config, enforcer) as client:
        await redirected(client)
        api_before = await (await client.get("/api/captive", headers=on_portal())).json(content_type=CAPTIVE_JSON)
        _, offer = await page(client)
        response = await post(client, "/promise", fields(offer))
        confirmation = await response.text()
        reload_status, reloaded = await page(client)
        api = await client.get("/api/captive", headers=on_portal())
        answer = await api.json(content_type=CAPTIVE_JSON)
    assert api_before["captive"] is True
    assert response.status == 200 and heading(confirmation) == EN["heading_promised"]
    assert back_link(confirmation) == WANTED
    assert reload_status == 200 and heading(reloaded) == EN["heading_active"] and back_link(reloaded) == WANTED
    assert api.status == 200 and answer == {"captive": False, "user-portal-url": PORTAL_URL}


@pytest.mark.asyncio
@pytest.mark.parametrize("refusal", [
    Promised(False, why="not_restricted"),   # a second press after the first one lifted them
    Promised(False, why="limit_reached"),    # refused, but a payment lifted them meanwhile
    Promised(False, why="promise_active"),
    NotRecentCaller("test"),
    EnforcerUnavailable("test: the answer was lost"),  # perhaps after lifting them: no "nothing to promise"
])
async def test_a_press_after_the_lift_shows_active_not_a_complaint(config: Config, refusal: Any) -> None:
    enforcer = Enforcer(ELIGIBLE)
    async with portal(config, enforcer) as client:
        await redirected(client)
        form = fields((await page(client))[1])
        enforcer.result = FREE  # a payment arrives while the page is open
        enforcer.promised = refusal
        response = await post(client, "/promise", form)
        text = await response.text()
    unknown = isinstance(refusal, EnforcerUnavailable)
    assert response.status == (200 if unknown else 409)
    assert heading(text) == EN["heading_active"] and (EN["promise_not_needed"] in text) is not unknown
    assert back_link(text) == WANTED
    for complaint in ("promise_refused", "promise_refused_soon", "continue_failed", "reload_needed"):
        assert EN[complaint] not in text  # type: ignore[literal-required]
    assert "<form" not in text


# --- continue in notice mode -----------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [
    Ack(True, UNTIL),
    Ack(False, error="not in notice or throttle mode"),  # free by the time they pressed
    NotRecentCaller("test"),
    EnforcerUnavailable("test: down"),
])
async def test_continue_goes_to_the_original_url_also_when_free_meanwhile(config: Config, answer: Any) -> None:
    enforcer = Enforcer(NOTICE)
    async with portal(config, enforcer) as client:
        await redirected(client)
        form = fields((await page(client))[1])
        if not isinstance(answer, Ack) or not answer.acknowledged:
            enforcer.result = FREE  # paid or promised between the page and the press
        enforcer.ack = answer
        response = await post(client, "/continue", form)
        assert response.status == 303 and response.headers["Location"] == WANTED
        assert response.headers["Connection"] == "close"
        _, text = await page(client)
    assert heading(text) in (EN["heading_acknowledged"], EN["heading_active"])


@pytest.mark.asyncio
async def test_a_walled_in_caller_pressing_continue_still_gets_409(config: Config) -> None:
    enforcer = Enforcer(NOTICE)
    async with portal(config, enforcer) as client:
        form = fields((await page(client))[1])
        enforcer.result = replace(OVERDUE, subscriber=NOTICE.subscriber)   # the same subscriber, walled in
        enforcer.ack = Ack(False, error="not in notice mode")
        response = await post(client, "/continue", form)
        text = await response.text()
    assert response.status == 409 and heading(text) == EN["heading_restricted"]


# --- "not a recent caller" ---------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("path,lookup", [("/promise", ELIGIBLE), ("/continue", NOTICE)])
async def test_not_a_recent_caller_asks_to_reload_and_offers_the_button_again(config: Config, path: str,
                                                                               lookup: Lookup) -> None:
    enforcer = Enforcer(lookup)
    async with portal(config, enforcer) as client:
        _, offer = await page(client, **{"Accept-Language": "uk"})
        enforcer.promised = enforcer.ack = NotRecentCaller("test")
        response = await post(client, path, fields(offer))
        text = await response.text()
        enforcer.promised, enforcer.ack = Promised(True, UNTIL), Ack(True, UNTIL)
        again = await post(client, path, fields(text))  # the button on that page works
    assert response.status == 403 and response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert MESSAGES["uk"]["reload_needed"] in text and 'lang="uk"' in text
    assert again.status in (200, 303)


@pytest.mark.asyncio
@pytest.mark.parametrize("route", ["promise", "acknowledge"])
async def test_the_client_turns_403_not_a_recent_caller_into_its_own_exception(tmp_path: Path, route: str) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "this address has not connected to the portal recently; reload the page",
                                  "eligible": False, "why": "not_a_recent_caller"}, status=403)

    async with unix_enforcer(tmp_path / "c.sock", **{route: refuse}):
        client = EnforcerClient(str(tmp_path / "c.sock"))
        try:
            with pytest.raises(NotRecentCaller):
                await getattr(client, route)("100.64.0.10")
        finally:
            await client.close()


# --- the caller's address: the TCP peer only -----------------------------------------------------

SPOOFING = {"X-Forwarded-For": "100.64.0.99", "X-Real-IP": "100.64.0.98", "Forwarded": "for=100.64.0.97",
            "Client-IP": "100.64.0.96", "True-Client-IP": "100.64.0.95", "X-Client-IP": "100.64.0.94",
            "X-Cluster-Client-IP": "100.64.0.93", "CF-Connecting-IP": "100.64.0.92"}


@pytest.mark.asyncio
async def test_forwarding_headers_never_choose_the_address(config: Config) -> None:
    enforcer = Enforcer(replace(NOTICE, promise=PromiseOffer(True, "eligible", DAY)))
    async with portal(config, enforcer) as client:
        await redirected(client, WANTED, **SPOOFING)
        _, offer = await page(client, **SPOOFING)
        form = fields(offer)
        assert (await post(client, "/continue", form, **SPOOFING)).status == 303
        assert (await post(client, "/promise", form, **SPOOFING)).status == 200
        await client.get("/api/captive", headers=on_portal(**SPOOFING))
        # A token is bound to the peer too: one issued to a spoofed address does not pass.
        forged = {**form, "csrf": client.app[CSRF_KEY].issue("100.64.0.99")}
        assert (await post(client, "/promise", forged, **SPOOFING)).status == 403
    assert enforcer.addresses and {address for _, address in enforcer.addresses} == {"127.0.0.1"}
    assert [action for action, _ in enforcer.addresses if action != "lookup"] == ["acknowledge", "promise"]


@pytest.mark.asyncio
async def test_posts_are_limited_per_ipv4_address_and_per_ipv6_64(config: Config) -> None:
    async with portal(with_portal(config, posts_per_minute=2), Enforcer(ELIGIBLE), peers=True) as client:
        async def forged(peer: str) -> int:
            return (await post(client, "/promise", {"csrf": "x"}, **{TEST_PEER: peer})).status

        spent = [await forged("2001:db8:1:2::1"), await forged("2001:db8:1:2::2")]
        same_64 = await forged("2001:db8:1:2:ffff:ffff:ffff:fffe")   # another address, same /64
        other_64 = await forged("2001:db8:1:3::1")
        ipv4 = [await forged("100.64.0.1"), await forged("100.64.0.1"), await forged("100.64.0.1")]
        neighbour = await forged("100.64.0.2")
    assert spent == [403, 403] and same_64 == 429 and other_64 == 403
    assert ipv4 == [403, 403, 429] and neighbour == 403


@pytest.mark.asyncio
async def test_an_ipv6_caller_acts_for_its_own_address(config: Config) -> None:
    enforcer = Enforcer(ELIGIBLE)
    peer = {TEST_PEER: "2001:db8:1:2::42"}
    async with portal(config, enforcer, peers=True) as client:
        await redirected(client, WANTED, **peer)
        form = fields((await page(client, **peer))[1])
        enforcer.then = FREE
        confirmation = await (await post(client, "/promise", form, **peer)).text()
        other = await page(client, **{TEST_PEER: "2001:db8:1:2::43"})
    assert enforcer.addresses[-2:] == [("promise", "2001:db8:1:2::42"), ("lookup", "2001:db8:1:2::43")]
    assert back_link(confirmation) == WANTED
    assert back_link(other[1]) is None  # a neighbour in the /64 does not see this device's page
