"""What an ISP can change without code: logo, colours, the page template, every sentence.

* ``portal.branding``: a logo file (inlined as a ``data:`` URI, its MIME type taken from the
  file's content) and three colours, handed to the template as CSS custom properties
  (``--primary``, ``--background``, ``--text``, and ``--on-primary`` for text on primary,
  black or white, whichever reads better).
* ``portal.templates_dir``: a ``page.html`` there replaces the built-in template; it uses the
  same ``$placeholders`` (``TEMPLATE_PLACEHOLDERS``).
* ``portal.texts``: language → message key → text, laid over the catalogues (``catalogues``:
  the shipped ones and those in ``portal.locale_dir``).
* ``portal.reasons``: per reason, a template and texts of its own, laid over the page's.

Everything is loaded once, when the app is made. ``validate(config)`` lists what is wrong
with all of it, for ``walled-garden check-config``; at run time a custom template with
problems is not used (the built-in one is, and the reason is logged), and unknown text keys
are ignored.
"""

from __future__ import annotations

import base64
import difflib
import logging
import os
import re
from importlib import resources
from string import Template

from enforcer.config import MAX_LOGO_BYTES, Branding, Config, PortalConfig

from . import catalogues
from .catalogues import Catalogue
from .messages import PLACEHOLDERS, Messages
from .messages import TEXT_PLACEHOLDER as TEXT_PLACEHOLDER  # the texts' grammar, re-exported
from .messages import text_placeholders as text_placeholders

log = logging.getLogger(__name__)

#: Placeholders a page template may use; those marked True must be there.
TEMPLATE_PLACEHOLDERS: dict[str, bool] = {
    "lang": True,        # language code of the page, for <html lang>
    "title": True,       # the page title (plain text)
    "heading": True,     # the one <h1> text
    "summary": True,     # one sentence under the heading
    "details": True,     # reason, how to pay, the notice and promise forms, contact, reference (HTML)
    "trust": True,       # "this page is really from us" line (HTML)
    "languages": True,   # the language switcher (<nav>, HTML)
    "style": False,      # CSS custom properties for the branding colours, inside <style>
    "state": False,      # restricted | notice | throttle | acknowledged | active | promised | problem
    "logo": False,       # <img> with the inlined logo, or nothing
    "provider": False,   # the provider's name (plain text)
}
TEMPLATE_FILE = "page.html"
#: The page stays under 30 KB, logo included (docs/reference.md, Portal).
MAX_PAGE_BYTES = 30_000
#: WCAG 2 AA contrast for normal text.
MIN_CONTRAST = 4.5

#: The defaults also get a dark variant (for ``prefers-color-scheme: dark``); a branded page
#: keeps exactly the colours the ISP chose.
DARK = {"primary": "#8ab4f8", "background": "#121417", "text": "#e8eaed"}

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
_EXTERNAL = re.compile(r"<script|<link|<iframe|@import|url\(\s*['\"]?(?:https?:)?//|"
                       r"\bsrc\s*=\s*['\"]?(?:https?:)?//", re.IGNORECASE)


# --- colours ---------------------------------------------------------------------------------

def _rgb(color: str) -> tuple[int, int, int]:
    digits = color.lstrip("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if not re.fullmatch(r"[0-9a-fA-F]{6}", digits):
        raise ValueError(f"{color!r} is not a colour like '#0b5394'")
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


def relative_luminance(color: str) -> float:
    """WCAG 2 relative luminance of ``#rgb`` / ``#rrggbb``."""
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in _rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(first: str, second: str) -> float:
    """WCAG 2 contrast ratio, 1.0 to 21.0."""
    a, b = relative_luminance(first), relative_luminance(second)
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


def on_color(background: str) -> str:
    """Black or white, whichever is more legible on ``background``."""
    return "#ffffff" if contrast_ratio("#ffffff", background) >= contrast_ratio("#000000", background) else "#000000"


def _is_default(branding: Branding) -> bool:
    defaults = Branding()
    return (branding.primary_color, branding.background_color, branding.text_color) == (
        defaults.primary_color, defaults.background_color, defaults.text_color)


def style(branding: Branding) -> str:
    """The ``$style`` placeholder: CSS custom properties (colours were validated by config)."""
    def props(primary: str, background: str, text: str) -> str:
        return (f":root{{--primary:{primary};--background:{background};--text:{text};"
                f"--on-primary:{on_color(primary)}}}")

    css = props(branding.primary_color, branding.background_color, branding.text_color)
    if _is_default(branding):
        css += ("\n:root{color-scheme:light dark}\n@media (prefers-color-scheme:dark){"
                + props(DARK["primary"], DARK["background"], DARK["text"]) + "}")
    return css


def contrast_problems(branding: Branding) -> list[str]:
    pairs = [("text_color", branding.text_color, "background_color", branding.background_color),
             ("primary_color", branding.primary_color, "background_color", branding.background_color)]
    problems = []
    for name, fg, bg_name, bg in pairs:
        ratio = contrast_ratio(fg, bg)
        if ratio < MIN_CONTRAST:
            problems.append(f"portal.branding.{name}: {fg} on {bg_name} {bg} has contrast {ratio:.2f}:1; "
                            f"text needs at least {MIN_CONTRAST}:1 (WCAG AA)")
    # Button text is black or white, whichever is better: that is always at least 4.58:1.
    return problems


# --- logo ------------------------------------------------------------------------------------

def logo_mime(data: bytes) -> str | None:
    """The image type by content (not by file name); None if it is no image we know."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<?xml", b"<!--", b"<!doctype svg")) and b"<svg" in data[:4096].lower():
        return "image/svg+xml"
    return None


def logo_data_uri(path: str) -> str:
    """``data:<mime>;base64,...`` for the logo file; ValueError/OSError say what is wrong."""
    with open(path, "rb") as file:
        data = file.read(MAX_LOGO_BYTES + 1)
    if len(data) > MAX_LOGO_BYTES:
        raise ValueError(f"{path}: more than {MAX_LOGO_BYTES} bytes")
    mime = logo_mime(data)
    if mime is None:
        raise ValueError(f"{path}: not a PNG, JPEG, GIF, WebP or SVG image")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load_logo(branding: Branding) -> str:
    """The logo's data URI, or "" (none configured, or unusable: logged, page shown without)."""
    if not branding.logo:
        return ""
    try:
        return logo_data_uri(branding.logo)
    except (OSError, ValueError) as exc:
        log.error("event=logo_not_used key=portal.branding.logo error=%r", str(exc))
        return ""


# --- texts -----------------------------------------------------------------------------------

def overlay(messages: Messages, overrides: dict[str, str]) -> Messages:
    """``messages`` with the overrides laid over them (unknown keys and empty texts ignored)."""
    kept = {k: v for k, v in overrides.items() if k in messages and v.strip()}
    return {**messages, **kept}  # type: ignore[typeddict-item]


def catalogue(languages: dict[str, Catalogue], texts: dict[str, dict[str, str]]) -> dict[str, Messages]:
    """Every language's texts with ``portal.texts`` laid over them; languages without a catalogue
    are not made up from texts alone (check-config names them)."""
    return {code: overlay(language.messages(), texts.get(code, {})) for code, language in languages.items()}


def _texts_problems(texts: dict[str, dict[str, str]], languages: dict[str, Catalogue], key_path: str) -> list[str]:
    problems = []
    keys = list(catalogues.MESSAGE_KEYS)
    for language, strings in texts.items():
        if language not in languages:
            problems.append(f"{key_path}.{language}: no catalogue for this language (have {', '.join(languages)}); "
                            f"add {language}.po to portal.locale_dir (docs/portal.md, Texts and languages)")
            continue
        for key, text in strings.items():
            where = f"{key_path}.{language}.{key}"
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{where}: unknown message key{hint}")
                continue
            if not text.strip():
                problems.append(f"{where}: empty text; leave the key out to keep the catalogue's")
                continue
            names, stray = text_placeholders(text)
            allowed = PLACEHOLDERS.get(key, frozenset())
            for name in sorted(names - allowed):
                can = f"only ${', $'.join(sorted(allowed))}" if allowed else "none"
                problems.append(f"{where}: unknown placeholder ${name} (this message can use {can}; "
                                f"write $$ for a dollar sign)")
            if stray:
                problems.append(f"{where}: a lone '$'; write $$ for a dollar sign")
    return problems


# --- template --------------------------------------------------------------------------------

def builtin_template() -> Template:
    return Template(resources.files(__package__).joinpath("templates", TEMPLATE_FILE).read_text(encoding="utf-8"))


def template_problems(text: str, where: str) -> list[str]:
    template = Template(text)
    problems = []
    if not template.is_valid():
        problems.append(f"{where}: a '$' that is not a placeholder; write $$ for a dollar sign")
    used = set(template.get_identifiers())
    for name in sorted(used - set(TEMPLATE_PLACEHOLDERS)):
        problems.append(f"{where}: unknown placeholder ${name}; known: "
                        + ", ".join(f"${p}" for p in TEMPLATE_PLACEHOLDERS))
    for name in (p for p, required in TEMPLATE_PLACEHOLDERS.items() if required and p not in used):
        problems.append(f"{where}: missing placeholder ${name}")
    if _EXTERNAL.search(text):
        problems.append(f"{where}: loads scripts, stylesheets or images from elsewhere; the page must be "
                        "self-contained (restricted subscribers cannot reach them, and the portal's "
                        "Content-Security-Policy blocks them)")
    return problems


def _read_custom_template(templates_dir: str) -> tuple[str | None, str, list[str]]:
    """(text or None, where, problems) for ``templates_dir/page.html``; None text = not present."""
    path = os.path.join(templates_dir, TEMPLATE_FILE)
    if not templates_dir:
        return None, f"portal.templates_dir ({path})", []
    return _read_template_file(path, f"portal.templates_dir ({path})")


def _read_template_file(path: str, where: str) -> tuple[str | None, str, list[str]]:
    """(text or None, where, problems) for a template file; None text = not present."""
    if not os.path.exists(path):
        return None, where, []
    try:
        with open(path, encoding="utf-8") as file:
            return file.read(), where, []
    except (OSError, UnicodeDecodeError) as exc:
        return None, where, [f"{where}: cannot read as UTF-8: {getattr(exc, 'strerror', None) or exc}"]


def load_template(templates_dir: str) -> Template:
    """The custom ``page.html`` if there is one without problems, else the built-in template."""
    return _checked(*_read_custom_template(templates_dir)) or builtin_template()


def load_reason_template(reason: str, path: str) -> Template | None:
    """``portal.reasons.<reason>.template`` if it is set and has no problems; None: the page's own."""
    if not path:
        return None
    text, where, problems = _read_template_file(path, f"portal.reasons.{reason}.template ({path})")
    if text is None and not problems:
        problems = [f"{where}: no such file"]
    return _checked(text, where, problems)


def _checked(text: str | None, where: str, problems: list[str]) -> Template | None:
    """The template if it was read without problems; the problems are logged (the caller falls back)."""
    if text is not None:
        problems = template_problems(text, where)
        if not problems:
            return Template(text)
    for problem in problems:
        log.error("event=template_not_used problem=%r", str(problem))
    return None


# --- check-config ----------------------------------------------------------------------------

def problems(config: Config) -> list[str]:
    """Problems with the portal's branding, template, languages, texts and reason pages, each
    naming its key path.

    An empty list means the page renders as configured. ``config_check.validate`` adds what
    needs a rendered page (its size) and what needs the network (reaching ``portal.url``).
    """
    portal = config.portal
    languages = catalogues.load(portal.locale_dir)
    found = catalogues.problems(portal.locale_dir)
    found += _texts_problems(portal.texts, languages, "portal.texts")
    if portal.default_language not in languages:
        found.append(f"portal.default_language: {portal.default_language!r} has no catalogue "
                     f"(have {', '.join(languages)}); add {portal.default_language}.po to portal.locale_dir")
    found += contrast_problems(portal.branding)
    if portal.branding.logo:
        try:
            logo_data_uri(portal.branding.logo)
        except (OSError, ValueError) as exc:
            found.append(f"portal.branding.logo: {getattr(exc, 'strerror', None) or exc}")
    text, where, template_issues = _read_custom_template(portal.templates_dir)
    found += template_issues
    if text is not None:
        found += template_problems(text, where)
    found += _reason_problems(portal, languages)
    return found


def _reason_problems(portal: PortalConfig, languages: dict[str, Catalogue]) -> list[str]:
    found = []
    for reason, page in portal.reasons.items():
        found += _texts_problems(page.texts, languages, f"portal.reasons.{reason}.texts")
        if page.template:
            text, where, issues = _read_template_file(page.template, f"portal.reasons.{reason}.template "
                                                                     f"({page.template})")
            found += issues if text is not None or issues else [f"{where}: no such file"]
            if text is not None:
                found += template_problems(text, where)
    return found
