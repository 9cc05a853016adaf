"""The portal's part of ``walled-garden check-config``: will the page render as configured, fit
a poor mobile link, and can subscribers reach it?

It sits above ``branding`` (what an ISP configures), ``page`` (rendering with it) and
``reachability`` (``portal.url`` against the listeners), so none of those imports another
only to check it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from enforcer.config import Config

from . import branding, catalogues, page, reachability


def validate(config: Config) -> list[str]:
    """Every problem with the portal's branding, template, texts, page size and reachability,
    each naming its key path.

    An empty list means the page will render as configured and subscribers can reach it as far
    as the config alone can tell. Called by ``check-config``, which counts every line as an
    error; the hints that depend on this machine are ``reachability.warnings``. The size is
    checked only when the rest is sound: a page that cannot render has no size worth telling.
    """
    problems = branding.problems(config)
    if not problems:
        problems += page.size_problems(config)
    problems += reachability.problems(config)
    problems += payment_link_problems(config)
    return problems


def warnings(config: Config) -> list[str]:
    """What is valid but will show badly: catalogues in ``portal.locale_dir`` that leave messages in
    English (the page mixes two languages). check-config prints these and still exits 0."""
    return catalogues.warnings(config.portal.locale_dir)


def payment_link_problems(config: Config) -> list[str]:
    """A payment link a restricted customer cannot open: its host is not in ``walled_garden.allow``
    (an allowed name, a name under an allowed ``*.domain``, an address in an allowed CIDR) and is
    not the portal itself. The customer would get a connection reset on the page meant to let
    them pay."""
    portal_host = (urlsplit(config.portal.url).hostname or "").lower().rstrip(".")
    found = []
    for i, link in enumerate(config.portal.payment_links):
        host = (urlsplit(link.url).hostname or "").lower().rstrip(".")
        if host and host != portal_host and not config.walled_garden.covers_host(host):
            found.append(f"portal.payment_links[{i}].url: {host} is not in walled_garden.allow, so a restricted "
                         f"customer following {link.url} gets a connection reset; add {host} to "
                         "walled_garden.allow (or a *.domain above it with dns: gateway, or its addresses)")
    return found
