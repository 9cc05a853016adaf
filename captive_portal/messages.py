"""Every sentence the portal shows, one dictionary per language.

A language is one more entry in ``MESSAGES`` with the same keys as English (the ``Messages``
TypedDict and a unit test keep them in step). ``$provider`` is the only placeholder; the page
substitutes it before escaping, so translations are plain text and never HTML. Reasons are
categories from billing, deliberately vague: the page must not reveal amounts, names or
addresses to whoever happens to be using the connection.
"""

from __future__ import annotations

from typing import Literal, TypedDict

DEFAULT_LANGUAGE = "en"


class Messages(TypedDict):
    title_restricted: str
    heading_restricted: str
    summary_restricted: str
    reason_overdue: str
    reason_suspended: str
    reason_notice: str
    reason_other: str
    pay_heading: str
    pay_online: str
    pay_contact: str
    pay_restore: str
    contact_heading: str
    contact_phone: str
    contact_email: str
    contact_hours: str
    reference_label: str
    reference_hint: str
    title_active: str
    heading_active: str
    summary_active: str
    trust_named: str
    trust_unnamed: str


ReasonKey = Literal["reason_overdue", "reason_suspended", "reason_notice", "reason_other"]

#: Reason categories that have their own sentence; any other reason gets ``reason_other``.
REASONS: dict[str, ReasonKey] = {
    "overdue": "reason_overdue",
    "suspended": "reason_suspended",
    "notice": "reason_notice",
}

EN: Messages = {
    "title_restricted": "Internet service restricted",
    "heading_restricted": "Your internet service is restricted",
    "summary_restricted": "Web access is limited until your account is settled.",
    "reason_overdue": "Why: a payment on your account is overdue.",
    "reason_suspended": "Why: your service has been suspended.",
    "reason_notice": "Why: your provider has an important notice about your account.",
    "reason_other": "Why: your account needs attention.",
    "pay_heading": "How to pay",
    "pay_online": "Pay online:",
    "pay_contact": "Contact your provider to settle your account.",
    "pay_restore": "Once your payment is received, full service returns automatically.",
    "contact_heading": "Contact",
    "contact_phone": "Phone",
    "contact_email": "Email",
    "contact_hours": "Hours",
    "reference_label": "Reference code",
    "reference_hint": "Please quote it when you contact us.",
    "title_active": "Internet service active",
    "heading_active": "Your service is active",
    "summary_active": "Your internet access is not restricted. "
                      "If a page did not load, please try again.",
    "trust_named": "This page comes from your provider $provider; "
                   "we will never ask for your password.",
    "trust_unnamed": "This page comes from your provider; we will never ask for your password.",
}

MESSAGES: dict[str, Messages] = {
    "en": EN,
}
