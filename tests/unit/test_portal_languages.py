"""The portal's languages as gettext catalogues (docs/portal.md, Texts and languages): the shipped
ones complete and sound, plural forms, dates and numbers by each language's rules, and a
provider's catalogue dropped into ``portal.locale_dir`` working without any code change."""

from __future__ import annotations

import gettext
import io
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.plurals import get_plural
from babel.messages.pofile import read_po, write_po
from test_portal import OVERDUE, FakeEnforcer, config, on_portal, portal, with_portal

from captive_portal import catalogues
from captive_portal.branding import text_placeholders
from captive_portal.catalogues import MESSAGE_KEYS, SHIPPED, TERM_KEYS, shipped
from captive_portal.config_check import validate
from captive_portal.config_check import warnings as portal_warnings
from captive_portal.enforcer_client import PromiseOffer
from captive_portal.messages import PLACEHOLDERS
from captive_portal.page import Caller, Pages, term_text
from enforcer.config import LANGUAGES, Config, ConfigError, parse_config

__all__ = ["config"]  # the fixture, shared with test_portal

LOCALE = Path(__file__).resolve().parents[2] / "captive_portal" / "locale"
PRAGUE = ZoneInfo("Europe/Prague")


def template() -> Catalog:
    with (LOCALE / "messages.pot").open("rb") as file:
        return read_po(file)


def shipped_po(code: str) -> Catalog:
    with (LOCALE / f"{code}.po").open("rb") as file:
        return read_po(file, locale=code)


# --- the shipped catalogues ----------------------------------------------------------------------

def test_the_template_names_every_message_key_and_the_plural_terms() -> None:
    contexts = [m.context for m in template() if m.id]
    assert sorted(contexts) == sorted([*MESSAGE_KEYS, *TERM_KEYS.values()])
    assert len(contexts) == len(set(contexts))


def test_the_shipped_languages_are_the_catalogue_files() -> None:
    files = {path.stem for path in LOCALE.glob("*.po")}
    assert SHIPPED == LANGUAGES and files == set(SHIPPED) - {"en"}  # English is the template's own text
    assert list(shipped()) == list(SHIPPED)


@pytest.mark.parametrize("code", [c for c in SHIPPED if c != "en"])
def test_every_shipped_catalogue_translates_every_message_of_the_template(code: str) -> None:
    catalog = shipped_po(code)
    wanted = {(m.context, m.id if isinstance(m.id, str) else tuple(m.id)) for m in template() if m.id}
    have = {(m.context, m.id if isinstance(m.id, str) else tuple(m.id)): m for m in catalog if m.id}
    assert set(have) == wanted, "msgids differ from messages.pot: update the catalogue from the template"
    for message in have.values():
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        assert all(s.strip() for s in strings) and not message.fuzzy, f"{code}: {message.context} untranslated"
    assert shipped()[code].untranslated() == []


@pytest.mark.parametrize("code", [c for c in SHIPPED if c != "en"])
def test_every_shipped_catalogue_uses_the_placeholders_of_its_english(code: str) -> None:
    english = {m.context: m.id for m in template() if m.id}
    for message in shipped_po(code):
        if not message.id:
            continue
        if isinstance(message.string, tuple):  # plural: every form carries $count
            assert all(text_placeholders(s) == ({"count"}, False) for s in message.string), message.context
            continue
        names, stray = text_placeholders(message.string)
        assert not stray and names == set(PLACEHOLDERS.get(str(message.context), frozenset())), message.context
        assert names == text_placeholders(str(english[message.context]))[0]


@pytest.mark.parametrize("code", [c for c in SHIPPED if c != "en"])
def test_every_shipped_catalogue_has_plural_forms_that_compile_and_agree_with_cldr(code: str) -> None:
    catalog = shipped_po(code)
    header = dict(catalog.mime_headers)["Plural-Forms"]
    count = int(re.search(r"nplurals\s*=\s*(\d+)", header).group(1))  # type: ignore[union-attr]
    rule = gettext.c2py(header.split("plural=", 1)[1].rstrip(";"))
    babel_count, babel_expr = get_plural(code)
    babel_rule = gettext.c2py(babel_expr)
    assert count == babel_count
    assert all(rule(n) == babel_rule(n) and 0 <= rule(n) < count for n in range(1001))
    for message in catalog:
        if message.id and isinstance(message.string, tuple):
            assert len(message.string) == count, message.context


def test_the_portal_has_no_hand_written_plural_or_date_rules() -> None:
    source = (LOCALE.parent / "messages.py").read_text() + (LOCALE.parent / "page.py").read_text()
    for gone in ("TERM_UNITS", "DATE_FORMATS", "MONTH_NAMES", "def plural_form", "n % 10"):
        assert gone not in source


# --- plural forms, dates and numbers ---------------------------------------------------------------

DAY = 86400.0


def test_plural_forms_of_the_shipped_languages() -> None:
    def days(code: str, *counts: int) -> list[str]:
        return [term_text(n * DAY, code) for n in counts]

    assert days("en", 1, 2) == ["1 day", "2 days"]
    assert days("cs", 1, 2, 4, 5, 21) == ["1 den", "2 dny", "4 dny", "5 dní", "21 dní"]
    assert days("ru", 1, 2, 5, 11, 12, 21, 22, 25, 111) == [
        "1 день", "2 дня", "5 дней", "11 дней", "12 дней", "21 день", "22 дня", "25 дней", "111 дней"]
    assert days("uk", 1, 3, 12, 21) == ["1 день", "3 дні", "12 днів", "21 день"]
    assert days("hu", 1, 3) == ["1 napra", "3 napra"]
    assert term_text(36 * 3600, "pt") == "36 horas" and term_text(1800, "es") == "1 hora"


def test_numbers_are_written_as_the_language_writes_them() -> None:
    hours = 1000 * 3600.0 + 3600  # not whole days: 1001 hours
    assert term_text(hours, "en") == "1,001 hours"
    assert term_text(hours, "cs") == "1\xa0001 hodin"   # CLDR: a no-break space groups thousands
    assert term_text(hours, "pt") == "1.001 horas"


def test_dates_are_written_as_each_language_writes_them() -> None:
    when = datetime(2026, 12, 24, 17, 5, tzinfo=UTC).astimezone(PRAGUE)
    dates = {code: catalogue.date(when) for code, catalogue in shipped().items()}
    assert dates["en"] == "Dec 24, 2026, 18:05"
    assert dates["cs"] == "24. prosince 2026 18:05"
    assert dates["ru"] == "24 дек. 2026\u202fг., 18:05"
    assert dates["hu"] == "2026. dec. 24. 18:05"


def test_the_page_date_names_the_operators_zone() -> None:
    pages = Pages(parse_config(CONFIG).portal, tz=PRAGUE)
    assert pages.date(datetime(2026, 7, 1, 10, 0, tzinfo=UTC).timestamp(), "cs") == "1. července 2026 12:00 CEST"


# --- a provider's catalogue: Polish and German dropped in ------------------------------------------

CONFIG = """
state_dir: /nonexistent/wg-unit
subscribers: {source: /nonexistent/wg-unit/list.yaml}
portal: {url: "http://portal.isp.example/", provider: {name: "Example ISP", phone: "+48 22 000 00 00"}}
api: {socket: /nonexistent/wg-unit/control.sock}
"""

#: A few real sentences; every other message gets "[xx] " + English (a complete catalogue all the same).
POLISH = {"heading_restricted": "Twój dostęp do internetu jest ograniczony", "language_label": "Język",
          "reason_overdue": "Powód: zaległa płatność na Twoim koncie.",
          "promise_intro": "Jeśli nie możesz zapłacić teraz, odzyskasz pełną usługę na $term.",
          "summary_promised": "Usługa działa do $until."}
POLISH_TERMS = {"term_days": ("$count dzień", "$count dni", "$count dni"),
                "term_hours": ("$count godzinę", "$count godziny", "$count godzin")}
GERMAN = {"heading_restricted": "Ihr Internetzugang ist eingeschränkt", "language_label": "Sprache",
          "promise_intro": "Wenn Sie jetzt nicht zahlen können, erhalten Sie den vollen Dienst für $term zurück."}
GERMAN_TERMS = {"term_days": ("$count Tag", "$count Tage"), "term_hours": ("$count Stunde", "$count Stunden")}


def catalogue_file(code: str, texts: dict[str, str], terms: dict[str, tuple[str, ...]], *,
                   complete: bool = True, plural_forms: str | None = None) -> bytes:
    """A ``.po`` made the way docs/portal.md tells a provider: the template, translated."""
    catalog = read_po(io.BytesIO((LOCALE / "messages.pot").read_bytes()), locale=code)
    for message in catalog:
        if not message.id:
            continue
        key = str(message.context)
        if isinstance(message.id, tuple):
            message.string = terms.get(key, ("",) * catalog.num_plurals)
        elif key in texts:
            message.string = texts[key]
        elif complete:
            message.string = f"[{code}] {message.id}"
    buffer = io.BytesIO()
    write_po(buffer, catalog)
    data = buffer.getvalue()
    if plural_forms is not None:
        data = re.sub(rb'"Plural-Forms: [^"]*"', f'"Plural-Forms: {plural_forms}\\\\n"'.encode(), data)
    return data


@pytest.fixture
def locale_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "locale"
    directory.mkdir()
    (directory / "pl.po").write_bytes(catalogue_file("pl", POLISH, POLISH_TERMS))
    (directory / "de.po").write_bytes(catalogue_file("de", GERMAN, GERMAN_TERMS))
    return directory


def with_locale(directory: Path, extra: str = "") -> Config:
    return parse_config(CONFIG.replace("portal: {", f"portal: {{locale_dir: {directory}, {extra}"))


def test_a_dropped_in_catalogue_adds_its_language_without_code(locale_dir: Path) -> None:
    config = with_locale(locale_dir, "default_language: pl, texts: {de: {pay_heading: Bezahlen}}, ")
    assert config.portal.default_language == "pl" and config.portal.texts == {"de": {"pay_heading": "Bezahlen"}}
    assert validate(config) == [] and portal_warnings(config) == []
    pages = Pages.from_config(config)
    assert list(pages.messages) == [*SHIPPED, "de", "pl"]
    polish = pages.caller_page(Caller(OVERDUE, "pl"))
    assert '<html lang="pl">' in polish and POLISH["heading_restricted"] in polish
    assert POLISH["reason_overdue"] in polish and 'aria-label="Język"' in polish
    assert ">Polski</a>" in polish and ">Deutsch</a>" in polish and ">Čeština</a>" in polish
    german = pages.caller_page(Caller(OVERDUE, "de"))
    assert GERMAN["heading_restricted"] in german and "<h2>Bezahlen</h2>" in german


def test_plural_forms_of_dropped_in_languages(locale_dir: Path) -> None:
    languages = catalogues.load(str(locale_dir))
    assert [term_text(n * DAY, "pl", languages) for n in (1, 2, 5, 12, 22, 25)] == [
        "1 dzień", "2 dni", "5 dni", "12 dni", "22 dni", "25 dni"]
    assert [term_text(n * 3600.0, "pl", languages) for n in (1, 2, 5, 12, 22, 25)] == [
        "1 godzinę", "2 godziny", "5 godzin", "12 godzin", "22 godziny", "25 godzin"]
    assert [term_text(n * DAY, "de", languages) for n in (1, 3)] == ["1 Tag", "3 Tage"]
    assert term_text(1001 * 3600.0, "de", languages) == "1.001 Stunden"
    when = datetime(2026, 12, 24, 17, 5, tzinfo=UTC).astimezone(PRAGUE)
    assert languages["pl"].date(when) == "24 grudnia 2026, 18:05"
    assert languages["de"].date(when) == "24. Dez. 2026, 18:05"


@pytest.mark.asyncio
async def test_accept_language_finds_dropped_in_languages(locale_dir: Path) -> None:
    config = with_locale(locale_dir)
    lookup = replace(OVERDUE, promise=PromiseOffer(True, "eligible", 3 * DAY))
    async with portal(config, FakeEnforcer(lookup)) as client:
        async def page(**headers: str) -> tuple[str, str]:
            response = await client.get("/", headers=on_portal(**headers))
            assert response.status == 200
            return response.headers["Content-Language"], await response.text()

        language, text = await page(**{"Accept-Language": "de-AT,de;q=0.9,en;q=0.5"})
        assert language == "de" and GERMAN["heading_restricted"] in text and "für 3 Tage zurück" in text
        language, text = await page(**{"Accept-Language": "fr-FR,pl;q=0.8"})
        assert language == "pl" and "na 3 dni." in text
        language, _ = await page(**{"Accept-Language": "fr"})
        assert language == "en"  # default_language: en, as ever
        response = await client.get("/?lang=pl", headers=on_portal(**{"Accept-Language": "de"}))
        assert response.headers["Content-Language"] == "pl"
        response = await client.get("/?lang=de_AT", headers=on_portal(**{"Accept-Language": "pl_PL"}))
        assert response.headers["Content-Language"] == "de"
        language, _ = await page(**{"Accept-Language": "pl_PL"})
        assert language == "pl"


def test_a_catalogue_for_a_shipped_language_rewords_it_and_falls_back_to_it(tmp_path: Path) -> None:
    (tmp_path / "pt_BR.po").write_bytes(catalogue_file("pt_BR", {"heading_restricted": "Seu acesso está bloqueado"},
                                                       {}, complete=False))
    (tmp_path / "cs.po").write_bytes(catalogue_file("cs", {"pay_heading": "Jak zaplatit fakturu"}, {},
                                                    complete=False))
    config = with_locale(tmp_path)
    pages = Pages.from_config(config)
    czech = pages.caller_page(Caller(OVERDUE, "cs"))
    assert "<h2>Jak zaplatit fakturu</h2>" in czech and shipped()["cs"].text("heading_restricted") in czech
    assert term_text(5 * DAY, "cs", pages.languages) == "5 dní"  # the shipped plural forms still answer
    brazil = pages.caller_page(Caller(OVERDUE, "pt-br"))
    assert '<html lang="pt-br">' in brazil and "Seu acesso está bloqueado" in brazil
    assert ">Português (Brasil)</a>" in brazil
    assert validate(config) == []
    # Brazilian Portuguese has no shipped catalogue behind it: what it leaves out is English, said once.
    untranslated = len(MESSAGE_KEYS) + len(TERM_KEYS) - 1
    assert len(warnings := portal_warnings(config)) == 1
    assert f"pt_BR.po: {untranslated} message(s) not translated, shown in English: title_restricted," in warnings[0]


def test_a_compiled_mo_catalogue_works_too(tmp_path: Path) -> None:
    catalog = read_po(io.BytesIO(catalogue_file("de", GERMAN, GERMAN_TERMS)), locale="de")
    with (tmp_path / "de.mo").open("wb") as file:
        write_mo(file, catalog)
    pages = Pages.from_config(with_locale(tmp_path, "default_language: de, "))
    assert pages.default_language == "de" and GERMAN["heading_restricted"] in pages.caller_page(Caller(OVERDUE, "xx"))


def test_the_layout_pybabel_makes_works_too(tmp_path: Path) -> None:
    (tmp_path / "de" / "LC_MESSAGES").mkdir(parents=True)
    (tmp_path / "de" / "LC_MESSAGES" / "messages.po").write_bytes(catalogue_file("de", GERMAN, GERMAN_TERMS))
    (tmp_path / "pl.mo").write_bytes(b"")  # a .po of the same language is read first
    (tmp_path / "pl.po").write_bytes(catalogue_file("pl", POLISH, POLISH_TERMS))
    config = with_locale(tmp_path)
    assert validate(config) == []
    pages = Pages.from_config(config)
    assert GERMAN["heading_restricted"] in pages.caller_page(Caller(OVERDUE, "de"))
    assert POLISH["heading_restricted"] in pages.caller_page(Caller(OVERDUE, "pl"))


def test_broken_catalogues_are_named_and_left_out(tmp_path: Path) -> None:
    (tmp_path / "de.po").write_bytes(catalogue_file("de", GERMAN, GERMAN_TERMS, plural_forms="nplurals=2; plural=(n=="))
    (tmp_path / "pl.po").write_bytes(catalogue_file("pl", {**POLISH, "pay_heading": "Zapłać $amount"}, POLISH_TERMS))
    (tmp_path / "fr.po").write_bytes(b'msgid "x"\nmsgstr "y"\nthis is not po\n')
    (tmp_path / "german.po").write_text("")
    (tmp_path / "messages.pot").write_bytes((LOCALE / "messages.pot").read_bytes())  # the template may sit there
    problems = validate(with_locale(tmp_path))
    assert [p.split(": ")[1].rsplit("/", 1)[-1] for p in problems] == ["german.po", "de.po", "fr.po", "pl.po"]
    assert "not a usable catalogue" in problems[1] and "not a readable .po catalogue" in problems[2]
    assert "pay_heading: unknown placeholder $amount" in problems[3]
    pages = Pages.from_config(with_locale(tmp_path))
    assert "de" not in pages.messages and "fr" not in pages.messages and "pl" in pages.messages
    assert "Powód" in pages.caller_page(Caller(OVERDUE, "pl"))


def test_a_catalogue_in_a_charset_python_does_not_know_is_named_and_left_out(tmp_path: Path) -> None:
    """``charset=CHARSET`` is what xgettext writes into a .pot; a provider's copy of it, or a .mo
    naming a bogus charset, stopped the portal at start and made check-config print a traceback
    (audit: LookupError is no ValueError)."""
    po = catalogue_file("de", GERMAN, GERMAN_TERMS).replace(b"charset=utf-8", b"charset=CHARSET")
    assert b"charset=CHARSET" in po
    (tmp_path / "de.po").write_bytes(po)
    (tmp_path / "pl.po").write_bytes(catalogue_file("pl", POLISH, POLISH_TERMS))
    problems = validate(with_locale(tmp_path))
    assert len(problems) == 1 and "de.po" in problems[0] and "charset" in problems[0].lower(), problems
    pages = Pages.from_config(with_locale(tmp_path))
    assert "de" not in pages.messages and "pl" in pages.messages
    assert pages.caller_page(Caller(OVERDUE, "de"))


@pytest.mark.parametrize(("rule", "why"), [("nplurals=2; plural=(n%0);", "fails for n=0"),
                                          ("nplurals=2; plural=(n+5);", "gives form 5 for n=0")])
def test_a_plural_rule_that_compiles_but_cannot_answer_is_refused(tmp_path: Path, rule: str, why: str) -> None:
    """Babel asks the rule even for the singular: a rule that raises or answers out of range would
    stop every page of the portal, so the catalogue is named and left out instead."""
    (tmp_path / "de.po").write_bytes(catalogue_file("de", GERMAN, GERMAN_TERMS, plural_forms=rule))
    problems = validate(with_locale(tmp_path))
    assert len(problems) == 1 and "de.po" in problems[0] and why in problems[0]
    pages = Pages.from_config(with_locale(tmp_path))
    assert "de" not in pages.messages
    assert pages.caller_page(Caller(OVERDUE, "de"))


def test_languages_without_a_catalogue_are_named_by_check_config(config: Config) -> None:
    problems = validate(with_portal(config, default_language="pl", texts={"de": {"pay_heading": "Bezahlen"}}))
    assert problems == [
        "portal.texts.de: no catalogue for this language (have en, cs, hu, es, uk, ru, pt); add de.po to "
        "portal.locale_dir (docs/portal.md, Texts and languages)",
        "portal.default_language: 'pl' has no catalogue (have en, cs, hu, es, uk, ru, pt); add pl.po to "
        "portal.locale_dir",
    ]
    pages = Pages.from_config(with_portal(config, default_language="pl"))
    assert pages.default_language == "en"  # at run time: the page, in English


def test_config_accepts_any_language_tag_and_refuses_what_is_none() -> None:
    config = parse_config(CONFIG.replace("portal: {", "portal: {default_language: pt_BR, texts: {de: {x: y}}, "))
    assert config.portal.default_language == "pt-br" and config.portal.texts == {"de": {"x": "y"}}
    with pytest.raises(ConfigError) as raised:
        parse_config(CONFIG.replace("portal: {", "portal: {default_language: 'Deutsch!', texts: {'1': {x: y}}, "
                                                 "locale_dir: /nonexistent/locale, "))
    message = str(raised.value)
    assert "portal.default_language" in message and "not a language tag" in message
    assert "portal.texts.1" in message and "/nonexistent/locale: not a directory" in message
