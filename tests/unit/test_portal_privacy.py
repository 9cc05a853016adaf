"""Devices sharing one address (a household, a waiting room behind one NAT'd IPv4) never learn
where each other were going.

The portal notes the URL a redirected device asked for, so "Continue" can take it back there.
Keyed by address alone, a phone pressing "Continue" after the laptop was redirected went to the
laptop's URL, query string and all, and the page showed that URL as link text. Now the URL is
keyed by address and ``User-Agent`` and the page links to it under a fixed sentence.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
from aiohttp.test_utils import TestClient
from test_portal import FREE, NOTICE, PORTAL_URL, FakeEnforcer, config, on_portal, portal
from test_portal_continue import form_fields, post_continue

from captive_portal.app import URLS_KEY
from captive_portal.catalogues import EN, MESSAGES
from captive_portal.enforcer_client import Lookup
from captive_portal.original_urls import OriginalUrls, device_key
from enforcer.config import Config

__all__ = ["config"]  # the fixture, shared with test_portal

PRIVATE = "http://example.com/clinic/results?patient=jane.doe"
LAPTOP = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PHONE = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/126.0 Mobile Safari/537.36"
BACK = re.compile(r'<p class="back">(.*?)</p>', re.DOTALL)


async def redirected(client: TestClient, url: str, user_agent: str | None) -> None:
    _, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    headers = {"Host": host, **({"User-Agent": user_agent} if user_agent is not None else {})}
    response = await client.get("/" + path, headers=headers, allow_redirects=False, skip_auto_headers=["User-Agent"])
    assert response.status == 302 and response.headers["Location"] == PORTAL_URL  # SPEC §5: exactly portal.url


async def page_of(client: TestClient, user_agent: str, query: str = "") -> str:
    response = await client.get("/" + query, headers=on_portal(**{"User-Agent": user_agent}))
    assert response.status == 200
    return await response.text()


def visible_text(page: str) -> str:
    """What a person sees: the page without tags (attribute values, such as an href, included)."""
    return re.sub(r"<[^>]*>", " ", page)


@pytest.mark.asyncio
async def test_another_device_of_the_same_address_continues_to_the_portal_not_to_the_first_ones_url(
        config: Config) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        await redirected(client, PRIVATE, LAPTOP)
        phone_page = await page_of(client, PHONE)
        assert "jane.doe" not in phone_page and "clinic" not in phone_page
        laptop_fields = form_fields(await page_of(client, LAPTOP))
        response = await post_continue(client, form_fields(phone_page), **{"User-Agent": PHONE})
        assert response.status == 303 and response.headers["Location"] == PORTAL_URL
        # The laptop still has its own, query string and all, for itself alone.
        laptop = await post_continue(client, laptop_fields, **{"User-Agent": LAPTOP})
        assert laptop.status == 303 and laptop.headers["Location"] == PRIVATE


@pytest.mark.asyncio
async def test_each_device_behind_one_address_goes_back_to_its_own_page(config: Config) -> None:
    async with portal(config, FakeEnforcer(NOTICE)) as client:
        await redirected(client, PRIVATE, LAPTOP)
        await redirected(client, "http://news.example/today", PHONE)
        await redirected(client, "http://app.example/sync", None)  # no User-Agent at all: a device too
        fields = form_fields(await page_of(client, PHONE))
        assert (await post_continue(client, fields, **{"User-Agent": PHONE})).headers["Location"] \
            == "http://news.example/today"
        assert (await post_continue(client, fields, **{"User-Agent": LAPTOP})).headers["Location"] == PRIVATE
    assert len(client.app[URLS_KEY]) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("lookup", [FREE, replace(NOTICE, ack_until=time.time() + 86_400)])
async def test_the_page_links_back_under_a_sentence_and_never_shows_the_url(config: Config, lookup: Lookup) -> None:
    async with portal(config, FakeEnforcer(lookup)) as client:
        await redirected(client, PRIVATE, LAPTOP)
        laptop = await page_of(client, LAPTOP)
        czech = await page_of(client, LAPTOP, "?lang=cs")
        phone = await page_of(client, PHONE)
    back = BACK.search(laptop)
    assert back, laptop
    href = PRIVATE.replace("&", "&amp;")
    assert back.group(1) == f'<a href="{href}">{EN["back_to_page"]}</a>'
    assert f'>{MESSAGES["cs"]["back_to_page"]}</a>' in czech
    assert "jane.doe" not in re.sub(r'href="[^"]*"', "", laptop)  # the target only, never text
    assert "example.com" not in visible_text(laptop).replace(PRIVATE, "")
    # The other device gets no link at all, and nothing of the URL anywhere in its page.
    assert not BACK.search(phone) and "jane.doe" not in phone and "clinic" not in phone


def test_remembered_urls_are_keyed_by_address_and_user_agent() -> None:
    urls = OriginalUrls()
    urls.remember("100.64.0.7", PRIVATE, user_agent=LAPTOP)
    assert urls.peek("100.64.0.7", user_agent=PHONE) is None and urls.pop("100.64.0.7", user_agent=None) is None
    assert urls.peek("100.64.0.8", user_agent=LAPTOP) is None
    assert urls.pop("100.64.0.7", user_agent=LAPTOP) == PRIVATE and len(urls) == 0
    # The key is not the User-Agent itself, and "none sent" is a device of its own like any other.
    assert LAPTOP not in device_key("100.64.0.7", LAPTOP)
    assert device_key("100.64.0.7", None) == device_key("100.64.0.7", "") != device_key("100.64.0.7", LAPTOP)
    assert device_key("100.64.0.7", "\udcff odd") != device_key("100.64.0.8", "\udcff odd")  # any str hashes
