"""Per-reason page variants (``portal.reasons``, docs/portal.md, Pages per reason): a subscriber
restricted for a configured reason sees that reason's texts and template, everyone else the default
page, and check-config names what is wrong with a variant."""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

import pytest
from test_portal import FREE, NOTICE, OVERDUE, FakeEnforcer, on_portal, portal

from captive_portal.branding import builtin_template
from captive_portal.catalogues import MESSAGES
from captive_portal.config_check import validate
from captive_portal.enforcer_client import Lookup
from captive_portal.page import Caller, Pages
from enforcer.config import Config, ConfigError, ReasonPage, parse_config

CONFIG = """
state_dir: /nonexistent/wg-unit
subscribers: {source: /nonexistent/wg-unit/list.yaml}
portal:
  url: "http://portal.isp.example/"
  provider: {name: "Example ISP", phone: "+420 123 456 789"}
  reasons:
    fair-use:
      texts:
        en: {heading_restricted: "You have used this month's data",
             summary_restricted: "Browsing is back at full speed on the 1st, or buy more data now.",
             heading_notice: "You are close to this month's data"}
        cs: {heading_restricted: "Vyčerpali jste data na tento měsíc"}
    suspended:
      template: suspended.html
"""
SUSPENDED_PAGE = builtin_template().template.replace("<main>", '<main class="suspended-variant">')
FAIR_USE = replace(OVERDUE, reason="fair-use")


def write_config(tmp_path: Path, text: str = CONFIG, template: str = SUSPENDED_PAGE) -> Config:
    (tmp_path / "suspended.html").write_text(template)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return parse_config(text, str(path))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path)


def heading(page: str) -> str:
    return html.unescape(page.split("<h1>", 1)[1].split("</h1>", 1)[0])


def test_reasons_are_read_by_their_normal_form(config: Config, tmp_path: Path) -> None:
    assert set(config.portal.reasons) == {"fair_use", "suspended"}
    assert config.portal.reasons["suspended"] == ReasonPage(template=str(tmp_path / "suspended.html"))
    assert config.portal.reasons["fair_use"].texts["cs"] == {"heading_restricted": "Vyčerpali jste data na tento měsíc"}
    assert validate(config) == []


def test_a_fair_use_subscriber_sees_the_fair_use_page(config: Config) -> None:
    pages = Pages.from_config(config)
    page = pages.caller_page(Caller(FAIR_USE, "en"))
    assert heading(page) == "You have used this month's data"
    assert "Browsing is back at full speed on the 1st" in page
    assert MESSAGES["en"]["reason_fair_use"] in page       # what the variant leaves alone stays the page's
    assert MESSAGES["en"]["pay_heading"] in page and "suspended-variant" not in page
    # However billing spells it, and its alias: the same variant.
    for reason in ("Fair Use", "FAIR_USE", "fup"):
        assert heading(pages.caller_page(Caller(replace(OVERDUE, reason=reason), "en"))) == heading(page)


def test_a_variant_speaks_only_the_languages_it_rewords(config: Config) -> None:
    pages = Pages.from_config(config)
    assert heading(pages.caller_page(Caller(FAIR_USE, "cs"))) == "Vyčerpali jste data na tento měsíc"
    hungarian = pages.caller_page(Caller(FAIR_USE, "hu"))
    assert heading(hungarian) == MESSAGES["hu"]["heading_restricted"]   # the default page, in Hungarian
    assert MESSAGES["hu"]["reason_fair_use"] in hungarian


@pytest.mark.parametrize("lookup", [OVERDUE, replace(OVERDUE, reason="no-such-reason"), replace(OVERDUE, reason=""),
                                    FREE, replace(FREE, reason="fair-use"), None])
def test_any_other_caller_gets_the_default_page(config: Config, lookup: Lookup | None) -> None:
    pages = Pages.from_config(config)
    page = pages.caller_page(Caller(lookup, "en"))
    assert heading(page) != "You have used this month's data" and "suspended-variant" not in page
    assert page == Pages.from_config(replace(config, portal=replace(config.portal, reasons={}))).caller_page(
        Caller(lookup, "en"))
    if lookup is not None and lookup.reason == "no-such-reason":
        assert MESSAGES["en"]["reason_other"] in page


def test_a_variant_covers_every_state_of_its_reason(config: Config) -> None:
    pages = Pages.from_config(config)
    notice = pages.caller_page(Caller(replace(NOTICE, reason="fair_use"), "en"))
    assert heading(notice) == "You are close to this month's data" and 'action="/continue"' in notice


def test_a_reason_with_its_own_template(config: Config) -> None:
    pages = Pages.from_config(config)
    page = pages.caller_page(Caller(replace(OVERDUE, reason="Suspended"), "uk"))
    assert '<main class="suspended-variant">' in page and MESSAGES["uk"]["reason_suspended"] in page
    assert "suspended-variant" not in pages.problem_page("expired", "uk")  # no caller, no reason


@pytest.mark.asyncio
async def test_the_portal_serves_the_variant(config: Config) -> None:
    async with portal(config, FakeEnforcer(FAIR_USE)) as client:
        response = await client.get("/", headers=on_portal(**{"Accept-Language": "cs-CZ,cs;q=0.9"}))
        assert response.status == 200
        assert heading(await response.text()) == "Vyčerpali jste data na tento měsíc"


def test_check_config_names_what_is_wrong_with_a_variant(tmp_path: Path) -> None:
    text = CONFIG.replace('cs: {heading_restricted: "Vyčerpali jste data na tento měsíc"}',
                          'cs: {heading_restricted: "Dlužíte $amount Kč"}\n        de: {heading_restricted: "Daten"}')
    config = write_config(tmp_path, text, template=SUSPENDED_PAGE.replace("$details", ""))
    problems = validate(config)
    assert problems == [
        "portal.reasons.fair_use.texts.cs.heading_restricted: unknown placeholder $amount (this message can use "
        "none; write $$ for a dollar sign)",
        "portal.reasons.fair_use.texts.de: no catalogue for this language (have en, cs, hu, es, uk, ru, pt); add "
        "de.po to portal.locale_dir (docs/portal.md, Texts and languages)",
        f"portal.reasons.suspended.template ({tmp_path / 'suspended.html'}): missing placeholder $details",
    ]
    # At run time: a template with problems is not used (the page's own is), and the page never
    # learns an amount: there is no such placeholder, the text shows as written.
    pages = Pages.from_config(config)
    page = pages.caller_page(Caller(replace(OVERDUE, reason="suspended"), "en"))
    assert "suspended-variant" not in page and MESSAGES["en"]["reason_suspended"] in page
    assert heading(pages.caller_page(Caller(FAIR_USE, "cs"))) == "Dlužíte $amount Kč"


def test_the_size_check_weighs_every_variant(config: Config) -> None:
    long = "x" * 31_000
    reasons = {**config.portal.reasons, "security": ReasonPage(texts={"pt": {"summary_notice": long}})}
    problems = validate(replace(config, portal=replace(config.portal, reasons=reasons)))
    assert len(problems) == 1 and "in 'pt, reason security'" in problems[0]


def test_config_refuses_what_cannot_be_a_variant(tmp_path: Path) -> None:
    text = CONFIG.replace("    suspended:\n      template: suspended.html\n",
                          "    fair_use: {}\n    overdue: {template: missing.html, title: Overdue}\n"
                          "    notice: [1, 2]\n")
    with pytest.raises(ConfigError) as raised:
        write_config(tmp_path, text)
    message = str(raised.value)
    assert "portal.reasons.fair_use" in message and "the same reason as another key here ('fair_use'" in message
    assert f"{tmp_path / 'missing.html'}: no such file" in message
    assert "portal.reasons.overdue.title" in message and "unknown key" in message
    assert "portal.reasons.notice" in message and "expected a mapping" in message
