"""The portal's languages: gettext catalogues, read when the portal starts (docs/portal.md, Texts
and languages).

Every sentence of the page is a message with a key (``msgctxt``, the key ``portal.texts`` uses)
and its English text (``msgid``); ``locale/messages.pot`` is the template, English is the source
language, and ``locale/<language>.po`` holds each shipped translation. A provider adds a language,
or rewords a shipped one, by dropping ``<language>.po`` (or a compiled ``.mo``) into
``portal.locale_dir``: no code, no build step. A provider's catalogue of a shipped language falls
back to the shipped one message by message; every catalogue falls back to English.

Why ``.po`` files read at start rather than ``.mo`` files compiled at build or install time: the
source is what a translator edits and a provider drops in, there is no compiled file to go
stale, and compiling ~70 messages per language costs milliseconds once per start. A ``.mo``
(``msgfmt``, ``pybabel compile``) works as well, for those who have one.

Plural forms come from each catalogue's ``Plural-Forms`` header (a ``.po`` without one gets
Babel's rule for its language), dates and numbers from Babel's CLDR data for the language, so
Polish or German plural and date rules need no code either.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from string import Template
from typing import Any, get_args

from babel import Locale, UnknownLocaleError
from babel.dates import format_skeleton
from babel.messages.catalog import Catalog
from babel.messages.mofile import write_mo
from babel.messages.pofile import PoFileError, read_po
from babel.numbers import format_decimal
from babel.support import Translations

from .messages import PLACEHOLDERS, MessageKey, Messages, text_placeholders

log = logging.getLogger(__name__)

#: English is the source language: its texts are the template's msgids.
SOURCE_LANGUAGE = "en"
#: The languages whose catalogues ship in ``captive_portal/locale``, in the switcher's order.
SHIPPED = ("en", "cs", "hu", "es", "uk", "ru", "pt")
TEMPLATE_FILE = "messages.pot"
#: Plural messages, one per unit of a promise's term ("$count day" / "$count days").
TERM_KEYS = {"day": "term_days", "hour": "term_hours"}
MESSAGE_KEYS: tuple[MessageKey, ...] = get_args(MessageKey)
#: A language tag as a file name or config key: ``de``, ``pt_BR``, ``pt-br``, ``sr-Latn``.
_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")
#: Date then time: the month by name so "1/12" is never read the wrong way round; 24-hour clock.
DATE_SKELETON, TIME_SKELETON = "yMMMMd", "Hm"


class CatalogueError(ValueError):
    """A catalogue that cannot be used; the message names its file."""


def normal_tag(tag: str) -> str | None:
    """``pt_BR`` → ``pt-br``: how Accept-Language, ``?lang=`` and config keys name a language;
    None when it is not shaped like a language tag."""
    tag = tag.strip()
    return tag.replace("_", "-").lower() if _TAG.fullmatch(tag) else None


def babel_locale(code: str) -> Locale | None:
    """Babel's CLDR data for a language code (``pt-br`` → ``pt_BR``); None if Babel has none."""
    try:
        return Locale.parse(code.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return None


@dataclass(frozen=True)
class Catalogue:
    """One language: its translations (with their fallbacks), its CLDR data, where it came from."""

    code: str                    # "cs", "pt-br"
    translations: Translations   # pgettext/npgettext; untranslated messages fall back, finally to English
    locale: Locale               # dates, numbers, the language's own name (English's when Babel has none)
    path: str                    # the file read; "" for English (the template itself)

    def text(self, key: str) -> str:
        return str(self.translations.pgettext(key, english()[key]))

    def messages(self) -> Messages:
        """Every message key → text in this language."""
        return {key: self.text(key) for key in MESSAGE_KEYS}  # type: ignore[return-value]

    def untranslated(self) -> list[str]:
        """Keys this catalogue (and the shipped one behind it) leaves in English: a mixed page."""
        if self.code == SOURCE_LANGUAGE:
            return []
        singular = english_plurals()[0]
        known: set[object] = set()
        chain: object = self.translations
        while isinstance(chain, Translations):
            known.update(getattr(chain, "_catalog", {}))  # gettext's own index: "ctxt\x04msgid" or (that, form)
            chain = getattr(chain, "_fallback", None)
        missing = [key for key in MESSAGE_KEYS if f"{key}\x04{english()[key]}" not in known]
        return missing + [key for key in TERM_KEYS.values() if (f"{key}\x04{singular[key]}", 0) not in known]

    def term(self, count: int, unit: str) -> str:
        """"3 days", "3 dny", "3 napra": the number and its unit in this language's plural form."""
        singular, plural = english_plurals()
        key = TERM_KEYS[unit]
        text = str(self.translations.npgettext(key, singular[key], plural[key], count))
        return Template(text).safe_substitute(count=format_decimal(count, locale=self.locale))

    def date(self, when: datetime) -> str:
        """A date and time as this language writes them (CLDR), month by name, 24-hour clock."""
        day = format_skeleton(DATE_SKELETON, when, tzinfo=when.tzinfo, locale=self.locale)
        time = format_skeleton(TIME_SKELETON, when, tzinfo=when.tzinfo, locale=self.locale)
        pattern = str(self.locale.datetime_formats["medium"]).replace("'", "")
        return pattern.replace("{0}", time).replace("{1}", day)

    @property
    def name(self) -> str:
        """The language named in itself, for the switcher: "Čeština", "Deutsch", "Português (Brasil)"."""
        own = babel_locale(self.code)
        named = own.get_display_name(own) if own is not None else None
        return named[:1].upper() + named[1:] if named else self.code


# --- reading ---------------------------------------------------------------------------------

def _locale_dir() -> resources.abc.Traversable:
    return resources.files(__package__).joinpath("locale")


@cache
def _template() -> Catalog:
    with _locale_dir().joinpath(TEMPLATE_FILE).open("rb") as file:
        return read_po(file, abort_invalid=True)


@cache
def english() -> dict[str, str]:
    """Message key → English text, from the template."""
    return {str(m.context): str(m.id) for m in _template() if m.id and m.context and not m.pluralizable}


@cache
def english_plurals() -> tuple[dict[str, str], dict[str, str]]:
    """Plural message key → English singular, and → English plural."""
    plural = [m for m in _template() if m.id and m.context and m.pluralizable]
    return ({str(m.context): str(m.id[0]) for m in plural}, {str(m.context): str(m.id[1]) for m in plural})


def compile_po(data: bytes, code: str, where: str) -> Translations:
    """A ``.po`` file's content as gettext translations (compiled in memory).

    Fuzzy messages and plural messages with an empty form count as untranslated, as ``msgfmt``
    has it; a ``Plural-Forms`` header that is not a valid C expression is refused.
    """
    try:
        catalog = read_po(io.BytesIO(data), locale=code.replace("-", "_") if babel_locale(code) else None,
                          abort_invalid=True)
    except (PoFileError, UnicodeDecodeError, ValueError, LookupError) as exc:   # LookupError: a charset
        raise CatalogueError(f"{where}: not a readable .po catalogue: {exc}") from exc  # Python does not know
    for message in list(catalog):
        if message.id and isinstance(message.string, (list, tuple)) and not all(message.string):
            catalog.delete(message.id, message.context)  # write_mo would fill the gaps with the English
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    return _translations(buffer.getvalue(), where)


#: Counts a plural rule is tried on before a catalogue is accepted (a page shows terms of days and
#: hours; CLDR's rules differ below 1000 at most).
PLURAL_PROBES = range(0, 1001)


def _translations(mo: bytes, where: str) -> Translations:
    """Compiled translations whose plural rule gives a valid form for every count tried: a rule
    that compiles but divides by zero or answers out of range (``n%0``, ``n+5``) would raise on
    every lookup of the page and stop the portal, so the catalogue is refused here instead."""
    try:
        translations = Translations(io.BytesIO(mo))
    except (OSError, ValueError, SyntaxError, UnicodeDecodeError, LookupError) as exc:  # gettext's parser, c2py,
        # and an unknown charset (``charset=CHARSET``, as xgettext writes a .pot): a provider's file
        # must never stop the portal (audit: the portal and check-config died on it)
        raise CatalogueError(f"{where}: not a usable catalogue: {exc}") from exc
    forms = _plural_count(translations)
    for n in PLURAL_PROBES:
        try:
            form = int(translations.plural(n))
        except Exception as exc:  # any failure of a provider's rule refuses the file
            raise CatalogueError(f"{where}: the Plural-Forms rule fails for n={n}: {exc!s}") from exc
        if not 0 <= form < forms:
            raise CatalogueError(f"{where}: the Plural-Forms rule gives form {form} for n={n}, "
                                 f"outside 0..{forms - 1} (nplurals={forms})")
    return translations


def _plural_count(translations: Translations) -> int:
    """``nplurals`` of the catalogue's header (2, gettext's default, when it has none)."""
    header = translations.info().get("plural-forms", "")
    for part in header.split(";"):
        key, _, value = part.partition("=")
        if key.strip() == "nplurals" and value.strip().isdigit():
            return int(value.strip())
    return 2


def read_catalogue(path: str, code: str) -> Translations:
    """The translations in ``path`` (``.po`` or ``.mo``); CatalogueError says what is wrong."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return compile_po(data, code, path) if path.endswith(".po") else _translations(data, path)


def _catalogue(code: str, translations: Translations, path: str) -> Catalogue:
    return Catalogue(code, translations, babel_locale(code) or Locale.parse(SOURCE_LANGUAGE), path)


def _shipped_translations(code: str) -> tuple[Translations, str]:
    """A shipped language's translations, compiled anew (a catalogue put in front of it chains to
    its own copy, so the cached ones are never changed)."""
    if code == SOURCE_LANGUAGE:
        return Translations(), ""
    resource = _locale_dir().joinpath(f"{code}.po")
    return compile_po(resource.read_bytes(), code, str(resource)), str(resource)


@cache
def shipped() -> dict[str, Catalogue]:
    """The catalogues that come with the portal, in ``SHIPPED`` order."""
    return {code: _catalogue(code, *_shipped_translations(code)) for code in SHIPPED}


def dropped_in(locale_dir: str) -> tuple[dict[str, str], list[str]]:
    """Language code → catalogue file in ``locale_dir``, and the problems with the directory.

    ``<language>.po`` or ``<language>.mo``, the language as a tag (``de``, ``pt_BR``), or what
    ``pybabel init -d <dir>`` makes, ``<language>/LC_MESSAGES/messages.po`` (or ``.mo``); a
    ``.po`` is read before a ``.mo`` of the same language. Anything else is named as a problem, so
    a typo (``german.po``, ``de.txt``) does not go unnoticed; ``.pot`` templates are left alone.
    """
    if not locale_dir:
        return {}, []
    try:
        names = sorted(os.listdir(locale_dir))
    except OSError as exc:
        return {}, [f"portal.locale_dir: {locale_dir}: {exc.strerror or exc}"]
    found: dict[str, list[str]] = {}
    problems = []
    for name in names:
        path = os.path.join(locale_dir, name)
        stem, dot, extension = name.rpartition(".")
        if name.startswith(".") or extension == "pot":
            continue
        if os.path.isdir(path) and normal_tag(name):
            inside = [os.path.join(path, "LC_MESSAGES", f"messages.{ext}") for ext in ("po", "mo")]
            if any(os.path.isfile(file) for file in inside):
                found.setdefault(str(normal_tag(name)), []).extend(f for f in inside if os.path.isfile(f))
                continue
        code = normal_tag(stem) if dot and extension in ("po", "mo") and os.path.isfile(path) else None
        if code is None:
            problems.append(f"portal.locale_dir: {path}: not a catalogue (expected <language>.po or "
                            "<language>.mo, e.g. de.po or pt_BR.po, or <language>/LC_MESSAGES/messages.po)")
            continue
        found.setdefault(code, []).append(path)
    return {code: min(paths, key=lambda path: (not path.endswith(".po"), path)) for code, paths in found.items()}, \
        problems


def load(locale_dir: str) -> dict[str, Catalogue]:
    """Every language the page can be shown in: the shipped ones, then those in ``locale_dir``.

    A catalogue in ``locale_dir`` for a shipped language goes in front of the shipped one (which
    still answers what it leaves out). A catalogue that cannot be read is left out and logged:
    the page is still shown, in the other languages.
    """
    languages = dict(shipped())
    files, _ = dropped_in(locale_dir)
    for code, path in files.items():
        try:
            translations = read_catalogue(path, code)
        except CatalogueError as exc:
            log.error("event=catalogue_not_used language=%s problem=%r", code, str(exc))
            continue
        if code in languages:
            translations.add_fallback(_shipped_translations(code)[0])
        languages[code] = _catalogue(code, translations, path)
    return languages


# --- check-config ----------------------------------------------------------------------------

def problems(locale_dir: str) -> list[str]:
    """What is wrong with the catalogues in ``portal.locale_dir``, each naming its file."""
    files, found = dropped_in(locale_dir)
    for code, path in files.items():
        try:
            translations = read_catalogue(path, code)
        except CatalogueError as exc:
            found.append(f"portal.locale_dir: {exc}")
            continue
        if babel_locale(code) is None:
            found.append(f"portal.locale_dir: {path}: no CLDR data for {code!r} (dates and numbers would be "
                         "written as in English); name the file by an ISO 639 language code, e.g. de.po")
        catalogue = _catalogue(code, translations, path)
        for key in MESSAGE_KEYS:
            names, stray = text_placeholders(catalogue.text(key))
            allowed = PLACEHOLDERS.get(key, frozenset())
            for name in sorted(names - allowed):
                found.append(f"portal.locale_dir: {path}: {key}: unknown placeholder ${name} (the page would show "
                             "it as written; write $$ for a dollar sign)")
            if stray:
                found.append(f"portal.locale_dir: {path}: {key}: a lone '$'; write $$ for a dollar sign")
        singular, plural = english_plurals()
        for term_key in TERM_KEYS.values():
            forms = {str(translations.npgettext(term_key, singular[term_key], plural[term_key], n)) for n in range(200)}
            for name in sorted(set().union(*(text_placeholders(form)[0] for form in forms)) - {"count"}):
                found.append(f"portal.locale_dir: {path}: {term_key}: unknown placeholder ${name} (only $count)")
    return found


def warnings(locale_dir: str) -> list[str]:
    """Catalogues in ``portal.locale_dir`` that leave messages in English (valid, but a mixed page)."""
    files, _ = dropped_in(locale_dir)
    found = []
    for code, catalogue in load(locale_dir).items():
        if files.get(code) != catalogue.path:
            continue
        missing = catalogue.untranslated()
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            found.append(f"portal.locale_dir: {catalogue.path}: {len(missing)} message(s) not translated, shown "
                         f"in English: {shown}")
    return found


def __getattr__(name: str) -> Any:
    """``MESSAGES`` (language → every text of the shipped catalogues), ``EN`` and ``LANGUAGE_NAMES``
    (code → the language named in itself), for tests and tools: read on first use, not at import."""
    if name == "LANGUAGE_NAMES":
        return {code: catalogue.name for code, catalogue in shipped().items()}
    if name in ("MESSAGES", "EN"):
        messages = {code: catalogue.messages() for code, catalogue in shipped().items()}
        return messages if name == "MESSAGES" else messages[SOURCE_LANGUAGE]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
