"""The portal page: restricted, active, or restricted-without-details when the lookup failed.

The page is self-contained (inline CSS, no scripts, images or fonts) because a restricted
subscriber cannot fetch anything from outside the walled garden, and small so it loads on a
poor mobile link. Everything that comes from config, the enforcer or a translation is escaped
here, once: values become ``Markup`` only by passing through ``escape`` or the element
builders below, and the template accepts nothing else.
"""

from __future__ import annotations

import html
import re
from functools import cache
from importlib import resources
from string import Template
from urllib.parse import quote, urlsplit

from enforcer.config import Provider

from .enforcer_client import Lookup
from .messages import DEFAULT_LANGUAGE, MESSAGES, REASONS, Messages, ReasonKey

_PHONE_SEPARATORS = re.compile(r"[\s().-]")


class Markup(str):
    """HTML built by this module from escaped parts; safe to insert as is."""


def escape(value: str) -> Markup:
    """Escape plain text (quotes too, so it is safe inside attribute values)."""
    return value if isinstance(value, Markup) else Markup(html.escape(value, quote=True))


def element(tag: str, content: str, **attributes: str) -> Markup:
    """``<tag a="v">content</tag>``; plain-text content and every attribute value get escaped."""
    attrs = "".join(f' {name.rstrip("_")}="{escape(value)}"' for name, value in attributes.items())
    return Markup(f"<{tag}{attrs}>{escape(content)}</{tag}>")


def join(*parts: str) -> Markup:
    return Markup("".join(escape(part) for part in parts))


@cache
def _template() -> Template:
    text = resources.files(__package__).joinpath("templates/page.html").read_text(encoding="utf-8")
    return Template(text)


def render_page(lookup: Lookup | None, provider: Provider, language: str = DEFAULT_LANGUAGE) -> str:
    """The page for a caller; ``lookup`` is None when the enforcer could not be asked.

    Without an answer we show the restricted page minus the reason: the caller reached the
    portal, most likely because they are restricted, and an error page would help no one.
    """
    messages = MESSAGES.get(language) or MESSAGES[DEFAULT_LANGUAGE]
    lang = language if language in MESSAGES else DEFAULT_LANGUAGE
    if lookup is not None and not lookup.restricted:
        state, title, heading, summary = "active", "title_active", "heading_active", "summary_active"
        details = _contact(messages, provider)
    else:
        state, title, heading = "restricted", "title_restricted", "heading_restricted"
        summary = "summary_restricted"
        details = join(_reason(messages, lookup), _payment(messages, provider),
                       _contact(messages, provider), _reference(messages, lookup))
    if provider.name:
        trust = Template(messages["trust_named"]).safe_substitute(provider=provider.name)
    else:
        trust = messages["trust_unnamed"]
    return _template().substitute(
        lang=escape(lang), state=escape(state), title=escape(messages[title]),
        heading=escape(messages[heading]), summary=escape(messages[summary]),
        details=details, trust=escape(trust))


def _reason(messages: Messages, lookup: Lookup | None) -> Markup:
    if lookup is None:
        return Markup()
    key: ReasonKey = REASONS.get(lookup.reason.strip().lower(), "reason_other")
    return element("p", messages[key], class_="reason")


def _payment(messages: Messages, provider: Provider) -> Markup:
    website = provider.website.strip()
    if _is_web_url(website):
        how = join(element("p", join(messages["pay_online"], " ", element("a", website, href=website))))
    elif website:  # not a URL we dare to link (config only checks it is a string): show as text
        how = element("p", f'{messages["pay_online"]} {website}')
    else:
        how = element("p", messages["pay_contact"])
    return join("\n", element("h2", messages["pay_heading"]), "\n", how, "\n",
                element("p", messages["pay_restore"]), "\n")


def _contact(messages: Messages, provider: Provider) -> Markup:
    items: list[Markup] = []
    if provider.name:
        items.append(element("li", element("strong", provider.name)))
    if provider.phone:
        number = _PHONE_SEPARATORS.sub("", provider.phone)
        items.append(_item(messages["contact_phone"], element("a", provider.phone, href=f"tel:{number}")))
    if provider.email:
        address = provider.email.strip()
        link: Markup | str = address
        if _is_email(address):
            link = element("a", address, href="mailto:" + quote(address, safe="@+._-"))
        items.append(_item(messages["contact_email"], link))
    if provider.hours:
        items.append(_item(messages["contact_hours"], provider.hours))
    if not items:
        return Markup()
    return join(element("h2", messages["contact_heading"]), "\n",
                element("ul", join(*(join("\n", item) for item in items), "\n")), "\n")


def _item(label: str, value: str) -> Markup:
    return element("li", join(element("span", f"{label}: ", class_="label"), value))


def _reference(messages: Messages, lookup: Lookup | None) -> Markup:
    if lookup is None or not lookup.reference:
        return Markup()
    return element("p", join(f'{messages["reference_label"]}: ', element("code", lookup.reference),
                             " ", messages["reference_hint"]), class_="reference")


def _is_web_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in text)


def _is_email(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and "." in domain) and not any(c.isspace() or c in "<>?&\"'" for c in text)
