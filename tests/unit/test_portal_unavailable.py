"""The page while the enforcer cannot be asked (down, restarting): neither restricted nor active.

Every caller gets this page then, paying customers included, so it used to tell all of them
"Your internet service is restricted". Now it says that the account cannot be checked right
now and, for a service that does not work, how to pay and whom to call: never "restricted",
never "active", no reason, no reference code, no buttons.
"""

from __future__ import annotations

import pytest
from test_portal import (
    FREE,
    NOTICE,
    OVERDUE,
    WEBSITE,
    FakeEnforcer,
    config,
    on_portal,
    portal,
    with_portal,
    with_provider,
)
from test_portal_continue import form_fields, post_continue

from captive_portal.app import CAPTIVE_JSON
from captive_portal.catalogues import MESSAGES
from captive_portal.messages import MessageKey
from captive_portal.page import Caller, Pages
from enforcer.config import LANGUAGES, Config, PaymentLink

__all__ = ["config"]  # the fixture, shared with test_portal

#: Messages that claim a state, or need one to be true; none of them belongs on this page.
CLAIMS: list[MessageKey] = [
    "title_restricted", "heading_restricted", "summary_restricted", "title_active", "heading_active",
    "summary_active", "title_notice", "heading_notice", "summary_throttle", "pay_restore", "pay_contact",
    "reason_overdue", "reason_other", "continue_button", "promise_button"]


@pytest.mark.asyncio
@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_page_without_the_enforcer_claims_nothing_and_says_how_to_pay_and_whom_to_call(
        config: Config, language: str) -> None:
    links = (PaymentLink("Pay by card", "http://pay.isp.example/card"),)
    async with portal(with_portal(config, payment_links=links), FakeEnforcer(None)) as client:
        response = await client.get(f"/?lang={language}", headers=on_portal())
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        page = await response.text()
    m = MESSAGES[language]
    assert f"<title>{m['title_unknown']}</title>" in page and f"<h1>{m['heading_unknown']}</h1>" in page
    assert f"<p>{m['summary_unknown']}</p>" in page and '<body class="unknown">' in page
    for key in CLAIMS:
        assert m[key] not in page, (language, key)  # type: ignore[literal-required]
    assert m["pay_heading"] in page and 'href="http://pay.isp.example/card"' in page and f'href="{WEBSITE}"' in page
    assert 'href="tel:+420123456789"' in page and 'href="mailto:help@isp.example"' in page
    assert m["contact_hours"] in page and "<code>" not in page and "<form" not in page


def test_without_payment_details_the_page_leaves_out_how_to_pay_rather_than_claim_a_debt(config: Config) -> None:
    bare = with_provider(config, website="")
    page = Pages(bare.portal).caller_page(Caller(None, "en"))
    en = MESSAGES["en"]
    assert en["pay_heading"] not in page and en["pay_contact"] not in page
    assert en["heading_unknown"] in page and 'href="tel:+420123456789"' in page  # whom to call stays


def test_every_shipped_language_words_the_page_itself() -> None:
    for language in LANGUAGES:
        if language == "en":
            continue
        for key in ("title_unknown", "heading_unknown", "summary_unknown"):
            assert MESSAGES[language][key] != MESSAGES["en"][key], (language, key)  # type: ignore[literal-required]


@pytest.mark.asyncio
async def test_a_post_while_the_enforcer_is_down_says_try_again_on_the_same_neutral_page(config: Config) -> None:
    enforcer = FakeEnforcer(NOTICE, ack=None)
    async with portal(config, enforcer) as client:
        fields = form_fields(await (await client.get("/", headers=on_portal())).text())
        enforcer.result = None  # down for lookups too now
        response = await post_continue(client, fields)
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        page = await response.text()
    en = MESSAGES["en"]
    assert en["continue_failed"] in page and f"<h1>{en['heading_unknown']}</h1>" in page
    assert en["heading_restricted"] not in page


@pytest.mark.asyncio
async def test_the_captive_api_without_the_enforcer_is_a_503_that_claims_nothing(config: Config) -> None:
    """What /api/captive does then (unchanged): 503 with Retry-After, no ``captive`` either way."""
    async with portal(config, FakeEnforcer(None)) as client:
        response = await client.get("/api/captive", headers=on_portal())
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        assert response.headers["Cache-Control"] == "private, no-store"
        answer = await response.json()
    assert "captive" not in answer and answer["error"] == "enforcer-unavailable"
    assert answer["user-portal-url"] == "http://portal.isp.example/"
    assert response.headers["Content-Type"] != CAPTIVE_JSON  # an error, not an RFC 8908 status


def test_the_enforcer_answering_again_brings_the_real_page_back(config: Config) -> None:
    pages = Pages(config.portal)
    en = MESSAGES["en"]
    assert en["heading_restricted"] in pages.caller_page(Caller(OVERDUE, "en"))
    assert en["heading_active"] in pages.caller_page(Caller(FREE, "en"))
