"""The portal's part of ``walled-garden check-config``: will the page render as configured, fit
a poor mobile link, and can subscribers reach it?

It sits above ``branding`` (what an ISP configures), ``page`` (rendering with it) and
``reachability`` (``portal.url`` against the listeners), so none of those imports another
only to check it.
"""

from __future__ import annotations

from enforcer.config import Config

from . import branding, page, reachability


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
    return problems
