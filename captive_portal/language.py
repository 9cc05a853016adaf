"""Choosing the page's language from ``Accept-Language`` (RFC 9110 §12.5.4).

Phones send their system languages in order (``cs-CZ,cs;q=0.9,en;q=0.8``); we take the most
preferred one we have, matching a regional tag to its base language, and fall back to a
default rather than failing: a page in the wrong language still beats no page.

The page's language switcher links carry ``?lang=xx``, which beats the header; nothing is
stored (no cookie), so the choice travels in the links and in the notice form.
"""

from __future__ import annotations

from collections.abc import Container


def parse_accept_language(header: str) -> list[tuple[str, float]]:
    """Language ranges with their weights, most preferred first; q=0 and junk are dropped.

    Equal weights keep the header's order (the sort is stable).
    """
    ranges: list[tuple[str, float]] = []
    for item in header.split(","):
        tag, _, params = item.partition(";")
        tag = tag.strip().lower().replace("_", "-")  # "pt_BR" (POSIX style, seen in the wild) is pt-br
        if not tag or len(tag) > 64:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0.0 < q <= 1.0:
            ranges.append((tag, q))
    ranges.sort(key=lambda pair: -pair[1])
    return ranges


def choose_language(header: str | None, available: Container[str], default: str = "en") -> str:
    """The first acceptable language we have: exact tag, then its primary subtag, else default."""
    if not header:
        return default
    for tag, _ in parse_accept_language(header):
        if tag == "*":
            return default
        if tag in available:
            return tag
        primary = tag.split("-", 1)[0]
        if primary in available:
            return primary
    return default


def page_language(query: str | None, header: str | None, available: Container[str], default: str = "en") -> str:
    """``?lang=`` when it names a language we have, else the best match for ``Accept-Language``."""
    if query:
        tag = query.strip().lower().replace("_", "-")
        if tag in available:
            return tag
        primary = tag.split("-", 1)[0]
        if primary in available:
            return primary
    return choose_language(header, available, default)
