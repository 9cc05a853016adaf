"""Branding without code: colours, logo, a custom template, reworded texts, and ``validate``.

Also the page's accessibility and size promises: contrast of the default colours (WCAG),
one h1, labelled controls, focus styles, nothing external, under 30 KB with a 12 KB logo.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import re
from dataclasses import replace
from pathlib import Path

import pytest
from test_portal import NOTICE, OVERDUE, config, on_portal, portal, with_portal

from captive_portal.branding import (
    DARK,
    MAX_PAGE_BYTES,
    TEMPLATE_PLACEHOLDERS,
    builtin_template,
    contrast_ratio,
    logo_mime,
    on_color,
)
from captive_portal.catalogues import EN, MESSAGES
from captive_portal.config_check import validate
from captive_portal.page import Caller, Pages, largest_page
from enforcer.config import LANGUAGES, MAX_LOGO_BYTES, Branding, Config, PaymentLink, parse_config

__all__ = ["config"]  # the fixture, shared with test_portal

PNG = b"\x89PNG\r\n\x1a\n"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'


def branded(config: Config, **fields: str) -> Config:
    return with_portal(config, branding=replace(config.portal.branding, **fields))


def write_template(directory: Path, text: str) -> str:
    (directory / "page.html").write_text(text, encoding="utf-8")
    return str(directory)


MINIMAL_TEMPLATE = ('<!DOCTYPE html><html lang="$lang"><head><title>$title</title><style>$style</style></head>'
                    '<body class="isp $state">$logo<h1>$heading</h1><p>$summary</p>$details'
                    '<footer>$trust $languages</footer><p>$$5 off at $provider</p></body></html>')


# --- colours ---------------------------------------------------------------------------------------

def test_wcag_contrast_ratio() -> None:
    assert contrast_ratio("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast_ratio("#fff", "#fff") == pytest.approx(1.0)
    assert contrast_ratio("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert on_color("#0b5394") == "#ffffff" and on_color("#ffd54f") == "#000000"


@pytest.mark.parametrize("foreground,background", [
    ("text_color", "background_color"), ("primary_color", "background_color")])
def test_default_colours_have_enough_contrast(foreground: str, background: str) -> None:
    defaults = Branding()
    assert contrast_ratio(getattr(defaults, foreground), getattr(defaults, background)) >= 4.5
    assert contrast_ratio(DARK[foreground.removesuffix("_color")], DARK[background.removesuffix("_color")]) >= 4.5


def test_default_button_and_focus_colours_have_enough_contrast() -> None:
    defaults = Branding()
    assert contrast_ratio(on_color(defaults.primary_color), defaults.primary_color) >= 4.5
    assert contrast_ratio(on_color(DARK["primary"]), DARK["primary"]) >= 4.5
    # The focus ring is drawn in the text colour around links and buttons on the background.
    assert "outline:.1875rem solid var(--text)" in builtin_template().template


@pytest.mark.asyncio
async def test_branding_colours_become_css_custom_properties(config: Config) -> None:
    async with portal(branded(config, primary_color="#004d40", background_color="#ffffff",
                              text_color="#111")) as client:
        page = await (await client.get("/", headers=on_portal())).text()
    assert ":root{--primary:#004d40;--background:#ffffff;--text:#111;--on-primary:#ffffff}" in page
    assert "prefers-color-scheme" not in page  # the ISP's colours, exactly; no dark variant
    assert validate(branded(config, primary_color="#004d40", background_color="#ffffff", text_color="#111")) == []


def test_default_colours_also_get_a_dark_variant(config: Config) -> None:
    page = Pages.from_config(config).caller_page(Caller(OVERDUE))
    assert "@media (prefers-color-scheme:dark){:root{--primary:#8ab4f8;" in page


def test_poor_contrast_is_a_validate_problem(config: Config) -> None:
    problems = validate(branded(config, text_color="#999999", background_color="#ffffff", primary_color="#808080"))
    assert any(p.startswith("portal.branding.text_color: #999999 on background_color #ffffff") for p in problems)
    assert any(p.startswith("portal.branding.primary_color: #808080 on background_color") for p in problems)
    assert len(problems) == 2


@pytest.mark.parametrize("level", range(0, 256, 5))
def test_button_text_is_always_legible_whatever_the_primary_colour(level: int) -> None:
    for color in (f"#{level:02x}{level:02x}{level:02x}", f"#{level:02x}0000", f"#00{level:02x}00", f"#0000{level:02x}"):
        assert contrast_ratio(on_color(color), color) >= 4.5, color


# --- logo ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,mime", [
    (PNG + b"\0" * 20, "image/png"), (b"\xff\xd8\xff\xe0" + b"\0" * 20, "image/jpeg"), (b"GIF89a;", "image/gif"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"), (SVG, "image/svg+xml"), (b"\xef\xbb\xbf<svg/>", "image/svg+xml"),
    (b"<html>not an image</html>", None), (b"", None),
])
def test_logo_type_comes_from_the_content(data: bytes, mime: str | None) -> None:
    assert logo_mime(data) == mime


@pytest.mark.asyncio
@pytest.mark.parametrize("name,data,mime", [("logo.png", PNG + b"\1\2\3", "image/png"),
                                            ("logo.svg", SVG, "image/svg+xml"),
                                            ("logo.jpg", PNG + b"named wrong", "image/png")])
async def test_logo_is_inlined_as_a_data_uri(config: Config, tmp_path: Path, name: str, data: bytes,
                                             mime: str) -> None:
    (tmp_path / name).write_bytes(data)
    async with portal(branded(config, logo=str(tmp_path / name))) as client:
        response = await client.get("/", headers=on_portal())
        page = await response.text()
        assert "img-src data:" in response.headers["Content-Security-Policy"]
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    assert f'<img src="{uri}" alt="Example ISP" class="logo">' in page


def test_a_logo_that_is_no_image_is_left_out_and_reported(config: Config, tmp_path: Path) -> None:
    (tmp_path / "logo.png").write_text("<html>oops</html>")
    broken = branded(config, logo=str(tmp_path / "logo.png"))
    assert "<img" not in Pages.from_config(broken).caller_page(Caller(OVERDUE))
    assert validate(broken) == [
        f"portal.branding.logo: {tmp_path / 'logo.png'}: not a PNG, JPEG, GIF, WebP or SVG image"]


def test_page_stays_under_30_kb_with_a_12_kb_logo_in_every_language(config: Config, tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    room = MAX_LOGO_BYTES - len(PNG)
    logo.write_bytes(PNG + bytes(range(256)) * (room // 256) + b"\0" * (room % 256))
    assert logo.stat().st_size == MAX_LOGO_BYTES
    text = (f"state_dir: /nonexistent/wg-unit\nsubscribers: {{source: /nonexistent/wg-unit/l.yaml}}\n"
            f"walled_garden: {{allow: [pay.example]}}\n"
            f"portal:\n  show_account: true\n  branding: {{logo: {logo}}}\n"
            f"  payment_links: [{{label: Card, url: 'https://pay.example/card'}}, "
            f"{{label: Bank transfer, url: 'https://pay.example/bank'}}]\n"
            f"  provider: {{name: Example Regional Internet Provider, phone: '+420 800 123 456', "
            f"email: billing@isp.example, website: 'https://pay.example/', hours: 'Mon-Fri 8:00-18:00'}}\n")
    full = parse_config(text)
    pages = Pages.from_config(full)
    for language in LANGUAGES:
        for lookup in (NOTICE, OVERDUE, None):
            page = pages.caller_page(Caller(lookup, language, "2001:db8::1", "t" * 52, note="continue_failed"))
            assert len(page.encode()) < MAX_PAGE_BYTES, (language, lookup)
        assert len(pages.problem_page("too_many", language).encode()) < MAX_PAGE_BYTES
    language, size = largest_page(full)
    assert MAX_LOGO_BYTES * 4 / 3 < size < MAX_PAGE_BYTES
    assert validate(full) == []


# --- accessibility -----------------------------------------------------------------------------------

@pytest.mark.parametrize("language", LANGUAGES)
def test_page_structure_is_accessible(config: Config, language: str) -> None:
    page = Pages.from_config(config).caller_page(Caller(NOTICE, language, "100.64.0.1", "token"))
    assert f'<html lang="{language}">' in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    headings = re.findall(r"<h(\d)", page)
    assert headings[0] == "1" and headings.count("1") == 1
    assert all(int(b) - int(a) <= 1 for a, b in itertools.pairwise(headings))  # no skipped levels
    # The only visible control is a button whose text is its label; the rest are hidden fields.
    controls = re.findall(r"<(input|button|select|textarea)\b([^>]*)>", page)
    assert [tag for tag, _ in controls].count("button") == 1
    assert all('type="hidden"' in attrs for tag, attrs in controls if tag == "input")
    assert re.search(r"<button type=\"submit\">[^<]+</button>", page)
    assert ":focus-visible{outline:" in page
    assert re.search(r'<nav aria-label="[^"]+">', page)
    assert not re.search(r"<script|<link|<iframe|\bsrc=\"(?!data:)|@import|url\(", page, re.IGNORECASE)


# --- custom template ---------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_custom_template_replaces_the_built_in_one(config: Config, tmp_path: Path) -> None:
    custom = with_portal(config, templates_dir=write_template(tmp_path, MINIMAL_TEMPLATE),
                         provider=replace(config.portal.provider, name="Acme <Net>"))
    assert validate(custom) == []
    async with portal(custom) as client:
        page = await (await client.get("/", headers=on_portal(**{"Accept-Language": "hu"}))).text()
    assert page.startswith('<!DOCTYPE html><html lang="hu"><head><title>')
    assert '<body class="isp restricted">' in page
    assert f"<h1>{MESSAGES['hu']['heading_restricted']}</h1>" in page
    assert "<p>$5 off at Acme &lt;Net&gt;</p>" in page
    assert "--primary:" in page and "<nav aria-label=" in page


@pytest.mark.parametrize("text,expected", [
    (MINIMAL_TEMPLATE.replace("$summary", "$summry"),
     ["unknown placeholder $summry", "missing placeholder $summary"]),
    (MINIMAL_TEMPLATE.replace("$trust $languages", ""),
     ["missing placeholder $trust", "missing placeholder $languages"]),
    (MINIMAL_TEMPLATE.replace("$$5", "$5"), ["a '$' that is not a placeholder"]),
    (MINIMAL_TEMPLATE.replace("<style>", '<link rel="stylesheet" href="https://cdn.example/x.css"><style>'),
     ["loads scripts, stylesheets or images from elsewhere"]),
    (MINIMAL_TEMPLATE.replace("$logo", '<img src="//cdn.example/logo.png">'),
     ["loads scripts, stylesheets or images from elsewhere"]),
])
def test_template_problems_are_reported_and_the_template_is_not_used(config: Config, tmp_path: Path, text: str,
                                                                    expected: list[str]) -> None:
    custom = with_portal(config, templates_dir=write_template(tmp_path, text))
    problems = validate(custom)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert problem.startswith(f"portal.templates_dir ({tmp_path / 'page.html'}): ") and fragment in problem
    # At run time the built-in template stands in, rather than a broken page.
    page = Pages.from_config(custom).caller_page(Caller(OVERDUE))
    assert 'class="isp' not in page and '<p class="trust">' in page


def test_a_templates_dir_without_page_html_keeps_the_built_in_template(config: Config, tmp_path: Path) -> None:
    (tmp_path / "other.html").write_text("$nonsense")
    custom = with_portal(config, templates_dir=str(tmp_path))
    assert validate(custom) == []
    assert '<p class="trust">' in Pages.from_config(custom).caller_page(Caller(OVERDUE))


def test_an_unreadable_template_is_reported(config: Config, tmp_path: Path) -> None:
    (tmp_path / "page.html").write_bytes(b"\xff\xfe broken")
    problems = validate(with_portal(config, templates_dir=str(tmp_path)))
    assert len(problems) == 1 and "cannot read as UTF-8" in problems[0]


def test_template_placeholders_are_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "portal.md").read_text(encoding="utf-8")
    for name in TEMPLATE_PLACEHOLDERS:
        assert f"`${name}`" in docs, name
    used = set(builtin_template().get_identifiers())
    assert {name for name, required in TEMPLATE_PLACEHOLDERS.items() if required} <= used <= set(TEMPLATE_PLACEHOLDERS)


# --- texts ---------------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_texts_override_catalogue_strings_and_are_escaped(config: Config) -> None:
    texts = {"en": {"heading_restricted": "Oops <b>stop</b> & pay", "trust_call": "Ring $phone, not ${provider}!"},
             "cs": {"continue_button": "Pokračovat dál"}}
    async with portal(with_portal(config, texts=texts)) as client:
        english = await (await client.get("/", headers=on_portal())).text()
        czech = await (await client.get("/?lang=cs", headers=on_portal())).text()
    assert "<h1>Oops &lt;b&gt;stop&lt;/b&gt; &amp; pay</h1>" in english and "<b>" not in english
    assert 'Ring <a href="tel:+420123456789">+420 123 456 789</a>, not ${provider}!' in english
    assert MESSAGES["cs"]["heading_restricted"] in czech  # other languages and keys keep the catalogue
    assert EN["heading_restricted"] == "Your internet service is restricted"  # the catalogue is untouched
    problems = validate(with_portal(config, texts=texts))
    assert problems == [("portal.texts.en.trust_call: unknown placeholder $provider (this message can use only "
                         "$phone; write $$ for a dollar sign)")]


def test_texts_problems_name_their_key_path(config: Config) -> None:
    texts = {"cs": {"heading_restriced": "x", "pay_heading": " ", "summary_active": "Costs $5 a day",
                    "trust_named": "Od $provider a $$"},
             "de": {"heading_restricted": "Eingeschränkt"}}
    problems = validate(with_portal(config, texts=texts))
    assert problems == [
        "portal.texts.cs.heading_restriced: unknown message key (did you mean heading_restricted?)",
        "portal.texts.cs.pay_heading: empty text; leave the key out to keep the catalogue's",
        "portal.texts.cs.summary_active: a lone '$'; write $$ for a dollar sign",
        "portal.texts.de: no catalogue for this language (have en, cs, hu, es, uk, ru, pt); add de.po to "
        "portal.locale_dir (docs/portal.md, Texts and languages)",
    ]


def test_validate_is_quiet_for_a_plain_config(config: Config) -> None:
    assert validate(config) == []
    links = (PaymentLink("Card", "https://pay.example/"),)
    garden = dataclasses.replace(config.walled_garden, allow_hosts=("pay.example",))   # check-config wants it
    paying = dataclasses.replace(config, walled_garden=garden)
    assert validate(with_portal(paying, payment_links=links, show_account=True, default_language="uk")) == []
