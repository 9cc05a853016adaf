"""The portal page, in every state a caller can be in, and the small problem pages.

States: ``restricted`` (walled garden), ``notice`` and ``throttle`` (an interstitial with
"Continue to the internet"), ``acknowledged`` (the notice was read: carry on), ``active`` (not
restricted at all), ``unknown`` (the enforcer could not be asked), ``promised`` (the subscriber
has just promised to pay: service is back until a date), and ``problem`` (a form that expired,
too many attempts). Any restricted state may also offer "I promise to pay", when the enforcer
says so. The states in which the caller may browse (``acknowledged``, ``active``, ``promised``)
link back to the page they had asked for when it was redirected here, if the portal noted it
for this very device; the link's text is a fixed sentence, never the URL, since whoever holds
the device next (or looks over a shoulder) need not learn where it was going.

``unknown`` claims neither "restricted" nor "active": while the enforcer is down or restarting
every caller gets it, paying customers included, so it says only that the account cannot be
checked now and, for a service that does not work, how to pay and whom to call.

The page is self-contained (inline CSS and an inlined logo; no scripts, fonts or other
requests) because a restricted subscriber cannot fetch anything outside the walled garden,
and small so it loads on a poor mobile link. Everything that comes from config, the
enforcer or a catalogue is escaped here, once: values become ``Markup`` only by passing
through ``escape`` or the element builders below, and the template gets nothing else.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import datetime, tzinfo
from string import Template
from urllib.parse import quote, urlsplit

from enforcer.config import Config, PaymentLink, PortalConfig, Provider
from enforcer.control_protocol import Lookup, PromiseOffer

from . import branding, catalogues
from .catalogues import Catalogue
from .messages import (
    DEFAULT_LANGUAGE,
    TEXT_PLACEHOLDER,
    MessageKey,
    Messages,
    normal_reason,
    reason_category,
    reason_key,
)

_PHONE_SEPARATORS = re.compile(r"[\s().-]")
#: Where the notice form posts to (on the portal host).
CONTINUE_PATH = "/continue"
#: Where the "I promise to pay" form posts to.
PROMISE_PATH = "/promise"


class Markup(str):
    """HTML built by this module from escaped parts; safe to insert as is."""


def escape(value: str) -> Markup:
    """Escape plain text (quotes too, so it is safe inside attribute values)."""
    return value if isinstance(value, Markup) else Markup(html.escape(value, quote=True))


def element(tag: str, content: str, **attributes: str) -> Markup:
    """``<tag a="v">content</tag>``; plain-text content and every attribute value get escaped."""
    attrs = "".join(f' {name.rstrip("_").replace("_", "-")}="{escape(value)}"'
                    for name, value in attributes.items())
    return Markup(f"<{tag}{attrs}>{escape(content)}</{tag}>")


def void(tag: str, **attributes: str) -> Markup:
    """``<tag a="v">`` without content (``input``, ``img``)."""
    return Markup(element(tag, "", **attributes)[:-len(f"</{tag}>")])


def join(*parts: str) -> Markup:
    return Markup("".join(escape(part) for part in parts))


def fill(text: str, **values: str) -> Markup:
    """A catalogue text with its ``$placeholders`` filled; text and values escaped.

    Markup values (a ``tel:`` link) go in as they are; an unknown ``$name`` stays as written.
    """
    parts: list[str] = []
    position = 0
    for match in TEXT_PLACEHOLDER.finditer(text):
        parts.append(escape(text[position:match.start()]))
        name = match.group(2) or match.group(3)
        if match.group(1):
            parts.append("$")
        elif name and name in values:
            parts.append(escape(values[name]))
        else:
            parts.append(escape(match.group(0)))
        position = match.end()
    parts.append(escape(text[position:]))
    return join(*parts)


@dataclass(frozen=True)
class Caller:
    """Who asked for the page, and what the portal knows about them."""

    lookup: Lookup | None       # None: the enforcer could not be asked
    language: str = DEFAULT_LANGUAGE
    address: str = ""           # shown only with portal.show_account
    token: str = ""             # CSRF token for the notice form
    now: float = 0.0            # unix time, for "is the acknowledgement still in force"
    note: MessageKey | None = None  # one sentence above everything (after "continue" went wrong)
    promised_until: float | None = None  # set: the caller has just promised to pay (unix time it lasts)
    back_to: str = ""           # the page this device had asked for, linked (not shown) once they may browse


@dataclass(frozen=True)
class Variant:
    """A reason's page (``portal.reasons.<reason>``): its own template and texts where it has them,
    the default page's everywhere else."""

    template: Template | None         # None: the page's template
    messages: dict[str, Messages]     # language → texts, for the languages the variant rewords


class Pages:
    """Renders pages from config; catalogues, logo, templates and texts are loaded once, here."""

    def __init__(self, portal: PortalConfig, portal_path: str = "/", tz: tzinfo | None = None) -> None:
        self.provider = portal.provider
        self.payment_links = portal.payment_links
        self.show_account = portal.show_account
        self.portal_path = portal_path
        self.tz = tz  # for dates on the page; None: the machine's local time
        self.languages: dict[str, Catalogue] = catalogues.load(portal.locale_dir)
        self.messages = branding.catalogue(self.languages, portal.texts)
        self.language_names = {code: language.name for code, language in self.languages.items()}
        self.default_language = portal.default_language if portal.default_language in self.messages \
            else DEFAULT_LANGUAGE
        self.template = branding.load_template(portal.templates_dir)
        self.variants = {
            reason: Variant(branding.load_reason_template(reason, page.template),
                            {code: branding.overlay(self.messages[code], texts)
                             for code, texts in page.texts.items() if code in self.messages})
            for reason, page in portal.reasons.items()}
        self.style = Markup(branding.style(portal.branding))
        logo = branding.load_logo(portal.branding)
        self.logo = void("img", src=logo, alt=self.provider.name, class_="logo") if logo else Markup()

    @classmethod
    def from_config(cls, config: Config) -> Pages:
        windows = config.policy.windows
        tz = windows.tz if windows.configured else None  # the operator's zone, if they named one
        return cls(config.portal, urlsplit(config.portal.url).path or "/", tz)

    def catalogue(self, language: str) -> tuple[str, Messages]:
        lang = language if language in self.messages else self.default_language
        return lang, self.messages[lang]

    def variant(self, lookup: Lookup | None) -> Variant | None:
        """The page configured for this caller's reason: the reason as billing wrote it, else its
        category (``fup`` → ``fair_use``); None (the default page) for a caller not restricted,
        without a reason, or with a reason no variant names."""
        if lookup is None or not lookup.restricted or not lookup.reason:
            return None
        found = self.variants.get(normal_reason(lookup.reason))
        category = reason_category(lookup.reason)
        return found if found is not None or category is None else self.variants.get(category)

    # --- whole pages ---------------------------------------------------------------------

    def caller_page(self, caller: Caller) -> str:
        """The page at ``portal.url`` for this caller (its reason's variant, if one is configured)."""
        lang, m = self.catalogue(caller.language)
        lookup = caller.lookup
        variant = self.variant(lookup)
        template = self.template
        if variant is not None:
            m = variant.messages.get(lang, m)
            template = variant.template or template
        note = element("p", m[caller.note], class_="note", role="status") if caller.note else Markup()
        if caller.promised_until is not None:
            summary = fill(m["summary_promised"], until=self.date(caller.promised_until, lang))
            details = join(note, self._back(m, caller.back_to), self._payment(m, restore=False),
                           self._contact(m, None), self._account(m, caller))
            return self._render(lang, m, "promised", m["title_promised"], m["heading_promised"], summary, details,
                                template)
        if lookup is None:  # the enforcer could not be asked: no claim either way
            state = "unknown"
            details = join(note, self._payment(m, restore=False, fallback=False), self._contact(m, None),
                           self._account(m, caller))
        elif not lookup.restricted:
            state = "active"
            details = join(note, self._back(m, caller.back_to), self._contact(m, None), self._account(m, caller))
        else:
            if lookup.acknowledged(caller.now):
                state = "acknowledged"
            elif lookup.in_notice:
                state = lookup.mode  # notice | throttle
            else:
                state = "restricted"
            form = self._continue(m, lang, caller.token) if state in ("notice", "throttle") else Markup()
            offer = lookup.promise
            promise = self._promise(m, lang, caller.token, offer) if offer.eligible else Markup()
            back = self._back(m, caller.back_to) if state == "acknowledged" else Markup()
            details = join(note, back, self._reason(m, lookup), self._payment(m), form, promise,
                           self._contact(m, lookup), self._account(m, caller))
        return self._render(lang, m, state, m[f"title_{state}"], m[f"heading_{state}"],  # type: ignore[literal-required]
                            m[f"summary_{state}"], details, template)  # type: ignore[literal-required]

    def problem_page(self, problem: str, language: str) -> str:
        """``expired`` (CSRF check failed) or ``too_many`` (rate limited): say so, link back."""
        lang, m = self.catalogue(language)
        back = element("p", element("a", m["back_link"], href=self._page_link(lang)))
        title = m[f"title_{problem}"]  # type: ignore[literal-required]
        return self._render(lang, m, "problem", title, title, m[f"summary_{problem}"],  # type: ignore[literal-required]
                            join(back, "\n", self._contact(m, None)), self.template)

    def _render(self, lang: str, m: Messages, state: str, title: str, heading: str, summary: str,
                details: Markup, template: Template) -> str:
        return template.safe_substitute(
            lang=escape(lang), title=escape(title), heading=escape(heading), summary=escape(summary),
            details=details, trust=self._trust(m), languages=self._languages(m, lang),
            style=self.style, state=escape(state), logo=self.logo, provider=escape(self.provider.name))

    # --- parts ---------------------------------------------------------------------------

    def _page_link(self, lang: str) -> str:
        return f"{self.portal_path}?lang={quote(lang)}"

    def _languages(self, m: Messages, current: str) -> Markup:
        items = []
        for code in self.messages:
            attributes = {"href": self._page_link(code), "hreflang": code, "lang": code}
            if code == current:
                attributes["aria_current"] = "true"
            items.append(element("li", element("a", self.language_names[code], **attributes)))
        return element("nav", element("ul", join(*items)), aria_label=m["language_label"])

    def _back(self, m: Messages, url: str) -> Markup:
        """A link "Continue to the page you asked for", for a caller who may browse again.

        ``url`` is what ``original_urls`` noted for this very device (an ``http://`` URL of
        printable ASCII); anything else is not linked. The URL is the link's target only, never
        its text: a page on screen must not tell anyone else where this device was going.
        """
        if not url or not _is_web_url(url):
            return Markup()
        return join("\n", element("p", element("a", m["back_to_page"], href=url), class_="back"))

    def _reason(self, m: Messages, lookup: Lookup | None) -> Markup:
        if lookup is None:
            return Markup()
        return join("\n", element("p", m[reason_key(lookup.reason)], class_="reason"))

    def _payment(self, m: Messages, restore: bool = True, fallback: bool = True) -> Markup:
        """How to pay: the payment links, the website; ``restore`` adds "service returns once paid",
        ``fallback`` "contact your provider to settle your account" when there is nothing to link
        (both claim the account needs paying, which the ``unknown`` page must not)."""
        links = [link for link in self.payment_links if _is_web_url(link.url)]
        website = self.provider.website.strip()
        if not fallback and not links and not website:
            return Markup()
        parts: list[str] = ["\n", element("h2", m["pay_heading"])]
        if links:
            parts += ["\n", element("ul", join(*(_payment_link(link) for link in links)), class_="pay")]
        if _is_web_url(website):
            parts += ["\n", element("p", join(m["pay_online"], " ", element("a", website, href=website)))]
        elif website:  # not a URL we dare to link (config checks it, texts may not): show as text
            parts += ["\n", element("p", f'{m["pay_online"]} {website}')]
        elif not links:
            parts += ["\n", element("p", m["pay_contact"])]
        if restore:
            parts += ["\n", element("p", m["pay_restore"])]
        return join(*parts)

    def _continue(self, m: Messages, lang: str, token: str) -> Markup:
        fields = join(element("p", m["continue_intro"]),
                      void("input", type="hidden", name="csrf", value=token),
                      void("input", type="hidden", name="lang", value=lang),
                      element("button", m["continue_button"], type="submit"))
        return join("\n", element("form", fields, method="post", action=CONTINUE_PATH, class_="continue"))

    def _promise(self, m: Messages, lang: str, token: str, offer: PromiseOffer) -> Markup:
        """"I promise to pay": what it does and for how long, and the button (a form like continue's)."""
        fields = join(void("input", type="hidden", name="csrf", value=token),
                      void("input", type="hidden", name="lang", value=lang),
                      element("button", m["promise_button"], type="submit"))
        intro = fill(m["promise_intro"], term=term_text(offer.term or 0.0, lang, self.languages))
        return join("\n", element("h2", m["promise_heading"]), "\n", element("p", intro), "\n",
                    element("form", fields, method="post", action=PROMISE_PATH, class_="promise"))

    def date(self, when: float, lang: str) -> str:
        """A unix time as this language writes a date and time, in the operator's zone, zone named."""
        local = datetime.fromtimestamp(when, self.tz) if self.tz else datetime.fromtimestamp(when).astimezone()
        text = self.languages.get(lang, self.languages[DEFAULT_LANGUAGE]).date(local)
        zone = local.tzname()
        return f"{text} {zone}" if zone else text

    def _contact(self, m: Messages, lookup: Lookup | None) -> Markup:
        provider = self.provider
        items: list[Markup] = []
        if provider.name:
            items.append(element("li", element("strong", provider.name)))
        if provider.phone:
            items.append(_item(m["contact_phone"], _phone_link(provider.phone)))
        if provider.email:
            address = provider.email.strip()
            link: Markup | str = address
            if _is_email(address):
                link = element("a", address, href="mailto:" + quote(address, safe="@+._-"))
            items.append(_item(m["contact_email"], link))
        if provider.hours:
            items.append(_item(m["contact_hours"], provider.hours))
        reference = Markup()
        if lookup is not None and lookup.reference:
            reference = element("p", join(f'{m["reference_label"]}: ', element("code", lookup.reference),
                                          " ", m["reference_hint"]), class_="reference")
        if not items and not reference:
            return Markup()
        contacts = join("\n", element("ul", join(*items))) if items else Markup()
        return join("\n", element("h2", m["contact_heading"]), contacts, "\n" if reference else "", reference)

    def _account(self, m: Messages, caller: Caller) -> Markup:
        if not self.show_account:
            return Markup()
        items = []
        if caller.lookup is not None and caller.lookup.subscriber:
            items.append(_item(m["account_label"], element("code", caller.lookup.subscriber)))
        if caller.address:
            items.append(_item(m["address_label"], element("code", caller.address)))
        if not items:
            return Markup()
        return join("\n", element("h2", m["account_heading"]), "\n", element("ul", join(*items)))

    def _trust(self, m: Messages) -> Markup:
        provider = self.provider
        named = fill(m["trust_named"], provider=provider.name) if provider.name else escape(m["trust_unnamed"])
        parts = [named, " ", m["trust_never"]]
        if provider.phone:
            parts += [" ", fill(m["trust_call"], phone=_phone_link(provider.phone))]
        return join(*parts)


def term_text(seconds: float, language: str, languages: dict[str, Catalogue] | None = None) -> str:
    """How long a promise lasts, as the promise text needs it: "3 days", "3 dny" (in "na 3 dny"),
    "36 hours": whole days when it is whole days, else hours; the plural form is the catalogue's."""
    languages = languages if languages is not None else catalogues.shipped()
    catalogue = languages.get(language, languages[DEFAULT_LANGUAGE])
    if seconds >= 86400 and seconds % 86400 == 0:
        return catalogue.term(int(seconds // 86400), "day")
    return catalogue.term(max(1, round(seconds / 3600)), "hour")


def _item(label: str, value: str) -> Markup:
    return element("li", join(element("span", f"{label}: ", class_="label"), value))


def _payment_link(link: PaymentLink) -> Markup:
    return element("li", element("a", link.label, href=link.url, class_="button"))


def _phone_link(phone: str) -> Markup:
    return element("a", phone, href=f"tel:{_PHONE_SEPARATORS.sub('', phone)}")


def _is_web_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc) and not any(c.isspace() for c in text)


def _is_email(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    return bool(at and local and "." in domain) and not any(c.isspace() or c in "<>?&\"'" for c in text)


def render_page(lookup: Lookup | None, provider: Provider, language: str = DEFAULT_LANGUAGE) -> str:
    """The page with built-in texts and template, default colours and no logo (tests, tools)."""
    return Pages(PortalConfig(provider=provider)).caller_page(Caller(lookup, language))


def largest_page(config: Config) -> tuple[str, int]:
    """(language, bytes) of the biggest page this config makes: a notice page with everything."""
    pages = Pages.from_config(config)
    biggest = (DEFAULT_LANGUAGE, 0)
    for reason in ("verification", *pages.variants):   # the default page, and each reason's
        lookup = Lookup("203.0.113.255", True, "notice", reason, "WG-XXXX-XXXX", "X" * 24,
                        promise=PromiseOffer(True, "eligible", 30 * 86400.0))
        for language in pages.messages:
            token = "f" * 8 + ("." + "x" * 43) * 2   # a token naming the subscriber: two MACs
            caller = Caller(lookup, language, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", token,
                            note="promise_refused_soon")
            size = len(pages.caller_page(caller).encode())
            where = language if reason == "verification" else f"{language}, reason {reason}"
            biggest = max(biggest, (where, size), key=lambda pair: pair[1])
    return biggest



def size_problems(config: Config) -> list[str]:
    """The largest page this config makes, if it is too big to load on a poor mobile link."""
    language, size = largest_page(config)
    if size >= branding.MAX_PAGE_BYTES:
        return [(f"portal: the page is {size} bytes in {language!r} (logo, template and texts together); "
                 f"keep it under {branding.MAX_PAGE_BYTES} so it loads on a poor mobile link")]
    return []
