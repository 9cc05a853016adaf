"""What a form token is bound to: the caller's IPv4 address or IPv6 /64, or its subscriber.

Bound to the exact address, a page fetched over IPv6 and posted from another IPv6 privacy
address of the same /64, or over IPv4 (a new connection may take either family), got 403 "This
page has expired". Now the token names the /64 (as the rate limiter does), and, when the page's
lookup named a subscriber, that subscriber: a POST from the other family is honoured when the
enforcer's lookup of the posting address names the same one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from portal_helpers import TEST_PEER, with_test_peer
from test_portal import PORTAL_URL, config, on_portal

from captive_portal.app import CSRF_KEY, create_app
from captive_portal.catalogues import EN
from captive_portal.csrf import CsrfTokens
from captive_portal.enforcer_client import Ack, EnforcerUnavailable, Lookup
from enforcer.config import Config

__all__ = ["config"]  # the fixture, shared with test_portal

HOME_V6 = "2001:db8:1:2::a"
HOME_V6_OTHER = "2001:db8:1:2:c0ff:ee:0:1"  # another privacy address of the same /64
HOME_V4 = "100.64.0.10"
NEIGHBOUR_V4 = "100.64.0.11"
FORM = re.compile(r'<form method="post" action="/continue" class="continue">.*?</form>', re.DOTALL)


class Household:
    """An enforcer that knows whose addresses are whose: the home's IPv6 /64 and IPv4 are one
    subscriber in notice mode, the neighbour another; ``down`` makes every lookup fail."""

    def __init__(self) -> None:
        self.owners = {HOME_V6: "C-1", HOME_V6_OTHER: "C-1", HOME_V4: "C-1", NEIGHBOUR_V4: "C-2"}
        self.down = False
        self.looked_up: list[str] = []
        self.acknowledged: list[str] = []

    async def lookup(self, address: str) -> Lookup:
        self.looked_up.append(address)
        if self.down:
            raise EnforcerUnavailable("test: down")
        owner = self.owners.get(address)
        if owner is None:
            return Lookup(address, False, "free", "", "")
        return Lookup(address, True, "notice", "overdue", "WG-1", owner)

    async def acknowledge(self, address: str) -> Ack:
        self.acknowledged.append(address)
        return Ack(True, 4102444800.0)


@asynccontextmanager
async def portal(config: Config, enforcer: Any) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(with_test_peer(create_app(config, enforcer)))) as client:
        yield client


async def form_from(client: TestClient, peer: str) -> dict[str, str]:
    text = await (await client.get("/", headers=on_portal(**{TEST_PEER: peer}))).text()
    form = FORM.search(text)
    assert form, text
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.group(0)))


async def continue_from(client: TestClient, peer: str, fields: dict[str, str]) -> Any:
    return await client.post("/continue", data=fields, headers=on_portal(**{TEST_PEER: peer}),
                             allow_redirects=False)


# --- the token itself ------------------------------------------------------------------------------

def test_a_token_binds_the_ipv6_64_and_the_exact_ipv4_address() -> None:
    tokens = CsrfTokens(b"k" * 32, clock=lambda: 1_800_000_000.0)
    v6 = tokens.issue(HOME_V6)
    assert tokens.check(v6, HOME_V6) and tokens.check(v6, HOME_V6_OTHER) and tokens.check(v6, "2001:db8:1:2::")
    assert not tokens.check(v6, "2001:db8:1:3::a") and not tokens.check(v6, HOME_V4)
    v4 = tokens.issue(HOME_V4)
    assert tokens.check(v4, HOME_V4) and not tokens.check(v4, NEIGHBOUR_V4) and not tokens.check(v4, HOME_V6)


def test_a_token_naming_a_subscriber_is_good_for_that_subscriber_only() -> None:
    tokens = CsrfTokens(b"k" * 32, clock=lambda: 1_800_000_000.0)
    token = tokens.issue(HOME_V6, "C-1")
    assert re.fullmatch(r"[0-9a-f]+\.[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43}", token) and "C-1" not in token
    assert tokens.names_subscriber(token) and not tokens.names_subscriber(tokens.issue(HOME_V6))
    assert tokens.check(token, HOME_V6_OTHER)                       # the /64, whoever it belongs to
    assert not tokens.check(token, HOME_V4)                         # another address, no subscriber given
    assert tokens.check(token, HOME_V4, "C-1")                      # the lookup says: the same subscriber
    assert not tokens.check(token, HOME_V4, "C-2") and not tokens.check(token, HOME_V4, "")
    # The subscriber part is no address part: an address string is not a subscriber, and vice versa.
    assert not tokens.check(tokens.issue(HOME_V6, "100.64.0.10"), HOME_V4)
    assert not tokens.check(tokens.issue(HOME_V6), HOME_V4, "C-1")
    assert not CsrfTokens(b"j" * 32, clock=lambda: 1_800_000_000.0).check(token, HOME_V4, "C-1")
    parts = token.split(".")
    for junk in (".".join(parts[:2]) + ".", token + "." + parts[2], f"{parts[0]}.{parts[2]}x.{parts[1]}",
                 f"{parts[0]}..{parts[2]}"):
        assert not tokens.check(junk, HOME_V4, "C-1"), junk


def test_a_subscriber_token_ages_like_any_other() -> None:
    now = [1_800_000_000.0]
    tokens = CsrfTokens(b"k" * 32, clock=lambda: now[0])
    token = tokens.issue(HOME_V6, "C-1")
    now[0] += 3600 + 60
    assert not tokens.check(token, HOME_V6) and not tokens.check(token, HOME_V4, "C-1")


# --- through the portal ----------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_page_fetched_over_one_ipv6_address_is_posted_from_another_of_the_64(config: Config) -> None:
    enforcer = Household()
    enforcer.owners.pop(HOME_V6_OTHER)   # even with no subscriber to name: the /64 is enough
    async with portal(config, enforcer) as client:
        fields = await form_from(client, HOME_V6)
        enforcer.looked_up.clear()
        response = await continue_from(client, HOME_V6_OTHER, fields)
        assert response.status == 303 and response.headers["Location"] == PORTAL_URL
    assert enforcer.acknowledged == [HOME_V6_OTHER]  # the POST's own address, as ever
    # the token names a subscriber, so the lookup is asked; it names nobody here: the /64 decides
    assert enforcer.looked_up == [HOME_V6_OTHER]


@pytest.mark.asyncio
@pytest.mark.parametrize("page,post", [(HOME_V6, HOME_V4), (HOME_V4, HOME_V6)])
async def test_a_page_fetched_over_one_family_is_posted_over_the_other(config: Config, page: str,
                                                                       post: str) -> None:
    enforcer = Household()
    async with portal(config, enforcer) as client:
        response = await continue_from(client, post, await form_from(client, page))
        assert response.status == 303 and response.headers["Location"] == PORTAL_URL
    assert enforcer.acknowledged == [post]


@pytest.mark.asyncio
async def test_another_subscribers_address_cannot_use_the_token(config: Config) -> None:
    enforcer = Household()
    async with portal(config, enforcer) as client:
        response = await continue_from(client, NEIGHBOUR_V4, await form_from(client, HOME_V6))
        assert response.status == 403 and EN["title_expired"] in await response.text()
    assert enforcer.acknowledged == []


@pytest.mark.asyncio
async def test_without_the_enforcer_the_other_family_is_refused(config: Config) -> None:
    enforcer = Household()
    async with portal(config, enforcer) as client:
        fields = await form_from(client, HOME_V6)
        enforcer.down = True
        assert (await continue_from(client, HOME_V4, fields)).status == 403
    assert enforcer.acknowledged == []


@pytest.mark.asyncio
async def test_a_token_naming_no_subscriber_costs_no_lookup_from_another_address(config: Config) -> None:
    enforcer = Household()
    async with portal(config, enforcer) as client:
        token = client.app[CSRF_KEY].issue(HOME_V6)
        response = await continue_from(client, HOME_V4, {"csrf": token, "lang": "en"})
        assert response.status == 403
    assert enforcer.looked_up == [] and enforcer.acknowledged == []


@pytest.mark.asyncio
async def test_subscribers_sharing_a_64_cannot_use_each_others_token(config: Config) -> None:
    """Where each subscriber has a /128 on one shared /64, the /64 alone would let one
    subscriber's page token act for another (a forged auto-POST from an old browser that sends
    no Origin): a token naming a subscriber is checked against the subscriber the lookup names."""
    enforcer = Household()
    enforcer.owners[HOME_V6_OTHER] = "C-3"   # the same /64, another subscriber
    async with portal(config, enforcer) as client:
        fields = await form_from(client, HOME_V6)
        response = await continue_from(client, HOME_V6_OTHER, fields)
        assert response.status == 403
    assert enforcer.acknowledged == []
