"""The portal's message keys and the rules their texts follow (docs/portal.md, Texts and languages).

The texts themselves are gettext catalogues (``captive_portal/locale``: ``messages.pot`` has every
key as ``msgctxt`` with its English text, ``<language>.po`` a translation), read by
``catalogues``; an ISP adds a language by dropping a catalogue into ``portal.locale_dir`` and
rewords any message per language with ``portal.texts`` (or per reason with
``portal.reasons.<reason>.texts``) without touching code. The ``Messages`` TypedDict and
``MessageKey`` name every key; a unit test keeps them and the template in step.
Translations are plain text, never HTML: the page escapes them. The only placeholders are
``$provider``, ``$phone``, ``$term`` and ``$until``, and only in the keys listed in
``PLACEHOLDERS``; ``$$`` is a literal dollar sign. ``$term`` ("3 days") comes from the plural
messages ``term_days``/``term_hours`` and ``$until`` from Babel's date formats, in the same language.

Reasons are categories from billing, deliberately vague: the page must not reveal amounts,
names or addresses to whoever happens to be using the connection.
"""

from __future__ import annotations

import re
from typing import Literal, TypedDict

DEFAULT_LANGUAGE = "en"


class Messages(TypedDict):
    # the page title (browser tab), heading and one-line summary, per state of the caller
    title_restricted: str
    heading_restricted: str
    summary_restricted: str
    title_notice: str
    heading_notice: str
    summary_notice: str
    title_throttle: str
    heading_throttle: str
    summary_throttle: str
    title_acknowledged: str
    heading_acknowledged: str
    summary_acknowledged: str
    title_active: str
    heading_active: str
    summary_active: str
    # the enforcer could not be asked: neither restricted nor active, how to pay and whom to call
    title_unknown: str
    heading_unknown: str
    summary_unknown: str
    # why: one sentence per reason category
    reason_overdue: str
    reason_suspended: str
    reason_notice: str
    reason_fair_use: str
    reason_security: str
    reason_verification: str
    reason_other: str
    # how to pay
    pay_heading: str
    pay_online: str
    pay_contact: str
    pay_restore: str
    # the notice interstitial and what pressing its button can lead to
    continue_intro: str
    continue_button: str
    continue_not_needed: str
    continue_failed: str
    # "I promise to pay" (policy.promise_to_pay) and what pressing it can lead to
    promise_heading: str
    promise_intro: str
    promise_button: str
    promise_refused_soon: str
    promise_refused: str
    promise_not_needed: str
    # the enforcer did not see this address connect to the portal lately, so it will not act for it
    reload_needed: str
    # on a page of a caller who may browse: the text of a link back to the page they had asked for
    back_to_page: str
    title_promised: str
    heading_promised: str
    summary_promised: str
    title_expired: str
    summary_expired: str
    title_too_many: str
    summary_too_many: str
    back_link: str
    # how to reach the provider
    contact_heading: str
    contact_phone: str
    contact_email: str
    contact_hours: str
    reference_label: str
    reference_hint: str
    # portal.show_account
    account_heading: str
    account_label: str
    address_label: str
    # "how to know this page is really from us"
    trust_named: str
    trust_unnamed: str
    trust_never: str
    trust_call: str
    language_label: str


MessageKey = Literal[
    "title_restricted", "heading_restricted", "summary_restricted",
    "title_notice", "heading_notice", "summary_notice",
    "title_throttle", "heading_throttle", "summary_throttle",
    "title_acknowledged", "heading_acknowledged", "summary_acknowledged",
    "title_active", "heading_active", "summary_active",
    "title_unknown", "heading_unknown", "summary_unknown",
    "reason_overdue", "reason_suspended", "reason_notice", "reason_fair_use", "reason_security",
    "reason_verification", "reason_other",
    "pay_heading", "pay_online", "pay_contact", "pay_restore",
    "continue_intro", "continue_button", "continue_not_needed", "continue_failed",
    "promise_heading", "promise_intro", "promise_button", "promise_refused_soon", "promise_refused",
    "promise_not_needed", "reload_needed", "back_to_page", "title_promised", "heading_promised", "summary_promised",
    "title_expired", "summary_expired", "title_too_many", "summary_too_many", "back_link",
    "contact_heading", "contact_phone", "contact_email", "contact_hours",
    "reference_label", "reference_hint",
    "account_heading", "account_label", "address_label",
    "trust_named", "trust_unnamed", "trust_never", "trust_call", "language_label",
]
ReasonKey = Literal["reason_overdue", "reason_suspended", "reason_notice", "reason_fair_use",
                    "reason_security", "reason_verification", "reason_other"]

#: Placeholders a message may use (substituted before escaping); every other key has none.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "trust_named": frozenset({"provider"}),
    "trust_call": frozenset({"phone"}),
    "promise_intro": frozenset({"term"}),
    "summary_promised": frozenset({"until"}),
}

#: ``$$`` (a dollar sign), ``$name``, ``${name}``, or a lone ``$`` (the empty last branch).
TEXT_PLACEHOLDER = re.compile(r"\$(?:(\$)|([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\}|)")


def text_placeholders(text: str) -> tuple[set[str], bool]:
    """Names used as ``$name`` / ``${name}`` in a message, and whether a stray ``$`` is there."""
    names: set[str] = set()
    stray = False
    for match in TEXT_PLACEHOLDER.finditer(text):
        if match.group(1):
            continue
        name = match.group(2) or match.group(3)
        if name:
            names.add(name)
        else:
            stray = True
    return names, stray


#: Reason categories (as billing writes them, normalised to lower case with ``_``) that have
#: their own sentence; any other reason gets ``reason_other``.
REASONS: dict[str, ReasonKey] = {
    "overdue": "reason_overdue",
    "unpaid": "reason_overdue",
    "suspended": "reason_suspended",
    "notice": "reason_notice",
    "fair_use": "reason_fair_use",
    "fup": "reason_fair_use",
    "security": "reason_security",
    "abuse": "reason_security",
    "malware": "reason_security",
    "verification": "reason_verification",
}


def normal_reason(reason: str) -> str:
    """How reasons are compared: ``"Fair-Use"``, ``"fair use"`` → ``fair_use``."""
    return reason.strip().lower().replace("-", "_").replace(" ", "_")


def reason_key(reason: str) -> ReasonKey:
    """The sentence for a billing reason: ``"Fair-Use"`` → ``reason_fair_use``; unknown → other."""
    return REASONS.get(normal_reason(reason), "reason_other")


def reason_category(reason: str) -> str | None:
    """The category a known reason belongs to (``fup`` → ``fair_use``); None for any other."""
    key = REASONS.get(normal_reason(reason))
    return key.removeprefix("reason_") if key else None

